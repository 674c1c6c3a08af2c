"""A model at a glance: `python scripts/model_info.py --model resnetv2_50 [--image_size 224]`.

    python scripts/model_info.py --model resnetv2_50 --image_size 224 --batch_size 64
    python scripts/model_info.py --workdir runs/demo          # a run's model, classes and image size

Prints parameters and forward GFLOPs per stage (counted: 2 x multiply-adds of every
convolution and matmul), the output shape of each named layer (what
--config.features.layer accepts), XLA's cost analysis of the forward and forward + backward
passes, and the activation memory per example at --batch_size. --noxla skips the two
compiles (seconds to a minute on a CPU) and prints the counts only.
"""

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("model", None, "A registered model name (see jaxres.models.list_models()).")
flags.DEFINE_string(
    "workdir", None, "A run directory: its model, overrides, classes and image size."
)
flags.DEFINE_integer("image_size", None, "Input height = width (default: 224, or the run's).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head (with --model).")
flags.DEFINE_string(
    "dtype", None, "Compute dtype (default: the training default bfloat16, or the run's)."
)
flags.DEFINE_integer("batch_size", 32, "Batch size at which the activation memory is measured.")
flags.DEFINE_bool(
    "xla", True, "Also XLA's FLOPs and the activation memory (compiles forward + backward)."
)


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import config_base, model_info, runs
        from jaxres.errors import ConfigError

        if bool(f.model) == bool(f.workdir):
            raise ConfigError("Pass --model NAME or --workdir RUN (one of them).")
        config = runs.read_config(f.workdir) if f.workdir else config_base.base_config()
        if f.model:
            config.model.name, config.dataset.num_classes = f.model, f.num_classes
            config.dataset.image_size = 224
        config.dataset.image_size = f.image_size or config.dataset.image_size
        config.model.dtype = f.dtype or config.model.dtype
        model = runs.build_model(config)
        info = model_info.summarize(model, config.dataset.image_size, f.batch_size, f.xla)
        print(model_info.format_summary(config.model.name, info, config.model.dtype))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
