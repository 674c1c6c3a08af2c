"""The JPEG inverse DCT, accurate (libjpeg ISLOW, PIL's) vs fast (IFAST): cost and pixels.

    python scripts/benchmark.py --what idct --num_images 256 --repeats 5

On the same ImageNet-like JPEGs as the input benchmark (`input.make_jpegs`: about
500x375, q90, 4:2:0), in a child process pinned to one CPU:

* cost: ms per image of the eval transform (`EvalTransform(224)`, resize 256 + centre
  224: the crop window decoded at full size), the train transform (`TrainTransform(224)`)
  and a whole-image decode (simplejpeg), each with `dct="fast"` and `"accurate"`, the
  two called in turn image by image so that other jobs' load hits both alike; each
  image's least time over `repeats` rounds is kept (RandomResizedCrop boxes differ
  between rounds, as in training);
* pixels: max and mean absolute difference from PIL (`Image.open(...).convert("RGB")`,
  what timm and torchvision decode with) of the whole decoded image, through both
  JPEG paths (crop window, simplejpeg), and of the eval transform's 224x224 output
  against PIL's pixels put through the same crop and resize.
"""

from __future__ import annotations

import io
import multiprocessing
import time
from typing import Any

import numpy as np
from PIL import Image

from jaxres.bench import common
from jaxres.bench.input import _pin_to_one_cpu, make_jpegs
from jaxres.data import decode, transforms

PATHS = {
    "crop window (TurboJPEG 3)": decode._decode_window,
    "whole image (simplejpeg)": decode._decode_whole,
}


def _whole(data: bytes, path: str, dct: str) -> np.ndarray:
    full = lambda w, h: (0, 0, w, h)  # The whole image as the crop box.
    array, _ = PATHS[path](data, full, lambda box: (1, 1), False, dct == "fast")
    return array


def _pil_eval(data: bytes, image_size: int) -> np.ndarray:
    """PIL's pixels through `EvalTransform`'s crop + resize."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    box = transforms.center_crop_box(array.shape[1], array.shape[0], transforms.EVAL_CROP_RATIO)
    return transforms.crop_resize(array, box, (image_size, image_size))


def _difference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in pairs]
    total = sum(int(d.sum()) for d in diffs)
    return {"max": int(max(d.max() for d in diffs)), "mean": total / sum(d.size for d in diffs)}


def pixel_differences(images: list[bytes], image_size: int = 224) -> dict[str, dict[str, float]]:
    """{what, IDCT: {max, mean}} absolute difference from PIL's pixels, in grey levels."""
    pil = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in images]
    pil_eval = [_pil_eval(d, image_size) for d in images]
    result = {}
    for dct in decode.DCT_METHODS:
        for path in PATHS:
            pairs = [(_whole(d, path, dct), p) for d, p in zip(images, pil)]
            result[f"full decode, {path}: {dct}"] = _difference(pairs)
        # At full size, as PIL here (224 from 500x375 needs no DCT scaling anyway).
        evaluate = transforms.EvalTransform(image_size, decode_reduced=False, dct=dct)
        pairs = [(evaluate({"image": d, "label": 0})["image"], p) for d, p in zip(images, pil_eval)]
        result[f"eval transform output {image_size}x{image_size}: {dct}"] = _difference(pairs)
    return result


def _per_core_ms(images: list[bytes], image_size: int, repeats: int) -> dict[str, float]:
    """{row: ms per image}, in the pinned child: the sum over images of each one's least time.

    The runners are called in turn image by image (A, B, A, B, ... per image, `repeats`
    rounds), not pass by pass: on a shared machine another job's burst then hits one image
    of each runner alike instead of a whole pass of one (passes of 0.5 s varied 15%).
    """
    records = [{"image": d, "label": 0} for d in images]
    runners = {}
    for dct in decode.DCT_METHODS:
        evaluate = transforms.EvalTransform(image_size, dct=dct)
        train = transforms.TrainTransform(image_size, dct=dct)
        rng = np.random.default_rng(0)  # One each, alike: both draw the same crop boxes.
        runners[f"eval transform: {dct}"] = lambda r, t=evaluate: t(r)
        runners[f"train transform: {dct}"] = lambda r, t=train, g=rng: t(r, g)
        runners[f"whole-image decode (simplejpeg): {dct}"] = lambda r, s=dct: _whole(
            r["image"], "whole image (simplejpeg)", s
        )
    best = {name: [float("inf")] * len(records) for name in runners}
    for _ in range(repeats + 1):  # The first round warms up (its times are kept only if least).
        for i, record in enumerate(records):
            for name, run in runners.items():
                seconds, _ = common.timed(lambda run=run, record=record: run(record))
                best[name][i] = min(best[name][i], seconds)
    return {name: 1e3 * sum(t) / len(records) for name, t in sorted(best.items())}


def run_idct_benchmark(
    num_images: int = 256, image_size: int = 224, repeats: int = 5
) -> dict[str, Any]:
    """Machine facts, per-image cost (ms, one pinned core) and pixel differences from PIL."""
    images = make_jpegs(num_images)
    load_before = common.load_average()
    with multiprocessing.get_context("spawn").Pool(1, initializer=_pin_to_one_cpu) as pool:
        per_core = pool.apply(_per_core_ms, (images, image_size, repeats))
    return {
        "machine": {
            **common.cpu_details(),
            "load_before": load_before,
            "load_after": common.load_average(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "data": {
            "num_images": num_images,
            "mean_kb": round(np.mean([len(d) for d in images]) / 1e3, 1),
        },
        "ms_per_image": per_core,
        "pixels_vs_pil": pixel_differences(images, image_size),
    }


def format_markdown(result: dict[str, Any]) -> str:
    """The result as two markdown tables: cost (with accurate / fast ratios) and pixels."""
    m, ms = result["machine"], result["ms_per_image"]
    lines = [
        (
            f"{m['date']}, {m['cpu_model']} ({'AVX-512' if m['avx512'] else 'no AVX-512'}), "
            f"{m['cores']} cores, sgemm {m['sgemm_gflops']} GFLOP/s; load average (1/5/15 min) "
            f"before {m['load_before']}, after {m['load_after']}. {result['data']['num_images']} "
            f"JPEGs, mean {result['data']['mean_kb']} KB."
        ),
        "",
        "| one core, ms per image | fast | accurate | accurate / fast |",
        "|---|---:|---:|---:|",
    ]
    for row in sorted({name.rsplit(": ", 1)[0] for name in ms}):
        fast, accurate = ms[f"{row}: fast"], ms[f"{row}: accurate"]
        lines.append(f"| {row} | {fast:.3f} | {accurate:.3f} | {accurate / fast:.3f} |")
    lines += ["", "| vs PIL's pixels, grey levels | max | mean |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['max']} | {v['mean']:.4f} |" for k, v in result["pixels_vs_pil"].items()]
    return "\n".join(lines) + "\n"
