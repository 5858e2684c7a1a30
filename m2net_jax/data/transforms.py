"""The input pipeline's transforms: one job each, on host-local numpy dicts (see `pipeline`).

Each is a grain `Map`, `RandomMap` or `MapWithIndex`; `pipeline` chains them.
"""

import dataclasses
import io
import math

import grain
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class AddIndex(grain.transforms.MapWithIndex):
    """Records each example's position in its split as `index` (sharding checks, per-example
    evaluation output). Applied to the source, before sharding and shuffling."""

    num_examples: int

    def map_with_index(self, index, element):
        # Downstream `repeat` reads past the end and MapDatasets wrap around, so a later
        # epoch asks for index + epoch * num_examples.
        return {**element, "index": index % self.num_examples}


@dataclasses.dataclass(frozen=True)
class MarkPadding(grain.transforms.Map):
    """Marks an example as eval padding: it fills a batch but must not be counted."""

    def map(self, element):
        return {**element, "mask": False}


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
    """Encoded image bytes (PNG/JPEG) -> (H, W, 3) uint8 RGB; pixels already decoded (from a
    `DecodedSource`) pass through."""

    def map(self, element):
        if isinstance(element["image"], np.ndarray) and element["image"].ndim == 3:
            # Kept in the chain even then: grain derives each random transform's seed from its
            # depth below `seed()`, so dropping this step would change every crop and flip.
            return element
        with Image.open(io.BytesIO(element["image"])) as image:
            pixels = np.asarray(image.convert("RGB"))
        return {**element, "image": pixels}


def _resize_box(pixels: np.ndarray, box, size: int) -> np.ndarray:
    """Resamples the region `box` (left, top, right, bottom; float pixels) to (size, size)."""
    # PIL widens the bilinear kernel when shrinking, so downscaling is anti-aliased.
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop: a random region of `scale` of the area and `ratio` aspect, resized
    to (size, size); after 10 failed draws, the largest centred square."""

    size: int
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def random_map(self, element, rng: np.random.Generator):
        pixels = element["image"]
        height, width = pixels.shape[:2]
        log_ratio = np.log(self.ratio)
        for _ in range(10):
            area = height * width * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if w <= width and h <= height:
                left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
                box = (left, top, left + w, top + h)
                break
        else:
            side = min(height, width)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        return {**element, "image": _resize_box(pixels, box, self.size)}


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
    """Mirrors the photo left-right with probability 1/2."""

    def random_map(self, element, rng: np.random.Generator):
        if rng.random() < 0.5:
            return {**element, "image": element["image"][:, ::-1]}
        return element


@dataclasses.dataclass(frozen=True)
class ResizeCentreCrop(grain.transforms.Map):
    """The centred square of `crop_fraction` of the shorter side, resized to (size, size)."""

    size: int
    crop_fraction: float = 1.0

    def map(self, element):
        pixels = element["image"]
        height, width = pixels.shape[:2]
        side = min(height, width) * self.crop_fraction
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        return {**element, "image": _resize_box(pixels, box, self.size)}


@dataclasses.dataclass(frozen=True)
class AddPolicyImage(grain.transforms.Map):
    """The policy network's photo: the recognizer's crop at half resolution (§3.3, Table 2),
    by 2x2 averaging, so both networks see the same content. float32 in [0, 255]."""

    def map(self, element):
        pixels = element["image"].astype(np.float32)
        h, w, c = pixels.shape
        policy = pixels.reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))
        return {**element, "policy_image": policy}


@dataclasses.dataclass(frozen=True)
class ToModelInputs(grain.transforms.Map):
    """Keeps what the models and metrics read, as the dtypes they expect; pixels to [0, 1]."""

    def map(self, element):
        return {
            "image": element["image"].astype(np.float32) / 255.0,
            "policy_image": element["policy_image"].astype(np.float32) / 255.0,
            "location": np.asarray(element["location"], np.float32),
            "label": np.int32(element["label"]),
            "mask": np.bool_(element.get("mask", True)),
            "index": np.int32(element["index"]),
        }
