r"""Export a run's weights: timm / torchvision state dicts, or a self-contained jax.export file.

    python scripts/export_weights.py --workdir runs/r50 --checkpoint best \
        --format torchvision --output exports/r50.safetensors
    python scripts/export_weights.py --workdir runs/bit --format timm --output exports/bit.pth
    python scripts/export_weights.py --workdir runs/r50 --format jax_export \
        --output exports/r50.bin [--saved_model exports/r50_savedmodel]

timm / torchvision: a state dict (.safetensors, or .pth / .pt / .bin) that
`timm.create_model(NAME, pretrained=False, num_classes=C)` / `torchvision.models.NAME(
num_classes=C)` load with strict=True; only models that library has (same name, no
jaxres-only options) export. jax_export: uint8 RGB images [b, H, W, 3] -> float32 logits,
normalisation and weights inside; `jax.export.deserialize` runs it without jaxres.
Beside FILE, FILE's name with .json: twin name, class names, preprocessing, source run.
See jaxres/convert/exporter.py.
"""

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("workdir", None, "The run directory (config.json + checkpoints/).")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (highest val_top1) or a step number.")
flags.DEFINE_string("format", None, "timm | torchvision | jax_export.")
flags.DEFINE_string("output", None, "The file to write; its .json is written beside it.")
flags.DEFINE_string("dtype", "float32", "jax_export: compute dtype (float32 | bfloat16).")
flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "jax_export: platforms it runs on.")
flags.DEFINE_string(
    "saved_model", None, "jax_export: also write a TF SavedModel (jax2tf) to this directory."
)


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import runs
        from jaxres.convert import exporter

        meta = exporter.export(
            f.workdir,
            f.format,
            f.output,
            checkpoint=runs.parse_checkpoint(f.checkpoint),
            dtype=f.dtype,
            platforms=f.platforms,
            saved_model=f.saved_model,
        )
        print(
            f"Wrote {', '.join(meta['files'])}: {meta['format']} {meta['model']} with "
            f"{meta['num_classes']} classes, from {meta['source_run']} step {meta['step']}.",
            flush=True,
        )


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "format", "output"])
    app.run(main, flags_parser=cli.parse_flags)
