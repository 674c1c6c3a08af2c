"""One configurable ResNet (NHWC, Flax linen): v1.5, v2 pre-activation, SE, BN or GN+WS.

Every registered variant (`registry.py`) is this single `ResNet` module with different
fields, in the spirit of timm `resnetv2.py`: the residual block, norm, convolution and
activation are arguments, not copies.

* ResNet v1.5 (torchvision layout): conv-norm-act stem + max-pool, post-activation
  blocks, stride on the 3x3 conv, downsample = strided 1x1 conv + norm.
* ResNetV2 (He et al. 2016, "Identity Mappings in Deep Residual Networks", timm layout):
  conv-only stem + max-pool, pre-activation blocks whose projection shortcut reads the
  pre-activated input, and a final norm + act before pooling.
* BiT (Kolesnikov et al. 2020): ResNetV2 with GroupNorm(32) and weight-standardised convs.
* Squeeze-and-Excitation (Hu et al. 2018) on either family, after the branch's last
  conv/norm and before the residual add (timm `SEModule`).
* Stochastic depth (Huang et al. 2016), as timm `drop_path`: in training each example
  drops a block's residual branch with that block's rate, rising linearly from 0 at the
  first block to `drop_path_rate` at the last; kept branches are scaled by 1 / keep.
* Keras Applications layouts, as options of the same module (see `jaxres.convert`):
  ResNet v1 (`stride_in_1x1`, biases on every conv) and ResNetV2 (`stride_block="last"`,
  biases on the convs that write to the residual stream), BatchNorm epsilon 1.001e-5.

Parameters are always float32; `dtype` only sets the compute dtype. Norm statistics are
reduced in float32, and pooled features and logits are returned in float32.

Parameter names are fixed so that weight import can map timm / torchvision / Keras /
BiT checkpoints onto them::

    stem_conv, stem_norm (v1.5 only)
    stage{s}_block{b}/{norm1, conv1, norm2, conv2, norm3, conv3,
                       downsample_conv, downsample_norm (v1.5 only), se/{fc1, fc2}}
    final_norm (pre-activation only), head
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxres.errors import ConfigError, unknown_name
from jaxres.models import batchnorm, cpu_conv, cpu_pool

ModuleDef = Any
Dtype = Any

BLOCK_TYPES = ("basic", "bottleneck")
NORM_TYPES = ("batch", "group")
# "default": 7x7/2 conv (pad 3) + 3x3/2 max-pool (pad 1), as PyTorch / timm ''.
# "fixed": BiT; 7x7/2 conv (pad 3), zero pad 1, then 3x3/2 max-pool without padding.
# "same": TF-style input-size dependent 'SAME' padding for conv and pool (ViT hybrids).
# "cifar": 3x3/1 conv and no pool, for 32x32 images.
STEM_TYPES = ("default", "fixed", "same", "cifar")
# Which convs have a bias. "none": PyTorch / timm / BiT. "all": Keras ResNet v1.
# "residual": only the convs that write to the residual stream (stem, projection and
# the last conv of each branch), as Keras ResNetV2; its other convs feed a norm.
CONV_BIAS = ("none", "all", "residual")
# Which block of a stage strides. "first": the first block of stages 2.. (He et al.,
# torchvision, timm). "last": the last block of every stage but the last (TF-slim and
# Keras ResNetV2); its shortcut subsamples the input when the width does not change.
STRIDE_BLOCKS = ("first", "last")
# Output channels of a block are `width * expansion`.
EXPANSION = {"basic": 1, "bottleneck": 4}
# BiT / timm `resnetv2_*_bit` standardise conv kernels with this epsilon.
WEIGHT_STD_EPS = 1e-8

# torchvision / timm initialise convs with kaiming_normal_(mode="fan_out"): an
# untruncated normal with variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Rounds a channel count to a multiple of `divisor`, as timm `make_divisible`.

    Args:
      value: the unrounded channel count.
      divisor: the multiple to round to; the result is at least `divisor`.
      round_limit: if rounding lost more than `1 - round_limit` of `value`, add one
        `divisor`; 0 disables that correction (timm SE modules use 0).

    Returns:
      The rounded channel count.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Symmetric padding, as PyTorch, Keras (ZeroPadding2D) and BiT use; flax's 'SAME'
    # pads (0, 1) for a stride-2 conv on even inputs, which would misalign imported
    # weights by one pixel.
    pad = kernel // 2
    return ((pad, pad), (pad, pad))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Zeroes whole examples of `x` with probability `rate`; scales the kept ones by 1 / keep.

    timm `drop_path(scale_by_keep=True)`: one Bernoulli(1 - rate) draw per example (axis 0),
    so the expectation over draws is `x`.

    Args:
      x: a batch [N, ...] (a residual branch).
      rate: drop probability in [0, 1).
      rng: the PRNG key of the draw.
    """
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def standardize(kernel: jax.Array, eps: float = WEIGHT_STD_EPS) -> jax.Array:
    """Weight standardisation: zero mean, unit variance per output channel (HWIO)."""
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Conv):
    """`nn.Conv` whose kernel is weight-standardised on every call (Qiao et al., BiT).

    The stored parameter stays the raw kernel, so checkpoints hold what BiT / timm
    `StdConv2d` store; standardising happens in float32 before the compute-dtype cast.
    """

    def param(self, name: str, *args: Any, **kwargs: Any) -> Any:
        value = super().param(name, *args, **kwargs)
        if name == "kernel":
            value = standardize(value)
        return value


class SqueezeExcite(nn.Module):
    """timm `SEModule`: avg-pool -> 1x1 conv (bias) -> act -> 1x1 conv (bias) -> sigmoid.

    The 1x1 convs on a 1x1 map are written as `Dense` layers (same parameters).

    Attributes:
      reduced: channels of the bottleneck (timm: `make_divisible(C / 16, 8, 0)`).
      act: activation between the two layers.
      dtype: compute dtype.
    """

    reduced: int
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        # Pool in float32: a bf16 mean over 56x56 values loses most of its mantissa.
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        s = self.act(dense(self.reduced, name="fc1")(s))
        gate = nn.sigmoid(dense(channels, name="fc2")(s))
        return x * gate[:, None, None, :].astype(x.dtype)


class ResidualBlock(nn.Module):
    """A residual block: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1); pre- or post-act.

    Post-activation (v1.5): conv-norm-act ... conv-norm [-SE] + shortcut -> act; the
    projection shortcut is conv + norm on the block input.
    Pre-activation (v2): norm-act-conv ... norm-act-conv [-SE] + shortcut; the projection
    shortcut is a bare conv on the pre-activated input (timm `PreActBottleneck`).
    The stride sits on the 3x3 conv (on the first 1x1 with `stride_in_1x1`); a projection
    is used when the width changes, or the stride unless `subsample_shortcut`.

    Attributes:
      width: channels of the inner convs; the block outputs `width * EXPANSION[block]`.
      strides: spatial stride of the block.
      block: "basic" or "bottleneck".
      preact: pre-activation (v2) instead of post-activation (v1.5).
      conv: conv constructor (e.g. a partial of `nn.Conv` or `StdConv`).
      conv_bias: one of `CONV_BIAS`: which of the block's convs get a bias.
      norm: norm constructor (a partial of `batchnorm.BatchNorm` or `nn.GroupNorm`).
      act: activation function.
      se_reduced: channels of the SE bottleneck, or None for no SE.
      zero_init_last: start the residual branch at zero (last norm scale for v1.5, last
        conv kernel for v2, which has no norm after it, as timm does).
      stride_in_1x1: stride on the first 1x1 conv of a bottleneck (original ResNet v1,
        Caffe, Keras) instead of the 3x3 (v1.5).
      subsample_shortcut: a strided block of unchanged width takes every `strides`-th
        input pixel as its shortcut (Keras `MaxPooling2D(1, strides)`) instead of a
        projection.
      drop_path: stochastic-depth rate of this block's residual branch (after SE, before
        the add); applied only with `train=True`, drawing from the "dropout" rng stream.
      dtype: compute dtype.
    """

    width: int
    strides: int
    block: str
    preact: bool
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    se_reduced: int | None = None
    zero_init_last: bool = False
    conv_bias: str = "none"
    stride_in_1x1: bool = False
    subsample_shortcut: bool = False
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The block's output; `train` only decides stochastic depth (the norm partial
        already carries train / eval for the norms)."""
        out = self.width * EXPANSION[self.block]
        if self.block == "bottleneck" and self.stride_in_1x1:
            specs = [(1, self.strides, self.width), (3, 1, self.width), (1, 1, out)]
        elif self.block == "bottleneck":
            specs = [(1, 1, self.width), (3, self.strides, self.width), (1, 1, out)]
        else:
            specs = [(3, self.strides, out), (3, 1, out)]
        project = x.shape[-1] != out or (self.strides != 1 and not self.subsample_shortcut)
        last = len(specs)
        # v2 has no norm after the last conv, so its branch is zeroed through the kernel.
        zero_conv = self.zero_init_last and self.preact
        zero_norm = self.zero_init_last and not self.preact

        def conv(i: int, kernel: int, stride: int, features: int) -> ModuleDef:
            init = {"kernel_init": nn.initializers.zeros} if zero_conv and i == last else {}
            return self.conv(
                features,
                (kernel, kernel),
                strides=(stride, stride),
                padding=_padding(kernel),
                use_bias=self.conv_bias == "all" or (self.conv_bias == "residual" and i == last),
                name=f"conv{i}",
                **init,
            )

        def downsample_conv() -> ModuleDef:
            return self.conv(
                out,
                (1, 1),
                strides=(self.strides, self.strides),
                padding="VALID",
                use_bias=self.conv_bias != "none",
                name="downsample_conv",
            )

        shortcut = x
        if not project and self.strides != 1:
            shortcut = x[:, :: self.strides, :: self.strides]
        if self.preact:
            y = self.act(self.norm(name="norm1")(x))
            if project:
                shortcut = downsample_conv()(y)
            for i, (kernel, stride, features) in enumerate(specs, start=1):
                if i > 1:
                    y = self.act(self.norm(name=f"norm{i}")(y))
                y = conv(i, kernel, stride, features)(y)
        else:
            if project:
                shortcut = self.norm(name="downsample_norm")(downsample_conv()(x))
            y = x
            for i, (kernel, stride, features) in enumerate(specs, start=1):
                y = conv(i, kernel, stride, features)(y)
                init = {"scale_init": nn.initializers.zeros} if zero_norm and i == last else {}
                y = self.norm(name=f"norm{i}", **init)(y)
                if i < last:
                    y = self.act(y)

        if self.se_reduced:
            y = SqueezeExcite(self.se_reduced, act=self.act, dtype=self.dtype, name="se")(y)
        if train and self.drop_path > 0:
            y = drop_path(y, self.drop_path, self.make_rng("dropout"))
        y = y + shortcut
        return y if self.preact else self.act(y)


class ResNet(nn.Module):
    """A ResNet image classifier; the defaults are timm `resnetv2_50`.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for depth 50.
      block: "basic" (depth 18/34) or "bottleneck".
      num_classes: head outputs; 0 means no head (logits are the pooled features).
      preact: pre-activation ResNetV2 blocks and stem (True) or v1.5 (False).
      width_factor: multiplies every width (BiT x1, x2, x3, x4).
      stem_width: stem output channels before `width_factor`.
      widths: inner width of each stage before `width_factor`; a stage outputs
        `width * EXPANSION[block]` channels.
      stem_type: one of `STEM_TYPES` (see there).
      norm: "batch" (BatchNorm, state in `batch_stats`) or "group" (GroupNorm).
      norm_eps: epsilon of every norm (Keras BN uses 1.001e-5).
      norm_momentum: BatchNorm running-average decay (0.9 == PyTorch momentum 0.1).
      norm_groups: GroupNorm groups.
      weight_std: weight-standardised convs (BiT).
      conv_bias: which convs have a bias, one of `CONV_BIAS` ("none"; Keras: "all" for
        v1, "residual" for v2).
      stride_block: which block of a stage strides, one of `STRIDE_BLOCKS` ("last":
        Keras ResNetV2, whose "stage1".."stage3" features are then at half the usual size).
      stride_in_1x1: bottleneck stride on the first 1x1 conv (original v1 / Keras ResNet).
      se_ratio: Squeeze-and-Excitation reduction (1/16 for SE-ResNet), None for no SE.
      final_norm: norm + act after the last stage (ResNetV2 has it, v1.5 does not).
      zero_init_last: start each residual branch at zero (see `ResidualBlock`).
      head_zero_init: zero-init the head kernel (BiT); otherwise normal(0.01) as timm.
      head_layer: what the head reads: "pre_logits" (the pooled output of the last stage),
        or "stem" / "stageN", pooled, with the later stages not built (a probe exported
        from that layer, `jaxres.transfer.export`).
      head_hidden: 0 for a linear head; else a hidden Dense of this width + ReLU before it
        (an exported MLP probe).
      drop_path_rate: stochastic depth of the last block; block i of N (counted over all
        stages) gets `drop_path_rate * i / (N - 1)` (timm). Training only: it changes no
        parameter, and a train-mode apply with a rate > 0 needs `rngs={"dropout": key}`.
      act: activation function.
      dtype: compute dtype; parameters are float32 regardless.
      cpu_conv: how convolutions run on CPU, one of `cpu_conv.BACKENDS` ("onednn": oneDNN's
        kernels for float32, "matmul": XLA's forward + a matmul backward, "xla": XLA's own ops,
        the stem's max pool included, see cpu_pool.py); the result is the same (to float
        rounding) and other platforms ignore it.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    num_classes: int = 1000
    preact: bool = True
    width_factor: int = 1
    stem_width: int = 64
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_type: str = "default"
    norm: str = "batch"
    norm_eps: float = 1e-5
    norm_momentum: float = 0.9
    norm_groups: int = 32
    weight_std: bool = False
    conv_bias: str = "none"
    stride_block: str = "first"
    stride_in_1x1: bool = False
    se_ratio: float | None = None
    final_norm: bool = True
    zero_init_last: bool = False
    head_zero_init: bool = True
    head_layer: str = "pre_logits"
    head_hidden: int = 0
    drop_path_rate: float = 0.0
    act: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Dtype = jnp.float32
    cpu_conv: str = "onednn"

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("block", self.block, BLOCK_TYPES),
            ("norm", self.norm, NORM_TYPES),
            ("stem_type", self.stem_type, STEM_TYPES),
            ("conv_bias", self.conv_bias, CONV_BIAS),
            ("stride_block", self.stride_block, STRIDE_BLOCKS),
            ("cpu_conv", self.cpu_conv, cpu_conv.BACKENDS),
        ):
            if value not in valid:
                raise ConfigError(unknown_name(f"ResNet {field}", value, valid))
        if len(self.stage_sizes) != len(self.widths):
            raise ConfigError(
                f"ResNet stage_sizes {tuple(self.stage_sizes)} and widths "
                f"{tuple(self.widths)} must have the same length (one per stage)."
            )
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}.")
        layers = ("pre_logits", "stem") + tuple(f"stage{s}" for s in range(1, len(self.stage_sizes) + 1))
        if self.head_layer not in layers:
            raise ConfigError(unknown_name("ResNet head_layer", self.head_layer, layers))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"ResNet drop_path_rate (config.model.drop_path_rate) must be in [0, 1), got "
                f"{self.drop_path_rate}; e.g. 0.05 (RSB A1 / A2)."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Classifies a batch of images.

        Args:
          x: float images [N, H, W, C], already normalised.
          train: use batch statistics and update `batch_stats` (apply with
            `mutable=["batch_stats"]` for BatchNorm models), and drop residual branches
            when `drop_path_rate` > 0 (apply with `rngs={"dropout": key}`).

        Returns:
          `(logits, features)`: float32 logits [N, num_classes] ([N, C] when
          num_classes == 0) and a dict with "stem", "stage1".."stage4" (NHWC, compute
          dtype; for pre-activation "stage4" is before the final norm), "pre_logits"
          (pooled, [N, C], float32) and "logits". With a `head_layer` other than
          "pre_logits", the layers after it are absent and "pre_logits" is that layer pooled.
        """
        conv = functools.partial(
            StdConv if self.weight_std else nn.Conv,
            use_bias=self.conv_bias != "none",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=conv_kernel_init,
            # On CPU only, oneDNN's convolutions or XLA's forward + a matmul backward (GPUs
            # keep cuDNN's), see cpu_conv.py.
            conv_general_dilated=functools.partial(cpu_conv.conv, backend=self.cpu_conv),
        )
        if self.norm == "batch":
            norm = functools.partial(
                # flax's BatchNorm with a closed-form gradient on CPU (batchnorm.py).
                batchnorm.BatchNorm,
                use_running_average=not train,
                momentum=self.norm_momentum,
                epsilon=self.norm_eps,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                force_float32_reductions=True,
            )
        else:
            norm = functools.partial(
                nn.GroupNorm,
                num_groups=self.norm_groups,
                epsilon=self.norm_eps,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                force_float32_reductions=True,
                # Two-pass variance: E[x^2] - E[x]^2 cancels badly on the pre-activation
                # residual stream, whose mean is large (10x the error of timm on BiT).
                use_fast_variance=False,
            )

        needs_rng = train and self.drop_path_rate > 0 and not self.is_initializing()
        if needs_rng and not self.has_rng("dropout"):
            # Flax would otherwise fall back to the "params" stream, or fail inside a block.
            raise ValueError(
                f"ResNet drop_path_rate={self.drop_path_rate} draws stochastic depth in training: "
                'apply it with rngs={"dropout": key} (or train=False).'
            )
        features = {}
        x = self._stem(x, conv, norm)
        features["stem"] = x
        if self.head_layer != "pre_logits":
            if self.head_layer != "stem":
                x = self._stages(x, conv, norm, features, train)
            return self._head(x, features)
        x = self._stages(x, conv, norm, features, train)
        if self.final_norm:
            x = self.act(norm(name="final_norm")(x))
        return self._head(x, features)

    def block_drop_rates(self) -> list[list[float]]:
        """Each block's stochastic-depth rate, per stage: a linear ramp from 0 at the first
        block to `drop_path_rate` at the last, over all stages (timm resnet / resnetv2)."""
        total = sum(self.stage_sizes)
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(self.stage_sizes[:s]) for s in range(len(self.stage_sizes))]
        return [rates[a : a + n] for a, n in zip(starts, self.stage_sizes, strict=True)]

    def _stages(
        self, x: jax.Array, conv: ModuleDef, norm: ModuleDef, features: dict, train: bool
    ) -> jax.Array:
        """The residual stages (up to `head_layer` when that is a stage); records each output."""
        drop_rates = self.block_drop_rates()
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True), start=1):
            width = width * self.width_factor
            out = width * EXPANSION[self.block]
            se_reduced = (
                make_divisible(out * self.se_ratio, 8, round_limit=0.0) if self.se_ratio else None
            )
            for b in range(1, size + 1):
                if self.stride_block == "first":
                    strided = s > 1 and b == 1
                else:
                    strided = s < len(self.stage_sizes) and b == size
                x = ResidualBlock(
                    width=width,
                    strides=2 if strided else 1,
                    block=self.block,
                    preact=self.preact,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    se_reduced=se_reduced,
                    zero_init_last=self.zero_init_last,
                    conv_bias=self.conv_bias,
                    stride_in_1x1=self.stride_in_1x1,
                    subsample_shortcut=self.stride_block == "last",
                    drop_path=drop_rates[s - 1][b - 1],
                    dtype=self.dtype,
                    name=f"stage{s}_block{b}",
                )(x, train)
            features[f"stage{s}"] = x
            if self.head_layer == f"stage{s}":
                break
        return x

    def _head(self, x: jax.Array, features: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Global average pool, then the (linear or one-hidden-layer) classifier, in float32."""
        # Pool and classify in float32: cheap, and keeps the logits exact for the loss.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        if self.num_classes and self.head_hidden:
            x = nn.relu(nn.Dense(self.head_hidden, dtype=jnp.float32, param_dtype=jnp.float32, name="head_hidden")(x))
        if self.num_classes:
            x = nn.Dense(
                self.num_classes,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=(
                    nn.initializers.zeros if self.head_zero_init else nn.initializers.normal(0.01)
                ),
                name="head",
            )(x)
        features["logits"] = x
        return x, features

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        width = self.stem_width * self.width_factor
        if self.stem_type == "cifar":
            x = conv(width, (3, 3), padding=_padding(3), name="stem_conv")(x)
        else:
            padding = "SAME" if self.stem_type == "same" else _padding(7)
            x = conv(width, (7, 7), strides=(2, 2), padding=padding, name="stem_conv")(x)
        # Pre-activation nets normalise the stem output in the first block's norm1.
        if not self.preact:
            x = self.act(norm(name="stem_norm")(x))
        # On CPU the pool's gradient is a tap mask (cpu_pool.py); "xla" keeps the plain op.
        max_pool = nn.max_pool if self.cpu_conv == "xla" else cpu_pool.max_pool
        if self.stem_type == "default":
            # max_pool pads with -inf, as PyTorch's MaxPool2d(padding=1) does.
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem_type == "fixed":
            # BiT pads with zeros (not -inf): that matters for the un-activated v2 stem.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            x = max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        elif self.stem_type == "same":
            x = max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        return x


def config_fields() -> list[str]:
    """Names of the `ResNet` fields a config or `create_model` override may set."""
    return [
        f.name for f in dataclasses.fields(ResNet) if f.init and f.name not in ("parent", "name")
    ]
