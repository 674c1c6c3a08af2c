"""Test setup: 8 fake CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain and other absl users read flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()

# torchvision / timm load triton, which crashes when TensorFlow was imported first
# (tfds preparation tests import TensorFlow): load them first when installed.
try:
    import torchvision  # noqa: F401, E402
except ImportError:
    pass
