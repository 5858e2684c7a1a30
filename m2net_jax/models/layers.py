"""Pieces both networks share: input normalisation, the stem, the bottleneck's convs (§4.1, §4.4).

The recognizer (§4.1.3) and the policy network's ResNet-10 (Table 2) start the same way: photos in
[0, 1] are normalised here, once, then a stem brings them to the first stage's width. Convolutions
pad symmetrically by (k − 1) // 2, as the PyTorch reference (BlockDrop) does, so spatial sizes are
``floor((H + 2p − k) / s) + 1`` — the formula `m2net_jax.flops` counts with.

`CONV_TYPES` holds the convolutions of the recognizer's bottleneck branch for each backbone of the
paper's compatibility study (§4.4, Fig. 11), all "with the backbone network ResNet": the ResNet
bottleneck (1×1 → 3×3 → 1×1, BN + ReLU after the first two, BN after the last) and its projection
shortcuts stay; only the convolutions inside the branch change:

  standard       dense 1×1, dense 3×3, dense 1×1 (ResNet).
  mobilenet      the 3×3 is depthwise-separable: depthwise 3×3 (carries the stride) then a dense
                 pointwise 1×1 (MobileNet), without BN/ReLU between them (Xception's separable
                 conv; the bottleneck's BN + ReLU follow the pair).
  shufflenet_gG  both 1×1s are grouped (G groups) and the 3×3 is depthwise, with a channel
                 shuffle between the first grouped 1×1 and the depthwise 3×3 — ShuffleNet's unit
                 on the ResNet bottleneck. The shuffle sits at the start of the 3×3 module, after
                 bn1 + ReLU: both act per channel, so shuffling before or after them is the same
                 network with its BN parameters relabelled.
  hetconv_pP     the 3×3 is a HetConv layer: each filter has 3×3 kernels on 1/P of its input
                 channels and 1×1 kernels on the rest (`HetConv`: a grouped 3×3 conv plus a
                 grouped 1×1 conv over each group's complementary channels, no masked kernels).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

# ImageNet RGB statistics: the convention for ResNets trained from scratch on photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stem choices. 'imagenet': 7×7/2 conv + 3×3/2 max-pool, a quarter of the resolution (Table 2 and
# ResNet's); 'small': one 3×3/1 conv, for photos of 64 px or fewer, which the ImageNet stem would
# shrink to a few pixels.
STEMS = ("imagenet", "small")


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric 'same-style' padding of a square kernel, as in PyTorch: (k − 1) // 2 each side."""
    p = (kernel_size - 1) // 2
    return ((p, p), (p, p))


def batch_norm(*, train: bool, dtype: Any, axis_name: str | None):
    """`partial(nn.BatchNorm, ...)` as every BN here uses it: the PyTorch references' settings
    (momentum 0.9 here is 0.1 there, ε = 1e-5), statistics synced over `axis_name` when given."""
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name,
    )


def normalize_images(images, dtype=jnp.float32):
    """(B, H, W, 3) float in [0, 1] → standardised per channel (ImageNet mean/std), in `dtype`."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return ((jnp.asarray(images, jnp.float32) - mean) / std).astype(dtype)


class Stem(nn.Module):
    """The first conv (+ BN + ReLU, + max-pool for 'imagenet') of a ResNet.

    Maps (B, H, W, 3) normalised images to (B, H/4, W/4, features) for 'imagenet' (7×7/2 conv,
    3×3/2 max-pool) or (B, H, W, features) for 'small' (3×3/1 conv).
    """

    features: int
    kind: str = "imagenet"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.axis_name)
        if self.kind == "imagenet":
            x = conv(self.features, (7, 7), strides=(2, 2), padding=padding(7), name="conv")(x)
            x = nn.relu(norm(name="bn")(x))
            return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding(3))
        if self.kind == "small":
            x = conv(self.features, (3, 3), padding=padding(3), name="conv")(x)
            return nn.relu(norm(name="bn")(x))
        raise ValueError(f"Unknown stem {self.kind!r}; choose one of {STEMS}.")


# ----------------------------------------------------------------------------------------------
# The bottleneck's convolutions for each backbone (§4.4). Every module here is built like
# `nn.Conv(features, kernel_size, strides=..., padding=..., use_bias=False, dtype=...)` and maps
# (B, H, W, C_in) → (B, H', W', features), so the bottleneck can take any of them.


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle: (..., C) with C = G·c → channel g·c + j moves to j·G + g.

    After it, every run of G consecutive channels holds one channel of each of the G groups, so a
    following grouped conv sees all groups of the previous one.
    """
    *lead, channels = x.shape
    if channels % groups:
        raise ValueError(f"channel_shuffle: {channels} channels do not split into {groups} groups.")
    x = x.reshape(*lead, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


def _pad_pairs(padding, kernel_size) -> tuple[tuple[int, int], ...]:
    """'VALID', None (symmetric (k − 1) // 2, as `padding`) or explicit (low, high) pairs."""
    if padding == "VALID":
        return tuple((0, 0) for _ in kernel_size)
    if padding is None:
        return tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel_size)
    return tuple(tuple(int(v) for v in pair) for pair in padding)


# Why grouped and depthwise convs are computed by hand below, not with `feature_group_count`:
# on XLA:CPU a grouped convolution (forward + backward) runs several times slower than the *dense*
# conv it replaces (`python -m m2net_jax.bench --suite=quick --parts=convs`; BUILD_NOTES has the
# numbers), which would make the compact backbones the slowest systems of the comparison on a
# CPU. Slicing the channels into G dense convs, and a depthwise conv as k² shifted per-channel
# products, is several times faster there, though still memory-bound: on a CPU these layers do not
# get as fast as their FLOPs say. Parameters keep `nn.Conv(feature_group_count=G)`'s layout: one
# kernel (kh, kw, C_in / G, F), filters of group g being the g-th F / G.


class GroupedConv(nn.Module):
    """k×k conv with `groups` feature groups: (B, H, W, C) → (B, H', W', features).

    Input channels and filters split into G contiguous groups; group g's filters see only input
    group g (as `nn.Conv(feature_group_count=G)`, computed as G dense convs on channel slices).
    """

    features: int
    kernel_size: Sequence[int]
    groups: int = 1
    strides: Sequence[int] = (1, 1)
    padding: Any = None
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        channels, g = x.shape[-1], self.groups
        if channels % g or self.features % g:
            raise ValueError(
                f"{g} groups must divide the input channels ({channels}) and the features "
                f"({self.features})."
            )
        kernel = self.param(
            "kernel",
            nn.linear.default_kernel_init,
            (*self.kernel_size, channels // g, self.features),
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        c, f = channels // g, self.features // g
        outputs = [
            lax.conv_general_dilated(
                x[..., i * c : (i + 1) * c],
                kernel[..., i * f : (i + 1) * f],
                tuple(self.strides),
                _pad_pairs(self.padding, self.kernel_size),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for i in range(g)
        ]
        y = jnp.concatenate(outputs, axis=-1) if g > 1 else outputs[0]
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return y


class DepthwiseConv(nn.Module):
    """Depthwise k×k conv: each channel with its own k×k kernel, (B, H, W, C) → (B, H', W', C).

    Kernel (kh, kw, 1, C), as `nn.Conv(C, feature_group_count=C)`; computed as the sum over the
    k² taps of the padded, strided input shifted by the tap, times that tap's per-channel weights.
    """

    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        sh, sw = self.strides
        kernel = self.param("kernel", nn.linear.default_kernel_init, (kh, kw, 1, x.shape[-1]))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        (top, bottom), (left, right) = _pad_pairs(self.padding, self.kernel_size)
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out_h = (x.shape[1] - kh) // sh + 1
        out_w = (x.shape[2] - kw) // sw + 1
        taps = [
            x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
            * kernel[i, j, 0]
            for i in range(kh)
            for j in range(kw)
        ]
        return sum(taps[1:], taps[0])


class SeparableConv(nn.Module):
    """Depthwise-separable conv (MobileNet): depthwise k×k (stride here) → pointwise 1×1.

    (B, H, W, C) → (B, H', W', features) at 2·H'·W'·(k²·C + C·features) FLOPs instead of
    2·H'·W'·k²·C·features. No BN or ReLU between the two (as Xception's separable conv), so the
    module stays a drop-in conv; the bottleneck's bn2 + ReLU follow it.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = None
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = DepthwiseConv(
            self.kernel_size, self.strides, self.padding, dtype=self.dtype, name="depthwise"
        )(x)
        return nn.Conv(
            self.features, (1, 1), use_bias=self.use_bias, dtype=self.dtype, name="pointwise"
        )(x)


class ShuffledDepthwiseConv(nn.Module):
    """ShuffleNet's middle: channel shuffle over `groups`, then a depthwise k×k conv.

    (B, H, W, C) → (B, H', W', C): a depthwise conv keeps the width, so `features` must equal C
    (it does in the bottleneck, whose 3×3 maps the bottleneck width to itself).
    """

    features: int
    kernel_size: Sequence[int]
    groups: int = 1
    strides: Sequence[int] = (1, 1)
    padding: Any = None
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        if self.features != channels or self.use_bias:
            raise ValueError(
                f"A depthwise conv keeps the width and has no bias here: features="
                f"{self.features}, {channels} input channels, use_bias={self.use_bias}."
            )
        x = channel_shuffle(x, self.groups)
        return DepthwiseConv(
            self.kernel_size, self.strides, self.padding, dtype=self.dtype, name="depthwise"
        )(x)


def complement_groups(parts: int) -> np.ndarray:
    """(P, P − 1) int: row g lists the channel groups other than g, from g + 1 on (mod P)."""
    return (np.arange(parts)[:, None] + np.arange(1, parts)[None, :]) % parts


class HetConv(nn.Module):
    """Heterogeneous-kernel conv (HetConv, Singh et al. 2019) with part P, without masked kernels.

    Each output filter has k×k kernels on 1/P of its input channels and 1×1 kernels on the other
    (P − 1)/P. Input channels and filters are split into P contiguous groups; the filters of group
    g take their k×k kernels on input group g and 1×1 kernels on every other group. Computed as

      conv3x3: a k×k conv with P feature groups (group g → filters of group g), plus
      conv1x1: a 1×1 conv with P feature groups over the gathered complement: for each g, the
               P − 1 input groups other than g (`complement_groups`), concatenated — a
               (B, H, W, (P − 1)·C) tensor — so group g's filters see exactly those channels.

    Both carry the stride (a 1×1/s conv with no padding and a k×k/s conv with padding (k − 1)/2
    give the same output size). FLOPs are HetConv's 2·H'·W'·F·C·(k² + P − 1)/P, every weight a
    real parameter. HetConv's paper shifts the k×k channels from one filter to the next; that
    pattern too splits the filters into P classes with disjoint k×k channel sets, so it is this
    layer up to a relabelling of channels, which a learned network does not notice.
    """

    features: int
    kernel_size: Sequence[int]
    parts: int = 2
    strides: Sequence[int] = (1, 1)
    padding: Any = None
    use_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        *lead, channels = x.shape
        p = self.parts
        if p < 2 or channels % p or self.features % p:
            raise ValueError(
                f"HetConv with P={p} needs P >= 2 dividing both the input channels ({channels}) "
                f"and the features ({self.features})."
            )
        conv = functools.partial(
            GroupedConv, self.features, groups=p, strides=self.strides, dtype=self.dtype
        )
        spatial = conv(self.kernel_size, padding=self.padding, name="conv3x3")(x)
        grouped = x.reshape(*lead, p, channels // p)
        complement = grouped[..., complement_groups(p), :].reshape(*lead, (p - 1) * channels)
        pointwise = conv((1, 1), padding="VALID", use_bias=self.use_bias, name="conv1x1")
        return spatial + pointwise(complement)


@dataclasses.dataclass(frozen=True)
class BottleneckConvs:
    """The convolutions of one backbone's bottleneck branch (`Recognizer.conv_type`).

    Attributes:
      conv1x1: module for the branch's two 1×1 convs (conv1 reduces, conv3 expands).
      conv3x3: module for its 3×3 conv (conv2, which carries the stage's stride).
      groups: the recognizer's width must be a multiple of this (grouped convs split channels).
    """

    conv1x1: Callable[..., nn.Module]
    conv3x3: Callable[..., nn.Module]
    groups: int = 1


def _shufflenet(groups: int) -> BottleneckConvs:
    return BottleneckConvs(
        conv1x1=functools.partial(GroupedConv, groups=groups),
        conv3x3=functools.partial(ShuffledDepthwiseConv, groups=groups),
        groups=groups,
    )


def _hetconv(parts: int) -> BottleneckConvs:
    return BottleneckConvs(nn.Conv, functools.partial(HetConv, parts=parts), groups=parts)


# Name → the bottleneck's convs (`Recognizer.conv_type`; the backbones of §4.4, Fig. 11; see the
# module docstring). `m2net_jax.flops` counts each entry's FLOPs (CONV1X1_FLOPS, CONV3X3_FLOPS).
CONV_TYPES = {
    "standard": BottleneckConvs(nn.Conv, nn.Conv),
    "mobilenet": BottleneckConvs(nn.Conv, SeparableConv),
    "shufflenet_g2": _shufflenet(2),
    "shufflenet_g4": _shufflenet(4),
    "hetconv_p2": _hetconv(2),
    "hetconv_p4": _hetconv(4),
}
