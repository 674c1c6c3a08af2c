r"""Import pretrained weights from a local file into a jaxres run directory.

    python scripts/convert_weights.py --source keras --model ResNet50V2 \
        --input resnet50v2_weights_tf_dim_ordering_tf_kernels.h5 --output runs/keras_r50v2
    python scripts/convert_weights.py --source timm --model resnetv2_50x1_bit \
        --input model.safetensors --output runs/bit_r50x1
    python scripts/evaluate.py --workdir runs/bit_r50x1

Sources: keras (.h5 / .weights.h5 / .keras), timm and torchvision (.pth / .pt / .bin /
.safetensors state dicts), bit_npz (the BiT release .npz). Nothing is downloaded.
The output holds config.json (model, class count, normalisation of the source) and
checkpoints/ (step 0), usable by evaluate.py, predict.py, linear_probe.py and
--config.init_from. See jaxres/convert/importer.py for the layouts and checks.
"""

from absl import app, flags

from jaxres import cli

flags.DEFINE_enum(
    "source", None, ["keras", "timm", "torchvision", "bit_npz"], "Where the weights come from."
)
flags.DEFINE_string(
    "model", None, "The source's model name: resnet50, resnetv2_50x1_bit, ResNet50V2, ..."
)
flags.DEFINE_string("input", None, "The local weights file.")
flags.DEFINE_string("output", None, "The run directory to write (must not hold checkpoints yet).")
flags.DEFINE_string(
    "class_names", None, "Optional text file with one class name per line, in head order."
)
flags.DEFINE_integer("image_size", 224, "Input size recorded in config.json (dataset.image_size).")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres.convert import importer

        names = importer.read_class_names(f.class_names) if f.class_names else None
        converted = importer.convert(f.source, f.model, f.input)
        output = importer.save_run(converted, f.output, f.image_size, names)
        arch = converted.architecture
        print(
            f"Wrote {output}: {arch.model} {arch.overrides or ''} "
            f"with {converted.num_classes} classes "
            f"from {f.source} {f.model}; preprocessing {arch.preprocessing}. "
            f"Evaluate: python scripts/evaluate.py --workdir {output}",
            flush=True,
        )


if __name__ == "__main__":
    flags.mark_flags_as_required(["source", "model", "input", "output"])
    app.run(main, flags_parser=cli.parse_flags)
