"""The recognition network: a bottleneck ResNet whose blocks a policy can drop (§4.1.3).

ResNet-29/47/65 are a stem, three stages of n bottleneck blocks (1×1 → 3×3 → 1×1, output 4× the
bottleneck width) and a linear classifier; depth = stem conv + 3·3n convs + classifier. Each block
n takes a per-photo keep decision p_n ∈ {0, 1}, with BlockDrop's semantics:

    shortcut = downsample(x) if n is the first block of its stage else x
    x ← p_n · relu(shortcut + F_n(x)) + (1 − p_n) · shortcut

so a dropped first-of-stage block still changes the shape through its downsample, and an
all-ones policy is a plain ResNet.

Besides `__call__`, the pieces are methods so that code which *skips* dropped blocks (rather than
masking them) can run them one at a time with `Recognizer.apply(variables, ..., method=...)`:
`embed` (normalise + stem), `block` (one gated block), `shortcut` (what a dropped block computes:
the downsample or the identity) and `head` (pool + classifier). For example, for one photo,

    keep = policy[0, n]
    x = jax.lax.cond(keep, lambda: model.apply(v, x, 1.0, n, method="block"),
                     lambda: model.apply(v, x, n, method="shortcut"))

gives the same activations as the masked `__call__`, without computing F_n when it is dropped.

`conv_type` swaps the convolutions of every bottleneck branch for a compact backbone's (§4.4,
`layers.CONV_TYPES`). `geo_conditioning=True` is M²Net+ (beyond the paper): the photo's location
also reaches the recognizer, as a learned embedding added to the pooled features before the
classifier (`GeoEmbedding`), so the classifier can use the location to tell twins apart even when
the policy drops most blocks.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from m2net_jax import flops as flops_lib
from m2net_jax.geo import scale_location
from m2net_jax.models.layers import CONV_TYPES, Stem, batch_norm, normalize_images, padding

# Depth → bottleneck blocks per stage (§4.1.3): N = 3n = 9, 15, 21 droppable blocks.
BLOCKS_PER_STAGE = {29: 3, 47: 5, 65: 7}
# Stride of each stage's first block; stage s has bottleneck width `width · 2**(s − 1)`.
STAGE_STRIDES = (1, 2, 2)
# Bottleneck output channels per bottleneck width (ResNet's bottleneck design).
EXPANSION = 4
# M²Net+'s location embedding: scaled 8-vector → this many ReLU units → the pooled width.
GEO_EMBED_HIDDEN = 128


class Bottleneck(nn.Module):
    """The residual branch F of a bottleneck block: (B, H, W, C) → (B, H/s, W/s, 4·features).

    The stride sits on the 3×3 conv, as in BlockDrop's (torchvision's) ResNet. No final ReLU: the
    block adds the shortcut first. `conv_type` picks the three convs (`layers.CONV_TYPES`); with
    'standard' they are plain `nn.Conv`s named conv1, conv2, conv3.
    """

    features: int
    strides: int = 1
    conv_type: str = "standard"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        convs = CONV_TYPES[self.conv_type]
        conv1x1 = functools.partial(convs.conv1x1, use_bias=False, dtype=self.dtype)
        conv3x3 = functools.partial(convs.conv3x3, use_bias=False, dtype=self.dtype)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.axis_name)

        y = nn.relu(norm(name="bn1")(conv1x1(self.features, (1, 1), name="conv1")(x)))
        s = (self.strides, self.strides)
        y = conv3x3(self.features, (3, 3), strides=s, padding=padding(3), name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv1x1(self.features * EXPANSION, (1, 1), name="conv3")(y)
        # Zero γ: a fresh block is the identity, which trains deep ResNets from scratch more
        # stably (Goyal et al. 2017; as in Flax's ImageNet example).
        return norm(scale_init=nn.initializers.zeros, name="bn3")(y)


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block: 1×1 conv (stride s) + BN."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.axis_name)
        s = (self.strides, self.strides)
        return norm(name="bn")(conv(self.features, (1, 1), strides=s, name="conv")(x))


class GeoEmbedding(nn.Module):
    """M²Net+: scaled location (B, 8) → Dense(128) → ReLU → Dense(C) → (B, C) float32.

    The last layer starts at zero, so an untrained M²Net+ recognizer is the plain one and the
    embedding grows only as far as the location helps.
    """

    features: int

    @nn.compact
    def __call__(self, locations):
        x = scale_location(jnp.asarray(locations, jnp.float32))
        x = nn.relu(nn.Dense(GEO_EMBED_HIDDEN, name="fc1")(x))
        return nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="fc2")(x)


class Recognizer(nn.Module):
    """ResNet-29/47/65 with per-photo block dropping (§4.1.3; BlockDrop's block semantics).

    Attributes:
      depth: 29, 47 or 65 (3, 5 or 7 bottleneck blocks per stage).
      num_classes: K, the classifier's outputs (420 / 732 for the paper's datasets).
      width: bottleneck width of stage 1; stages use width·(1, 2, 4) (outputs ×4).
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool, for ≥ 112 px) or 'small' (3×3/1 conv).
      conv_type: the convs inside each bottleneck branch, a key of `layers.CONV_TYPES`:
        'standard', 'mobilenet', 'shufflenet_g2'/'_g4', 'hetconv_p2'/'_p4' (§4.4).
      geo_conditioning: M²Net+ — add a learned embedding of the location to the pooled features
        before the classifier; `locations` must then be passed.
      dtype: computation dtype (parameters stay float32; logits are float32).
      axis_name: mapped axis over which batch norm statistics are averaged (synced BN), or None.
    """

    depth: int = 47
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    conv_type: str = "standard"
    geo_conditioning: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @property
    def blocks_per_stage(self) -> int:
        if self.depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"Recognizer depth {self.depth} is not supported; choose one of "
                f"{sorted(BLOCKS_PER_STAGE)} (config key recognizer.depth)."
            )
        return BLOCKS_PER_STAGE[self.depth]

    @property
    def num_blocks(self) -> int:
        """N, the number of droppable blocks (9, 15 or 21)."""
        return len(STAGE_STRIDES) * self.blocks_per_stage

    def flops(self, image_size) -> flops_lib.RecognizerFlops:
        """Analytic FLOPs of this recognizer's parts on one photo of `image_size` (int or (H, W)),
        as `m2net_jax.flops.recognizer_flops` counts them. Works on the unbound module."""
        return flops_lib.recognizer_flops(
            depth=self.depth,
            num_classes=self.num_classes,
            width=self.width,
            image_size=image_size,
            stem=self.stem,
            conv_type=self.conv_type,
            geo_conditioning=self.geo_conditioning,
        )

    def setup(self):
        if self.conv_type not in CONV_TYPES:
            raise ValueError(
                f"Unknown conv_type {self.conv_type!r}; choose one of {sorted(CONV_TYPES)}."
            )
        groups = CONV_TYPES[self.conv_type].groups
        if self.width % groups:
            raise ValueError(
                f"conv_type {self.conv_type!r} splits channels into {groups} groups, so the "
                f"width must be a multiple of {groups}; got width={self.width} "
                "(config key recognizer.width)."
            )
        layer = dict(dtype=self.dtype, axis_name=self.axis_name)
        # The attribute cannot be `stem` (that is the stem-kind field); the scope is named 'stem'.
        self.stem_layer = Stem(self.width, kind=self.stem, **layer, name="stem")
        blocks, downsamples = [], []
        for stage, stride in enumerate(STAGE_STRIDES, start=1):
            features = self.width * 2 ** (stage - 1)
            # Every stage's first block changes the channel count (stem width → 4·width, then
            # doubling), so each has a projection shortcut, as in BlockDrop's `ds` layers.
            downsamples.append(
                Downsample(
                    features * EXPANSION, strides=stride, **layer, name=f"stage{stage}_downsample"
                )
            )
            for i in range(self.blocks_per_stage):
                blocks.append(
                    Bottleneck(
                        features,
                        strides=stride if i == 0 else 1,
                        conv_type=self.conv_type,
                        **layer,
                        name=f"stage{stage}_block{i}",
                    )
                )
        self.blocks = blocks
        self.downsamples = downsamples
        if self.geo_conditioning:
            final = self.width * 2 ** (len(STAGE_STRIDES) - 1) * EXPANSION
            self.geo_embedding = GeoEmbedding(final, name="geo_embedding")
        self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")

    def __call__(self, images, policy, train: bool = False, locations=None):
        """Classifies photos along the blocks their policies keep.

        Args:
          images: (B, H, W, 3) float32 in [0, 1].
          policy: (B, N) float32 or bool, 1 = run block n; soft values in [0, 1] blend.
          train: batch statistics (and their running averages, in the mutable 'batch_stats'
            collection) instead of the running averages.
          locations: (B, 8) raw DMS location vectors (`m2net_jax.geo.encode_location`); required
            with `geo_conditioning` (M²Net+), ignored otherwise.

        Returns:
          (B, K) float32 logits.
        """
        expected = (images.shape[0], self.num_blocks)
        if policy.shape != expected:
            raise ValueError(
                f"policy has shape {policy.shape}; expected (B, N) = {expected} for a "
                f"ResNet-{self.depth} on a batch of {images.shape[0]}."
            )
        x = self.embed(images, train=train)
        for n in range(self.num_blocks):
            x = self.block(x, policy[:, n], n, train=train)
        return self.head(x, locations)

    def embed(self, images, train: bool = False):
        """(B, H, W, 3) in [0, 1] → normalised → stem → (B, H', W', width)."""
        return self.stem_layer(normalize_images(images, self.dtype), train)

    def shortcut(self, x, index: int, train: bool = False):
        """What block `index` passes on when dropped: its stage's downsample, or x itself."""
        if index % self.blocks_per_stage == 0:
            return self.downsamples[index // self.blocks_per_stage](x, train)
        return x

    def block(self, x, keep, index: int, train: bool = False):
        """Block `index` under per-photo decisions `keep`: (B,) float or bool (or a scalar)."""
        shortcut = self.shortcut(x, index, train)
        keep = jnp.broadcast_to(jnp.asarray(keep, x.dtype), x.shape[:1])[:, None, None, None]
        kept = nn.relu(shortcut + self.blocks[index](x, train))
        return keep * kept + (1 - keep) * shortcut

    def head(self, x, locations=None):
        """(B, H, W, C) → global average pool (+ location embedding) → (B, K) float32 logits.

        `locations` (B, 8) raw DMS vectors are required with `geo_conditioning`, else ignored.
        """
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.geo_conditioning:
            if locations is None or locations.shape != (x.shape[0], 8):
                shape = None if locations is None else locations.shape
                raise ValueError(
                    f"Recognizer(geo_conditioning=True) (M²Net+) needs locations of shape "
                    f"(B, 8) = ({x.shape[0]}, 8), raw DMS vectors "
                    f"(m2net_jax.geo.encode_location); got {shape}. Pass "
                    "locations=batch['location'], or set recognizer.geo_conditioning=False."
                )
            features = features + self.geo_embedding(locations)
        return self.classifier(features)
