"""Analytic FLOPs of the recognizer's parts and of the policy network (§4.2, Fig. 9; Eqn 7).

M²Net's cost per photo is the policy network plus the recognizer blocks its policy keeps. As in
the field (and BlockDrop, MobileNet, the paper's Fig. 9), FLOPs here are 2 × the multiply-adds
of the convolutions and dense layers, every kernel tap counted (zero padding included). Batch
norm, ReLU, pooling, the residual additions, the policy mask and the policy's fusion/sigmoid are
*not* counted: a few operations per activation against hundreds in a conv.

XLA's `cost_analysis()['flops']` counts differently on both points: only the kernel taps that land
on the image, plus the element-wise work. `tests/test_flops.py` checks that XLA, made to count
every tap of the real modules' convs and dense layers, gives exactly these numbers, and that the
element-wise work is under 5% (1.1% for ResNet-47 at 224 px, width 64). At that size XLA's raw
total is 1.3% below ours (2.4% padding taps); on small feature maps, e.g. the policy network at
112 px (final maps 4×4), the padding taps make it 11-13% below.

A dropped block costs nothing except, for the first block of a stage, its downsample (the
projection shortcut runs either way), so one photo's recognizer FLOPs are

    stem + Σ_n downsample_n + classifier (+ M²Net+'s location embedding) + Σ_n p_n · block_n.

The compact backbones of §4.4 (`models.CONV_TYPES`) change only the convs inside the blocks:
`CONV1X1_FLOPS` and `CONV3X3_FLOPS` give each one's cost. A grouped conv with G groups costs 1/G
of the dense one (each filter sees C_in/G channels); a depthwise conv is the case G = C_in.

Pure numpy, no Flax: the architecture constants below mirror `m2net_jax.models` (a test checks
that the tables agree and that the totals match XLA's cost analysis of the real modules).
Convolutions pad by (k − 1) // 2 each side, as the models do.
"""

import dataclasses

import numpy as np

# Mirrors of m2net_jax.models: recognizer.BLOCKS_PER_STAGE / STAGE_STRIDES / EXPANSION,
# policy_network.RESNET10_STAGES / LOC_MLP_FEATURES.
BLOCKS_PER_STAGE = {29: 3, 47: 5, 65: 7}
_STAGE_STRIDES = (1, 2, 2)
_EXPANSION = 4
_RESNET10_STAGES = ((1, 1), (2, 2), (4, 2), (8, 2))
_LOC_MLP_FEATURES = (8, 128, 256, 256, 128)  # input size, then FC1–FC4 outputs
_GEO_EMBED_HIDDEN = 128  # recognizer.GEO_EMBED_HIDDEN (M²Net+)


def _out_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a conv or pool with symmetric padding (kernel − 1) // 2."""
    pad = (kernel - 1) // 2
    return (size + 2 * pad - kernel) // stride + 1


def _conv(hw: tuple[int, int], kernel: int, c_in: int, c_out: int) -> int:
    """FLOPs of a dense (groups = 1) k×k conv producing an `hw` output: 2·H'·W'·k²·C_in·C_out."""
    return 2 * hw[0] * hw[1] * kernel * kernel * c_in * c_out


def _grouped_conv(hw: tuple[int, int], kernel: int, c_in: int, c_out: int, groups: int) -> int:
    """FLOPs of a k×k conv with `groups` feature groups: each filter sees C_in / groups channels."""
    return _conv(hw, kernel, c_in // groups, c_out)


def _hetconv3x3(parts: int):
    """HetConv (part P): per filter, C_in/P channels with 3×3 kernels, the rest 1×1."""

    def flops(hw, c_in, c_out):
        return _grouped_conv(hw, 3, c_in, c_out, parts) + _conv(hw, 1, c_in - c_in // parts, c_out)

    return flops


def _dense(kernel: int):
    return lambda hw, c_in, c_out: _conv(hw, kernel, c_in, c_out)


def _grouped(kernel: int, groups: int):
    return lambda hw, c_in, c_out: _grouped_conv(hw, kernel, c_in, c_out, groups)


# FLOPs of the bottleneck's convs for each `models.CONV_TYPES` entry, as functions of
# (output (H', W'), C_in, C_out): its two 1×1 convs (conv1, conv3) and its 3×3 (conv2). A new
# conv type must add its counts to both (a test checks that the keys agree with the models').
CONV1X1_FLOPS = {
    "standard": _dense(1),
    "mobilenet": _dense(1),
    "shufflenet_g2": _grouped(1, 2),
    "shufflenet_g4": _grouped(1, 4),
    "hetconv_p2": _dense(1),
    "hetconv_p4": _dense(1),
}
CONV3X3_FLOPS = {
    "standard": _dense(3),
    # Depthwise 3×3 (one 3×3 kernel per channel), then the pointwise 1×1.
    "mobilenet": lambda hw, c_in, c_out: (
        _grouped_conv(hw, 3, c_in, c_in, c_in) + _conv(hw, 1, c_in, c_out)
    ),
    # Depthwise 3×3 (C_out = C_in); the channel shuffle moves data, it does no arithmetic.
    "shufflenet_g2": lambda hw, c_in, c_out: _grouped_conv(hw, 3, c_in, c_out, c_in),
    "shufflenet_g4": lambda hw, c_in, c_out: _grouped_conv(hw, 3, c_in, c_out, c_in),
    "hetconv_p2": _hetconv3x3(2),
    "hetconv_p4": _hetconv3x3(4),
}


def geo_embedding_flops(features: int) -> int:
    """FLOPs of M²Net+'s location embedding (`models.recognizer.GeoEmbedding`): 8 → 128 → C."""
    return 2 * (8 * _GEO_EMBED_HIDDEN + _GEO_EMBED_HIDDEN * features)


def _stem(hw: tuple[int, int], features: int, stem: str) -> tuple[int, tuple[int, int]]:
    """(FLOPs, output (H, W)) of `models.layers.Stem` on an (H, W) photo."""
    if stem == "imagenet":
        conv_hw = tuple(_out_size(s, 7, 2) for s in hw)
        pooled_hw = tuple(_out_size(s, 3, 2) for s in conv_hw)
        return _conv(conv_hw, 7, 3, features), pooled_hw
    if stem == "small":
        return _conv(hw, 3, 3, features), hw
    raise ValueError(f"Unknown stem {stem!r}; choose 'imagenet' or 'small'.")


def _as_hw(image_size) -> tuple[int, int]:
    if np.ndim(image_size) == 0:
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def _frozen(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class RecognizerFlops:
    """FLOPs of one photo through each part of the recognizer.

    Attributes:
      stem: the stem conv.
      blocks: (N,) int64, residual branch F_n of each block (its three convs), paid if p_n = 1.
      downsamples: (N,) int64, the projection shortcut of block n (0 unless n starts a stage),
        paid whatever p_n is.
      classifier: the final dense layer.
      geo_embedding: M²Net+'s location embedding (0 without `geo_conditioning`).
    """

    stem: int
    blocks: np.ndarray
    downsamples: np.ndarray
    classifier: int
    geo_embedding: int = 0

    @property
    def fixed(self) -> int:
        """FLOPs every photo pays whatever its policy: stem, downsamples, classifier (and the
        location embedding of M²Net+)."""
        return int(self.stem + self.downsamples.sum() + self.classifier + self.geo_embedding)

    @property
    def full(self) -> int:
        """FLOPs with every block run (the plain ResNet; the all-ones policy)."""
        return self.fixed + int(self.blocks.sum())


def recognizer_flops(
    *,
    depth: int,
    num_classes: int,
    width: int = 64,
    image_size=224,
    stem: str = "imagenet",
    conv_type: str = "standard",
    geo_conditioning: bool = False,
) -> RecognizerFlops:
    """Per-part FLOPs of `models.Recognizer` with the same arguments, on one photo.

    Args:
      depth: 29, 47 or 65.
      num_classes: K.
      width: stage-1 bottleneck width (64 in the paper).
      image_size: photo size, an int or (H, W).
      stem: 'imagenet' or 'small'.
      conv_type: the bottleneck's convs, a key of `CONV3X3_FLOPS` (and `CONV1X1_FLOPS`).
      geo_conditioning: M²Net+; counts the location embedding.

    Returns:
      A `RecognizerFlops`.
    """
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth {depth} is not one of {sorted(BLOCKS_PER_STAGE)}.")
    if conv_type not in CONV3X3_FLOPS:
        raise ValueError(
            f"No FLOP count for conv_type {conv_type!r}; known: {sorted(CONV3X3_FLOPS)}"
        )
    conv1x1, conv3x3 = CONV1X1_FLOPS[conv_type], CONV3X3_FLOPS[conv_type]
    stem_flops, hw = _stem(_as_hw(image_size), width, stem)
    c_in = width
    blocks, downsamples = [], []
    for stage, stage_stride in enumerate(_STAGE_STRIDES):
        features = width * 2**stage
        c_out = features * _EXPANSION
        for i in range(BLOCKS_PER_STAGE[depth]):
            stride = stage_stride if i == 0 else 1
            out_hw = tuple(_out_size(s, 3, stride) for s in hw)
            blocks.append(
                conv1x1(hw, c_in, features)  # conv1 1×1, at the input resolution
                + conv3x3(out_hw, features, features)  # conv2 3×3, carries the stride
                + conv1x1(out_hw, features, c_out)  # conv3 1×1
            )
            # A 1×1 stride-s conv's output size equals the 3×3 stride-s conv's (padding 0 vs 1).
            downsamples.append(_conv(out_hw, 1, c_in, c_out) if i == 0 else 0)
            c_in, hw = c_out, out_hw
    return RecognizerFlops(
        stem=stem_flops,
        blocks=_frozen(blocks),
        downsamples=_frozen(downsamples),
        classifier=2 * c_in * num_classes,
        geo_embedding=geo_embedding_flops(c_in) if geo_conditioning else 0,
    )


def policy_network_flops(
    *,
    num_blocks: int,
    image_size=112,
    width: int = 64,
    stem: str = "imagenet",
    use_geo: bool = True,
) -> int:
    """FLOPs of `models.PolicyNetwork` on one photo: ResNet-10 + its Dense(N), + the location MLP.

    Args:
      num_blocks: N, the policy's outputs.
      image_size: policy-image size, an int or (H, W) (half the recognizer's: 112 for 224).
      width: ResNet-10 width (64 in Table 2).
      stem: 'imagenet' or 'small'.
      use_geo: count the location MLP (Table 1); False for BlockDrop / Remove-MLP.

    Returns:
      FLOPs as an int. The fusion (two scalings, an add, a sigmoid per block) has no
      multiply-adds and is not counted.
    """
    flops, hw = _stem(_as_hw(image_size), width, stem)
    c_in = width
    for multiplier, stride in _RESNET10_STAGES:
        features = width * multiplier
        out_hw = tuple(_out_size(s, 3, stride) for s in hw)
        flops += _conv(out_hw, 3, c_in, features) + _conv(out_hw, 3, features, features)
        if stride != 1 or c_in != features:
            flops += _conv(out_hw, 1, c_in, features)
        c_in, hw = features, out_hw
    flops += 2 * c_in * num_blocks
    if use_geo:
        sizes = (*_LOC_MLP_FEATURES, num_blocks)
        flops += sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return flops


def flops_per_image(policies, recognizer: RecognizerFlops, *, policy_network: int = 0):
    """FLOPs each photo costs under its policy (the paper's Fig. 9 / Fig. 11 quantity).

    Args:
      policies: (M, N) or (N,) float or bool, 1 = block run.
      recognizer: the model's `RecognizerFlops` (`recognizer_flops(...)`).
      policy_network: FLOPs of the policy network per photo (`policy_network_flops(...)`) to add;
        0 (default) gives the recognizer's FLOPs alone.

    Returns:
      (M,) (or scalar) float64: fixed + Σ_n p_n · block_n + policy_network.
    """
    policies = np.asarray(policies, dtype=np.float64)
    if policies.shape[-1] != recognizer.blocks.shape[0]:
        raise ValueError(
            f"policies have {policies.shape[-1]} blocks; the recognizer has "
            f"{recognizer.blocks.shape[0]}."
        )
    return recognizer.fixed + policies @ recognizer.blocks.astype(np.float64) + policy_network
