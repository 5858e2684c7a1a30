"""Pieces both networks share: input normalisation, the stem, the 3×3 conv choices (§4.1).

The recognizer (§4.1.3) and the policy network's ResNet-10 (Table 2) start the same way: photos in
[0, 1] are normalised here, once, then a stem brings them to the first stage's width. Convolutions
pad symmetrically by (k − 1) // 2, as the PyTorch reference (BlockDrop) does, so spatial sizes are
``floor((H + 2p − k) / s) + 1`` — the formula `m2net_jax.flops` counts with.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# ImageNet RGB statistics: the convention for ResNets trained from scratch on photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stem choices. 'imagenet': 7×7/2 conv + 3×3/2 max-pool, a quarter of the resolution (Table 2 and
# ResNet's); 'small': one 3×3/1 conv, for photos of 64 px or fewer, which the ImageNet stem would
# shrink to a few pixels.
STEMS = ("imagenet", "small")

# Name → module for the 3×3 conv inside a bottleneck (`Recognizer.conv_type`). An entry is built
# like `nn.Conv(features, kernel_size, strides=..., padding=..., use_bias=False, dtype=...)` and
# maps (B, H, W, C_in) → (B, H', W', features). The paper's Fig. 11 swaps in the convs of
# MobileNet, ShuffleNet and HetConv here; `m2net_jax.flops` must learn each new entry's cost.
CONV_TYPES = {"standard": nn.Conv}


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
