"""The policy network: photo + location → per-block keep probabilities (§3.3, Eqn 4, Tables 1–2).

    s = sigmoid(α · W_loc(x_loc) + (1 − α) · W_img(x_img))

`W_img` (`img_resnet10`) is ResNet-10 (Table 2) + a linear layer to N logits, on the photo at
half the recognizer's resolution; `W_loc` (`loc_mlp`) is the 5-layer MLP of Table 1 on the
scaled DMS location vector. With `use_geo=False` the location branch does not exist and
s = sigmoid(W_img(x_img)): BlockDrop's policy network, the paper's "Remove-MLP" ablation.

Initial keep probabilities: both branches' last layers have bias logit(`init_keep_prob`), so the
fused logit starts at that value plus small photo/location-dependent terms (α and 1 − α sum to
1). The default 0.75 puts the greedy policy (s ≥ 0.5) at "run every block" — the pretrained
recognizer's accuracy — while sampled policies (s' = 0.8·s + 0.2·(1 − s) ≈ 0.65) still drop
about a third of the decided blocks. BlockDrop's reference starts at PyTorch's default init
(s ≈ 0.5); `init_keep_prob=0.5` reproduces that.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2net_jax.geo import scale_location
from m2net_jax.models.layers import Stem, batch_norm, normalize_images, padding

# Table 2: four basic blocks at width·(1, 2, 4, 8) channels with strides 1, 2, 2, 2.
RESNET10_STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))  # (width multiplier, stride)
# Names of the image branch and of its last layer, in `PolicyNetwork` and `ImageClassifier`.
IMAGE_BRANCH, HEAD = "img_resnet10", "fc"
# Table 1: FC1–FC4 output sizes; FC5 maps to the N blocks.
LOC_MLP_FEATURES = (128, 256, 256, 128)


class SmallMapConv(nn.Conv):
    """`nn.Conv` that computes a stride-1 k×k conv on a map smaller than k×k on the map
    zero-padded to k×k (bottom/right), then crops: the added taps read zeros, as the conv's own
    padding would, so the values are the same.

    Why: XLA:CPU takes a slow path for such convs — a 3×3 conv on the 2×2 map of ResNet-10's last
    block at 16 px took ~35× longer than on 3×3, as long as the whole ResNet-47 (BUILD_NOTES.md,
    Performance). The optimization barrier stops XLA from folding the pad back into the conv.
    """

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        k = self.kernel_size[0]
        stride_one = self.strides in (None, 1, (1, 1))
        if stride_one and k > 1 and (h < k or w < k):
            pad = ((0, 0), (0, max(0, k - h)), (0, max(0, k - w)), (0, 0))
            padded = jax.lax.optimization_barrier(jnp.pad(x, pad))
            return super().__call__(padded)[:, :h, :w]
        return super().__call__(x)


class BasicBlock(nn.Module):
    """ResNet basic block: relu(shortcut(x) + BN(conv3×3(relu(BN(conv3×3/s(x))))))."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(SmallMapConv, use_bias=False, dtype=self.dtype)
        norm = batch_norm(train=train, dtype=self.dtype, axis_name=self.axis_name)
        s = (self.strides, self.strides)

        y = conv(self.features, (3, 3), strides=s, padding=padding(3), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.features, (3, 3), padding=padding(3), name="conv2")(y)
        y = norm(scale_init=nn.initializers.zeros, name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=s, name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        return nn.relu(shortcut + y)


class ResNet10(nn.Module):
    """W_img (Table 2): stem, four basic blocks, global average pool, Dense → (B, N) logits."""

    num_outputs: int
    width: int = 64
    stem: str = "imagenet"
    bias_init: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        layer = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = Stem(self.width, kind=self.stem, **layer, name="stem")(x, train)
        for i, (multiplier, stride) in enumerate(RESNET10_STAGES, start=1):
            x = BasicBlock(self.width * multiplier, strides=stride, **layer, name=f"block{i}")(
                x, train
            )
        # Table 2's 4×4 average pool is the global pool at 112 px; global keeps any resolution.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        fc = nn.Dense(
            self.num_outputs, bias_init=nn.initializers.constant(self.bias_init), name=HEAD
        )
        return fc(x)


class ImageClassifier(nn.Module):
    """The policy's image branch as a classifier of the K classes: ResNet-10 (Table 2) with a
    Dense → (B, K) head, on the photo at the policy's resolution.

    BlockDrop's policy network starts from a ResNet trained on ImageNet. Nothing is downloaded
    here, so the pretrain stage trains this classifier on the same training photos, and
    `with_trained_image_branch` starts the policy network's image branch from it (all but the
    head, which maps to N logits in the policy). Same attributes as `PolicyNetwork`'s branch.
    """

    num_classes: int
    width: int = 64
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, policy_images, train: bool = False):
        """(B, h, w, 3) photos in [0, 1] → (B, K) float32 class logits."""
        return ResNet10(
            self.num_classes,
            width=self.width,
            stem=self.stem,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=IMAGE_BRANCH,
        )(normalize_images(policy_images, self.dtype), train)


def with_trained_image_branch(policy_variables, classifier_variables):
    """The policy network's variables with its image branch's stem and blocks (parameters and
    batch statistics) taken from a trained `ImageClassifier`; the branch's last layer, which maps
    to the N blocks instead of the K classes, keeps its initial values.

    Args:
      policy_variables: {'params', 'batch_stats'} of a `PolicyNetwork`.
      classifier_variables: {'params', 'batch_stats'} of an `ImageClassifier` of the same width
        and stem.
    """
    out = {}
    for collection, tree in policy_variables.items():
        trained = classifier_variables[collection][IMAGE_BRANCH]
        branch = {**tree[IMAGE_BRANCH], **{k: v for k, v in trained.items() if k != HEAD}}
        out[collection] = {**tree, IMAGE_BRANCH: branch}
    return out


class LocationMLP(nn.Module):
    """W_loc (Table 1): scaled 8-vector → 128 → 256 → 256 → 128 → N logits, ReLU between."""

    num_outputs: int
    bias_init: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate(LOC_MLP_FEATURES, start=1):
            x = nn.relu(nn.Dense(features, dtype=self.dtype, name=f"fc{i}")(x))
        fc = nn.Dense(
            self.num_outputs,
            bias_init=nn.initializers.constant(self.bias_init),
            name=f"fc{len(LOC_MLP_FEATURES) + 1}",
        )
        return fc(x.astype(jnp.float32))


class PolicyNetwork(nn.Module):
    """M²Net's policy network (Eqn 4, Fig. 3b); BlockDrop's with `use_geo=False`.

    Attributes:
      num_blocks: N, the recognizer's droppable blocks (9, 15 or 21).
      use_geo: whether the location branch exists (False: BlockDrop / Remove-MLP).
      fusion_alpha: α in Eqn 4, the location branch's weight (paper: 0.7).
      width: ResNet-10 stem/first-block channels; blocks use width·(1, 2, 4, 8) (Table 2: 64).
      stem: 'imagenet' (7×7/2 conv + max-pool, Table 2) or 'small' (3×3/1 conv), for policy
        images of 32 px or fewer, which the ImageNet stem would shrink to nothing.
      init_keep_prob: keep probability the untrained network is centred on (module docstring).
      dtype: computation dtype (parameters stay float32; logits and probabilities are float32).
      axis_name: mapped axis over which batch norm statistics are averaged, or None.
    """

    num_blocks: int
    use_geo: bool = True
    fusion_alpha: float = 0.7
    width: int = 64
    stem: str = "imagenet"
    init_keep_prob: float = 0.75
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, policy_images, locations, train: bool = False):
        """Keep probabilities of the N blocks for each photo.

        Args:
          policy_images: (B, h, w, 3) float32 in [0, 1], the photo at the policy resolution.
          locations: (B, 8) raw DMS location vectors (`m2net_jax.geo.encode_location`); ignored
            (may be None) when `use_geo` is False.
          train: batch statistics in ResNet-10's batch norm (mutable 'batch_stats').

        Returns:
          (B, N) float32 probabilities s in (0, 1).
        """
        if not 0.0 < self.init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob must be in (0, 1), got {self.init_keep_prob}.")
        bias = math.log(self.init_keep_prob / (1.0 - self.init_keep_prob))
        img_logits = ResNet10(
            self.num_blocks,
            width=self.width,
            stem=self.stem,
            bias_init=bias,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=IMAGE_BRANCH,
        )(normalize_images(policy_images, self.dtype), train)
        if not self.use_geo:
            return nn.sigmoid(img_logits)
        if locations is None or locations.shape != (policy_images.shape[0], 8):
            shape = None if locations is None else locations.shape
            raise ValueError(
                f"locations has shape {shape}; expected (B, 8) = ({policy_images.shape[0]}, 8) "
                "raw DMS vectors (m2net_jax.geo.encode_location), or use_geo=False."
            )
        loc = scale_location(jnp.asarray(locations, jnp.float32)).astype(self.dtype)
        loc_logits = LocationMLP(self.num_blocks, bias_init=bias, dtype=self.dtype, name="loc_mlp")(
            loc
        )
        alpha = self.fusion_alpha
        return nn.sigmoid(alpha * loc_logits + (1.0 - alpha) * img_logits)
