"""TensorBoard as the run's dashboard: event files written without TensorFlow (tensorboardX's
protos), tags grouped by what they are, the config as HParams and text, pictures as images, and
the results of evaluate.py / linear_probe.py next to training's curves.

What a run shows (metrics.jsonl keys stay as they are; only the tags are grouped):

    Scalars   train/{loss,top1,grad_norm,lr,epoch,skipped}    (skipped: once it is not always 0)
              val/{top1,top5,loss,mean_per_class,best_top1}    (an evaluator NAME: NAME/...)
              time/{img_per_sec,step_s,data_s,device_s,input_wait,tflops_per_device,mfu,eta_s,
                    NAME_eval_s}
              fewshot/DATASET/Kshot, NAME/METHOD/N             (keys holding a '/' are kept)
              evaluate/<views>/..., probe/<dataset>/<probe>_<N>/...   (the scripts' results)
    Custom Scalars   train and evaluation of one quantity on one chart
    HParams   the resolved config (flattened keys); every scalar is a metric column (last value)
    Text      run/config, run/notes (what the curves mean), run/summary (final, best, constants),
              evaluate/..., probe/... (the scripts' tables)
    Images    pictures/curves (end of training), pictures/probe_confusion, pictures/predictions

Events go to the run's folder itself, so `tensorboard --logdir runs/` names each run by its
folder; a run started before Dec 2026 kept them in `WORKDIR/tb/` and still does (`logdir`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

EVENTS_GLOB = "events.out.tfevents.*"
# Series that are constant by construction or nearly always (the evaluation set's size, the
# undecodable images of a step): plotted only once they change; the summary text holds them.
CONSTANT_TAGS = re.compile(r"^(train/skipped|[^/]+/count)$")
IMAGE_GROUP = "pictures"
_OPENED: dict[tuple[str, str], int] = {}  # (folder, file-name suffix) -> the second it was opened.


def _tensorboardx() -> Any:
    """tensorboardX's event-file modules (no TensorFlow needed), imported without PyTorch.

    tensorboardX imports torch whenever it is installed (the `[convert]` extra), only to accept
    torch tensors: 2-3 s of every training run's start-up on 2 cores. Scalars need none of it.
    """
    import types

    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment] # `import torch` raises ImportError.
    try:
        from tensorboardX import event_file_writer, summary
        from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    finally:
        if blocked:
            del sys.modules["torch"]
    return types.SimpleNamespace(EventsWriter=event_file_writer.EventsWriter, summary=summary,
                                 event_pb2=event_pb2, summary_pb2=summary_pb2, tensor_pb2=tensor_pb2,
                                 tensor_shape_pb2=tensor_shape_pb2)  # fmt: skip


def logdir(workdir: str) -> str:
    """Where a run's events go: `WORKDIR/tb` when it already holds some (a run from before Dec
    2026, resumed: one TensorBoard run, not two), else the run's folder itself."""
    old = os.path.join(workdir, "tb")
    return old if glob.glob(os.path.join(old, EVENTS_GLOB)) else workdir


class EventFile:
    """A TensorBoard event file written synchronously: on disk at each `flush` (`RunBoard`
    flushes every row).

    tensorboardX's SummaryWriter hands events to a thread that flushes every 30 s, so a crash
    or kill -9 lost the steps since (a run's first event file could stay empty); here every
    row is flushed: 0.45 ms for a whole log row of 15 scalars with its JSON line and the tag
    bookkeeping (2-core AVX-512 EPYC, load 2.3, Dec 2026), once per log step. `purge_step`: TensorBoard drops the
    events of this step and later ones from earlier files (a resumed run logs them again).
    `suffix`: the file name's end (default: the process id).
    """

    def __init__(self, logdir: str, purge_step: int | None = None, suffix: str | None = None):
        self._tbx = _tensorboardx()
        os.makedirs(logdir, exist_ok=True)
        suffix = suffix or f".{os.getpid()}"
        # The name holds the second it was opened: a second file of this process in the same
        # second (a run resumed in-process) would truncate the first one.
        if _OPENED.get((logdir, suffix)) == int(time.time()):
            time.sleep(1.0 - time.time() % 1.0)
        _OPENED[(logdir, suffix)] = int(time.time())
        self._writer = self._tbx.EventsWriter(os.path.join(logdir, "events"), suffix)
        if purge_step is not None:
            log = self._tbx.event_pb2.SessionLog(status=self._tbx.event_pb2.SessionLog.START)
            self._write(self._tbx.event_pb2.Event(step=purge_step, session_log=log))

    def add_scalar(self, tag: str, value: float, step: int, description: str = "") -> None:
        """A scalar as TensorFlow 2 writes one (a float tensor of the `scalars` plugin), so that
        TensorBoard's fast loader keeps `description` (markdown, behind the chart's info icon; read
        from a tag's first event), which it drops from a TF1 `simple_value`."""
        tensor = self._tbx.tensor_pb2.TensorProto(dtype="DT_FLOAT", float_val=[float(value)])
        self._add_tensor(tag, "scalars", tensor, step, description)

    def add_text(self, tag: str, markdown: str, step: int) -> None:
        """A Text-tab entry under exactly `tag` (tensorboardX's `text` appends '/text_summary')."""
        tensor = self._tbx.tensor_pb2.TensorProto(dtype="DT_STRING", string_val=[markdown.encode()])
        tensor.tensor_shape.dim.add(size=1)
        self._add_tensor(tag, "text", tensor, step)

    def _add_tensor(self, tag: str, plugin: str, tensor: Any, step: int, description: str = "") -> None:
        pb = self._tbx.summary_pb2
        meta = pb.SummaryMetadata(summary_description=description,
                                  plugin_data=pb.SummaryMetadata.PluginData(plugin_name=plugin))  # fmt: skip
        self.add(pb.Summary(value=[pb.Summary.Value(tag=tag, metadata=meta, tensor=tensor)]), step)

    def add_png(self, tag: str, path: str, step: int) -> None:
        """The PNG file at `path`, as written (no decoding and encoding again)."""
        from PIL import Image

        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            width, height, channels = im.width, im.height, len(im.getbands())
        pb = self._tbx.summary_pb2
        image = pb.Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
        self.add(pb.Summary(value=[pb.Summary.Value(tag=tag, image=image)]), step)

    def add_hparams(self, hparams: Mapping[str, Any], step: int) -> None:
        """The HParams tab's session start (its columns are inferred across the runs opened, so
        runs with different keys compare; no experiment summary pins them)."""
        _, start, _ = self._tbx.summary.hparams(dict(hparams), {})
        self.add(start, step)

    def add(self, summary: Any, step: int) -> None:
        self._write(self._tbx.event_pb2.Event(step=step, summary=summary))

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tag_for(key: str, eval_names: Sequence[str] = ("val",)) -> str:
    """The TensorBoard tag of a metrics.jsonl key: `loss` -> train/loss, `val_top1` -> val/top1,
    `NAME_eval_s` -> time/NAME_eval_s, `mfu` -> time/mfu; a key holding a '/' is kept."""
    from jaxres.profiling import TIMING_KEYS  # Here: profiling imports metrics, which imports this.

    if "/" in key:
        return key
    for name in eval_names:
        if key == f"{name}_eval_s":
            return f"time/{key}"
        if key.startswith(f"{name}_"):
            return f"{name}/{key[len(name) + 1 :]}"
    if key in TIMING_KEYS or key in ("img_per_sec", "eta_s"):
        return f"time/{key}"
    return f"train/{key}"


def best_tag(tag: str) -> str:
    """`val/top1` -> `val/best_top1`: the best value so far, beside the metric."""
    group, _, name = tag.rpartition("/")
    return f"{group}/best_{name}" if group else f"best_{name}"


def descriptions(config: Mapping[str, Any], eval_names: Sequence[str]) -> dict[str, str]:
    """What a chart's number is, where it is easy to misread (the info icon of its card)."""
    smoothing = config.get("loss", {}).get("label_smoothing", "config.loss.label_smoothing")
    out = {
        "train/loss": f"Training loss with label smoothing {smoothing} (and Mixup / CutMix when "
        "on), averaged over the steps since the previous log step.",
        "time/mfu": "Model FLOP/s over the device peak: a datasheet figure on a GPU / TPU; on a CPU "
        "the **measured float32 sgemm of this host** (jaxres.flops), raised to the fastest step "
        "rate if a step ever beats it.",
        "time/input_wait": "Share of the step time the device waited for input.",
    }
    evals = config.get("evals") or {}
    for name in eval_names:  # Classification evaluators (few-shot and probes report no loss).
        if (evals.get(name) or {}).get("type", "classification") != "classification":
            continue
        out[f"{name}/loss"] = (f"Cross-entropy on {name} **without label smoothing** (smoothing "
                               f"{smoothing} applies to train/loss only), so it can sit below train/loss.")  # fmt: skip
    return out


def layout(eval_names: Sequence[str]) -> dict[str, dict[str, list]]:
    """The Custom Scalars tab: training and every evaluator of one quantity on one chart."""
    names = "|".join(map(re.escape, eval_names))
    splits = f"train|{names}"
    return {
        "train vs evaluation": {
            "loss (val: no label smoothing)": ["Multiline", [rf"^({splits})/loss$"]],
            "top-1": ["Multiline", [rf"^({splits})/(best_)?top1$"]],
            "top-5": ["Multiline", [rf"^({splits})/top5$"]],
            # Few-shot and linear-probe evaluators: NAME/DATASET/Kshot, NAME/METHOD/N.
            "few-shot and probes": ["Multiline", [rf"^(fewshot|{names})/[^/]+/"]],
        },
        "speed": {
            "images / s": ["Multiline", [r"^time/img_per_sec$"]],
            "seconds per step": ["Multiline", [r"^time/(step_s|data_s|device_s)$"]],
            "MFU and input wait (fractions)": ["Multiline", [r"^time/(mfu|input_wait)$"]],
            "evaluation seconds": ["Multiline", [r"^time/.*_eval_s$"]],
        },
        "results": {
            "evaluate.py top-1": ["Multiline", [r"^evaluate/.*/top1$"]],
            "linear probe top-1": ["Multiline", [r"^probe/.*/top1$"]],
        },
    }


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optimizer": {"base_lr": 0.1}}` -> `{"optimizer.base_lr": 0.1}`; lists as JSON text."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is not None:
            out[name] = value if isinstance(value, (str, bool, int, float)) else json.dumps(value)
    return out


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A markdown table (the Text tab renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def read_config(workdir: str) -> dict[str, Any]:
    """`WORKDIR/config.json` as a dict ({} when there is none: a converted run, a test)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class RunBoard:
    """The TensorBoard half of `metrics.MetricWriter`: grouped scalars, each tag once per step.

    Start-of-session entries (config, hparams, notes, layout) are written with the session's
    first scalars, at a step after `resume_step`, so the purge of a resumed run covers them too.
    """

    def __init__(self, workdir: str, eval_names: Sequence[str] | None = None, resume_step: int | None = None,
                 rows: Sequence[Mapping[str, Any]] = ()):  # fmt: skip
        """Opens the run's event file (written from the first `write` on).

        Args:
          eval_names: the evaluators whose keys `NAME_x` are tagged `NAME/x` (default: those of
            config.json's `evals`, else `val`).
          rows: the metrics.jsonl rows already kept (a resumed run's best and constants).
        """
        self.config = read_config(workdir)
        self.eval_names = tuple(eval_names or (self.config.get("evals") or {}) or ("val",))
        # Runs from before `checkpoint.best_metric` / `best_mode` kept the highest val_top1.
        checkpoint = self.config.get("checkpoint") or {}
        self.best_key = checkpoint.get("best_metric", "val_top1")
        self.best_tag = best_tag(tag_for(self.best_key, self.eval_names))
        mode = checkpoint.get("best_mode") or ("min" if self.best_key.endswith("loss") else "max")
        self._better = min if mode == "min" else max
        self._descriptions = descriptions(self.config, self.eval_names)
        self.events = EventFile(
            logdir(workdir), purge_step=None if resume_step is None else resume_step + 1
        )
        self._started = False
        self._tags_at: tuple[int, set[str]] = (-1, set())  # Tags written at one step.
        self._described: set[str] = set()
        self._constant: dict[
            str, tuple[Any, int]
        ] = {}  # Tag -> (value, last step) while unchanged.
        self._plotted: set[str] = set()  # Constant-prone tags that changed: plotted from then on.
        self._last: dict[str, Any] = {}  # Tag -> last value: the summary.
        self.best: tuple[float, int] | None = None
        for row in rows:  # A resumed run: its best so far and which series are constant.
            self._observe(int(row.get("step", 0)), row, write=False)

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        """One scalar per numeric value of `row` (a metrics.jsonl row), each tag once per step."""
        if not self._started:
            self._start(step)
        self._observe(step, row, write=True)
        self.events.flush()

    def _observe(self, step: int, row: Mapping[str, Any], write: bool) -> None:
        if self._tags_at[0] != step:
            self._tags_at = (step, set())
        written, best_now = self._tags_at[1], False
        for key, value in row.items():
            tag = tag_for(key, self.eval_names)
            # Once per step: a log step and an evaluation at one step both carry `epoch`.
            if (
                key == "step"
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
                or tag in written
            ):
                continue
            written.add(tag)
            self._last[tag] = (value, step)
            if key == self.best_key:
                best_now = True
                if self.best is None or self._better(value, self.best[0]) != self.best[0]:
                    self.best = (value, step)
            if CONSTANT_TAGS.match(tag) and tag not in self._plotted:
                first = self._constant.get(tag)
                if first is None or first[0] == value:
                    self._constant[tag] = (value, step)
                    continue
                self._plotted.add(tag)  # It changed: plot it from its last constant value on.
                del self._constant[tag]
                if write:
                    self._scalar(tag, first[0], first[1])
            if write:
                self._scalar(tag, value, step)
        if write and best_now:
            self._scalar(self.best_tag, self.best[0], step)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        description = "" if tag in self._described else self._descriptions.get(tag, "")
        self._described.add(tag)
        self.events.add_scalar(tag, value, step, description)

    def _start(self, step: int) -> None:
        """The config (HParams and text), what the curves mean, the Custom Scalars layout."""
        self._started = True
        tbx = self.events._tbx
        self.events.add(tbx.summary.custom_scalars(layout(self.eval_names)), step)
        self.events.add_text("run/notes", self.notes(), step)
        if self.config:
            flat = flatten(self.config)
            self.events.add_hparams(flat, step)
            self.events.add_text(
                "run/config", markdown_table(sorted(flat.items()), ("key", "value")), step
            )

    def notes(self) -> str:
        """What the charts mean, where they are easy to misread."""
        lines = [f"* **{tag}**: {text}" for tag, text in self._descriptions.items()]
        lines += [
            f"* **{self.best_tag}**: the best `{self.best_key}` so far (the checkpoint kept as best).",
            (
                "* Constant series (`*/count`, `train/skipped` while 0) are not plotted: run/summary "
                "lists them; one that changes is plotted from its last constant value on."
            ),
            (
                "* Custom Scalars: train and evaluation of one quantity on one chart. HParams: the "
                "resolved config of every run opened, with the last value of each scalar."
            ),
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        """Final values, the best, and the constant series: markdown for run/summary."""
        rows = [(tag, value, step) for tag, (value, step) in sorted(self._last.items())]
        text = markdown_table(rows, ("tag", "last value", "at step"))
        if self.best is not None:
            text = (
                f"Best `{self.best_key}`: **{self.best[0]:.6g}** at step {self.best[1]}.\n\n" + text
            )
        if self._constant:
            constants = ", ".join(
                f"`{tag}` = {value}" for tag, (value, _) in sorted(self._constant.items())
            )
            text += f"\n\nConstant at every step logged (not plotted): {constants}."
        return text

    def close(self) -> None:
        """Writes run/summary at the last step this session wrote (none when it wrote nothing)."""
        if self._started:
            self.events.add_text("run/summary", self.summary(), self._tags_at[0])
        self.events.close()


def log_results(run_dir: str, name: str, step: int, scalars: Mapping[str, float] = {},
                texts: Mapping[str, str] = {}, images: Mapping[str, str] = {}) -> str | None:  # fmt: skip
    """Writes results into a run's TensorBoard at `step`, in an event file of their own that
    replaces an earlier one of the same `name` and step (evaluating again logs each tag once).

    Args:
      run_dir: the run (a training workdir); its events' folder is `logdir(run_dir)`.
      name: what wrote them (the file name's end), e.g. `evaluate-center`.
      scalars / texts / images: tag -> value, markdown, PNG path.

    Returns:
      The folder written, or None when it could not be (a read-only run: said in one line).
    """
    from jaxres.console import log_line

    where = logdir(run_dir)
    suffix = "." + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{int(step)}")
    try:
        for old in glob.glob(os.path.join(where, EVENTS_GLOB)):
            if old.endswith(suffix):
                os.remove(old)
        events = EventFile(where, suffix=suffix)
    except OSError as e:
        log_line(f"Not logged to TensorBoard ({e}); the results above are complete.")
        return None
    try:
        for tag, value in scalars.items():
            events.add_scalar(tag, float(value), step)
        for tag, text in texts.items():
            events.add_text(tag, text, step)
        for tag, path in images.items():
            events.add_png(tag, path, step)
    finally:
        events.close()
    return where


def log_evaluation(results: Mapping[str, Any]) -> str | None:
    """`jaxres.evaluate.evaluate_runs`' result -> the first member's TensorBoard:
    `evaluate/<views>[_ensembleN][_<split>]/{top1,top5,mean_per_class,loss}` and a text table."""
    members = results["members"]
    views = "center" if results["crops"] == 1 else f"{results['crops']}crop"
    kind = views + (f"_ensemble{len(members)}" if len(members) > 1 else "")
    config = read_config(members[0]["run"])
    if results["split"] != (config.get("dataset") or {}).get("val_split", results["split"]):
        kind += f"_{results['split']}"
    keys = ("top1", "top5", "mean_per_class", "loss")
    scalars = {f"evaluate/{kind}/{k}": results[k] for k in keys if k in results}
    rows = [(k, results[k]) for k in (*keys, "count") if k in results]
    rows += [("member", f"{m['run']} step {m['step']} ({m['model']})") for m in members]
    text = f"{results['dataset']} `{results['split']}`, {views}:\n\n" + markdown_table(
        rows, ("", kind)
    )
    return log_results(members[0]["run"], f"evaluate-{kind}", members[0]["step"], scalars,
                       {f"evaluate/{kind}": text})  # fmt: skip


def log_probe(
    results: Mapping[str, Any], table: str, confusion_png: str | None = None
) -> str | None:
    """A protocol's results (`jaxres.transfer.report.results_dict`) -> the backbone run's
    TensorBoard: `probe/<dataset>/<probe>_<N>shot/{top1,mean_per_class}` (means over trials; N
    `all` for every image), the printed table as text, the confusion matrix as an image."""
    dataset, model = results["dataset"]["name"], results["model"]
    scalars = {}
    for method, by_n in results["summary"].items():
        for n, s in by_n.items():
            shots = "all" if str(n) == "0" else f"{n}shot"
            scalars[f"probe/{dataset}/{method}_{shots}/top1"] = s["top1_mean"]
            scalars[f"probe/{dataset}/{method}_{shots}/mean_per_class"] = s["mean_per_class_mean"]
    texts = {f"probe/{dataset}": "```\n" + table + "\n```"}
    images = {f"{IMAGE_GROUP}/probe_confusion_{dataset}": confusion_png} if confusion_png else {}
    return log_results(model["run"], f"probe-{dataset}", model["step"], scalars, texts, images)
