"""The two networks of M²Net (Fig. 2): the recognizer whose residual blocks can be dropped per
photo (§4.1.3) and the policy network that decides which ones run (§3.3, Tables 1–2).

Pure Flax Linen modules; images enter both as NHWC float32 in [0, 1] and are normalised inside.
"""

from m2net_jax.models.layers import CONV_TYPES, STEMS, normalize_images
from m2net_jax.models.policy_network import (
    ImageClassifier,
    PolicyNetwork,
    with_trained_image_branch,
)
from m2net_jax.models.recognizer import BLOCKS_PER_STAGE, Recognizer

__all__ = [
    "BLOCKS_PER_STAGE",
    "CONV_TYPES",
    "ImageClassifier",
    "STEMS",
    "PolicyNetwork",
    "Recognizer",
    "normalize_images",
    "with_trained_image_branch",
]
