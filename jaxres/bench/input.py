"""Input pipeline benchmark: images/s of the train and eval transforms, ours vs tf.data vs plain PIL.

    from jaxres.bench.input import run_input_benchmark, format_markdown
    print(format_markdown(run_input_benchmark()))

What it measures, on the same ImageNet-like JPEGs (made here: smooth random
colour fields plus noise, about 500x375, JPEG q90, one in four portrait):

* per core: a child process pinned to one CPU (`sched_setaffinity`) runs each
  transform over the records' bytes held in RAM: ours (`TrainTransform` /
  `EvalTransform`), ours with timm RandAugment `BENCH_RANDAUGMENT` (timed
  right after the plain train row, so the two share the conditions), the
  same on a copy pre-resized to shorter side 256, plain
  PIL (full decode, crop + antialiased resize, numpy flip), and tf.data
  (`decode_and_crop_jpeg` + `sample_distorted_bounding_box`, flax's ImageNet
  input pipeline, with the same fast integer IDCT as ours) with one map
  thread; plus decode-only rows;
* all cores: our grain pipeline (`pipeline.train_batches` / `eval_batches`,
  one worker process per core, and for training also `num_workers=0`, grain's
  read threads in one process; reading the array_record files) against
  tf.data with AUTOTUNE parallelism over the same bytes in RAM.

Every figure is the best of `repeats` timed passes after a warm-up pass.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxres import flops
from jaxres.bench import common
from jaxres.data import decode, pipeline, sources, transforms
from jaxres.data.prepare import records as prepare_records

EVAL_RESIZE_SHORTER = 256
PRE_RESIZED_SHORTER = 256
# The same integer fast IDCT as ours (TensorFlow's default, "", is the slower accurate one here).
TF_DCT_METHOD = "INTEGER_FAST"
GRAIN_SKIPPED_BATCHES = 16  # More than grain buffers ahead while its workers start.
GRAIN_TIMED_BATCHES = 24
BENCH_RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's timm setting (RSB A1/A2: m7).


def make_jpegs(
    num_images: int = 512, seed: int = 0, size: tuple[int, int] = (500, 375), quality: int = 90
) -> list[bytes]:
    """ImageNet-like JPEGs: smooth random colour fields plus pixel noise (about 75 KB at q90)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(num_images):
        w, h = size if i % 4 else size[::-1]
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(
            Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), np.float32
        )
        noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy).save(out, "JPEG", quality=quality)
        images.append(out.getvalue())
    return images


def write_records(
    directory: Path, images: list[bytes], resize_shorter: int | None = None
) -> sources.ArrayRecordSource:
    """The images as an ArrayRecordSource dataset (one class per 64 images)."""
    entries = [
        (f"{i // 64:03d}/{i:05d}.JPEG", i // 64, (lambda d=d: d)) for i, d in enumerate(images)
    ]
    names = [f"{c:03d}" for c in range(math.ceil(len(images) / 64))]
    prepare_records.write_record_dataset(
        directory,
        {"train": prepare_records.RecordList(entries)},
        names,
        source="jaxres.bench.input.make_jpegs",
        resize_shorter=resize_shorter,
        jpeg_quality=prepare_records.RESIZED_JPEG_QUALITY,
    )
    return sources.ArrayRecordSource(directory, "train")


def _best_rate(fn: Callable[[Any], Any], items: list, repeats: int) -> float:
    """Items/s of `fn` over `items`: best of `repeats` passes, after one warm-up pass."""
    for item in items[: max(1, len(items) // 8)]:
        fn(item)
    best, _ = common.best_time(lambda: [fn(item) for item in items], repeats)
    return len(items) / best


def _pil_train(image_size: int) -> Callable[[dict], np.ndarray]:
    """Plain PIL: full decode, crop + antialiased bilinear resize, numpy flip (the first version)."""
    rng = np.random.default_rng(0)

    def fn(record):
        image = decode.decode(record["image"])
        left, top, w, h = transforms.random_resized_crop_box(*image.size, rng, (0.08, 1.0))
        image = image.resize(
            (image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
        )
        array = np.asarray(image)
        return np.ascontiguousarray(array[:, ::-1]) if rng.random() < 0.5 else array

    return fn


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resizes a PIL image so the shorter side is `size` (bilinear, antialiased)."""
    return image.resize(transforms.shorter_side_size(*image.size, size), Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` window of a PIL image."""
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _pil_eval(image_size: int) -> Callable[[dict], np.ndarray]:
    """Plain PIL: full decode, resize the whole image to shorter side 256, centre crop."""

    def fn(record):
        image = _resize_shorter(decode.decode(record["image"]), EVAL_RESIZE_SHORTER)
        return np.asarray(_center_crop(image, image_size))

    return fn


def _tf_functions(image_size: int) -> tuple[Callable, Callable]:
    """tf.data map functions as in flax's ImageNet input pipeline (decode_and_crop_jpeg)."""
    import tensorflow as tf

    def train(image_bytes):
        shape = tf.image.extract_jpeg_shape(image_bytes)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(
            image_bytes, window, channels=3, dct_method=TF_DCT_METHOD
        )
        image = tf.image.resize(image, [image_size, image_size], method="bilinear")
        return tf.cast(tf.image.random_flip_left_right(image), tf.uint8)

    def evaluate(image_bytes):
        shape = tf.image.extract_jpeg_shape(image_bytes)
        h, w = shape[0], shape[1]
        side = tf.cast(
            image_size / EVAL_RESIZE_SHORTER * tf.cast(tf.minimum(h, w), tf.float32), tf.int32
        )
        window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
        image = tf.image.decode_and_crop_jpeg(
            image_bytes, window, channels=3, dct_method=TF_DCT_METHOD
        )
        return tf.cast(
            tf.image.resize(image, [image_size, image_size], method="bilinear"), tf.uint8
        )

    return train, evaluate


def _tf_rate(
    images: list[bytes], fn: Callable, parallel: int | None, batch_size: int, repeats: int
) -> float:
    """Images/s of a tf.data map over bytes in RAM (`parallel` None = AUTOTUNE)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(images))
    ds = ds.map(fn, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(2)
    if parallel:
        options = tf.data.Options()
        options.threading.private_threadpool_size = parallel
        ds = ds.with_options(options)
    return _best_rate(lambda _: sum(1 for _ in ds), [None], repeats) * len(images)


def _per_core(
    directory: str, resized_directory: str, image_size: int, repeats: int, with_tf: bool
) -> dict[str, float]:
    """Every single-core figure (run in a child pinned to one CPU)."""
    import simplejpeg

    records, resized = (
        _in_memory(sources.ArrayRecordSource(d, "train")) for d in (directory, resized_directory)
    )
    rng = np.random.default_rng(0)
    train, evaluate = transforms.TrainTransform(image_size), transforms.EvalTransform(image_size)
    augmented = transforms.TrainTransform(image_size, randaugment=BENCH_RANDAUGMENT)
    rates = {
        "decode only: PIL": _best_rate(lambda r: decode.decode(r["image"]), records, repeats),
        "decode only: simplejpeg": _best_rate(
            lambda r: simplejpeg.decode_jpeg(r["image"], fastdct=True), records, repeats
        ),
        "train: ours": _best_rate(lambda r: train(r, rng), records, repeats),
        f"train: ours + RandAugment {BENCH_RANDAUGMENT}": _best_rate(
            lambda r: augmented(r, rng), records, repeats
        ),
        "train: ours, pre-resized 256 copy": _best_rate(lambda r: train(r, rng), resized, repeats),
        "train: plain PIL": _best_rate(_pil_train(image_size), records, repeats),
        "eval: ours": _best_rate(evaluate, records, repeats),
        "eval: ours, pre-resized 256 copy": _best_rate(evaluate, resized, repeats),
        "eval: plain PIL": _best_rate(_pil_eval(image_size), records, repeats),
    }
    if with_tf:
        import tensorflow as tf

        images = [r["image"] for r in records]
        tf_train, tf_eval = _tf_functions(image_size)
        rates["decode only: tf.io.decode_jpeg"] = _best_rate(
            lambda d: tf.io.decode_jpeg(d, channels=3, dct_method=TF_DCT_METHOD), images, repeats
        )
        rates["train: tf.data"] = _tf_rate(images, tf_train, 1, 64, repeats)
        rates["eval: tf.data"] = _tf_rate(images, tf_eval, 1, 64, repeats)
    return rates


def _in_memory(source: Any) -> list[dict[str, Any]]:
    return [source[i] for i in range(len(source))]


def _pin_to_one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["TF_NUM_INTEROP_THREADS"] = os.environ["TF_NUM_INTRAOP_THREADS"] = "1"


def _grain_rate(batches: Iterable, batch_size: int, num_batches: int) -> float:
    """Steady-state images/s: worker start-up and the batches buffered meanwhile are not counted."""
    it = iter(batches)
    try:
        for _ in range(GRAIN_SKIPPED_BATCHES):
            next(it)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(it)
        return num_batches * batch_size / (time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):  # Stop the worker processes now, not at interpreter exit.
            it.close()


class _Repeated:
    """`source` `times` over (an evaluation split long enough to time)."""

    def __init__(self, source: Any, times: int):
        self._source, self._times = source, times

    def __len__(self) -> int:
        return len(self._source) * self._times

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[index % len(self._source)]


def _all_cores(
    source: Any, image_size: int, batch_size: int, repeats: int, with_tf: bool
) -> dict[str, float]:
    workers = len(os.sched_getaffinity(0))
    num_batches = max(GRAIN_TIMED_BATCHES, repeats * len(source) // batch_size)
    train = pipeline.train_batches(
        source,
        transforms.TrainTransform(image_size),
        global_batch_size=batch_size,
        seed=0,
        num_workers=workers,
    )
    rates = {f"train: ours (grain, {workers} workers)": _grain_rate(train, batch_size, num_batches)}
    # num_workers=0: grain's read threads in this process; decoding and resizing release the GIL.
    in_process = pipeline.train_batches(
        source, transforms.TrainTransform(image_size), global_batch_size=batch_size, seed=0
    )
    rates["train: ours (grain, in-process threads)"] = _grain_rate(
        in_process, batch_size, num_batches
    )
    evaluate = pipeline.eval_batches(
        _Repeated(
            source, (GRAIN_SKIPPED_BATCHES + num_batches + 1) * batch_size // len(source) + 1
        ),
        transforms.EvalTransform(image_size),
        global_batch_size=batch_size,
        num_workers=workers,
    )
    rates[f"eval: ours (grain, {workers} workers)"] = _grain_rate(evaluate, batch_size, num_batches)
    if with_tf:
        images = [r["image"] for r in _in_memory(source)]
        tf_train, tf_eval = _tf_functions(image_size)
        rates["train: tf.data (AUTOTUNE)"] = _tf_rate(images, tf_train, None, batch_size, repeats)
        rates["eval: tf.data (AUTOTUNE)"] = _tf_rate(images, tf_eval, None, batch_size, repeats)
    return rates


def run_input_benchmark(
    num_images: int = 512,
    image_size: int = 224,
    batch_size: int = 64,
    repeats: int = 3,
    with_tf: bool | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Runs every measurement; returns machine facts and {row: images/s} per core and on all cores.

    Args:
      num_images: JPEGs to make (about 500x375, q90).
      image_size: output side of the train / eval crops.
      batch_size: batch size of the grain and tf.data pipelines.
      repeats: timed passes per figure (the best is kept).
      with_tf: include tf.data rows (default: when TensorFlow is installed).
      workdir: where the records go (default: a temporary folder).
    """
    if with_tf is None:
        import importlib.util

        with_tf = importlib.util.find_spec("tensorflow") is not None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        images = make_jpegs(num_images)
        source = write_records(Path(tmp) / "bench", images)
        write_records(Path(tmp) / "bench_resized", images, PRE_RESIZED_SHORTER)
        args = (
            str(Path(tmp) / "bench"),
            str(Path(tmp) / "bench_resized"),
            image_size,
            repeats,
            with_tf,
        )
        with multiprocessing.get_context("spawn").Pool(1, initializer=_pin_to_one_cpu) as pool:
            per_core = pool.apply(_per_core, args)
        all_cores = _all_cores(source, image_size, batch_size, repeats, with_tf)
    return {
        "machine": {
            "cpu": flops.cpu_model(),
            "cores": flops.cpu_cores(),
            "python": platform.python_version(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "data": {
            "num_images": num_images,
            "mean_kb": round(float(np.mean([len(d) for d in images])) / 1e3, 1),
            "image_size": image_size,
            "batch_size": batch_size,
        },
        "per_core": per_core,
        "all_cores": all_cores,
    }


def format_markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables (images/s)."""
    m, d = result["machine"], result["data"]
    lines = [
        (
            f"{m['date']}, {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average "
            f"(1/5/15 min) before {m['load_before']}, after {m['load_after']}."
        ),
        (
            f"{d['num_images']} JPEGs (about 500x375, q90, mean {d['mean_kb']} KB), output "
            f"{d['image_size']}x{d['image_size']} uint8, batch {d['batch_size']}."
        ),
        "",
        "| per core (1 CPU) | images/s |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {rate:,.0f} |" for name, rate in result["per_core"].items()]
    lines += ["", "| all cores | images/s |", "|---|---:|"]
    lines += [f"| {name} | {rate:,.0f} |" for name, rate in result["all_cores"].items()]
    return "\n".join(lines) + "\n"
