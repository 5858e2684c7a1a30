"""geo_twins: a procedural landmark dataset with look-alike landmarks in different cities (TFDS).

The paper's motivating problem (Fig. 1): landmarks that look almost the same but stand in
different places — an Eiffel-like tower in Paris, Las Vegas and Tokyo — are confused by
image-only networks, while their GPS locations tell them apart. geo_twins reproduces that problem
at toy scale, so the whole M²Net pipeline runs out of the box without the (manual, 100+ GB)
Google Landmarks v2 download. `python -m m2net_jax.data.geo_twins_difficulty` measures how hard
it is (numbers in BUILD_NOTES.md).

This module is the TFDS builder (`GeoTwins`, its configs, `build`); the classes and locations
are in `geo_twins_classes`, the drawing in `geo_twins_render`, and their public names are
importable from here too.

Everything is deterministic for a config's `seed`: example ``i`` of a split is drawn from an RNG
seeded with ``(seed, split, i)``, so the generation order does not matter and two builds write
byte-identical array_record files. Nothing is downloaded, and nothing here needs TensorFlow.

Build programmatically with `build()`, or with TFDS:
``tfds.builder('geo_twins/64px', file_format='array_record').download_and_prepare()``.
"""

import contextlib
import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.core import example_serializer

from m2net_jax import geo
from m2net_jax.data.geo_twins_classes import (
    ARCHETYPES,
    City,
    LandmarkClass,
    class_table,
    jittered_location,
    load_cities,
)
from m2net_jax.data.geo_twins_render import RenderOptions, render

__all__ = [
    "ARCHETYPES",
    "City",
    "GeoTwins",
    "GeoTwinsConfig",
    "LandmarkClass",
    "RenderOptions",
    "build",
    "class_table",
    "jittered_location",
    "load_cities",
    "render",
]

_SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False)
class GeoTwinsConfig(tfds.core.BuilderConfig):
    """A geo_twins variant: resolution, class count, size, cue strength, seed.

    Attributes:
      image_size: stored photo side S in pixels (the recognizer may train at another size).
      num_archetypes: how many archetypes (the first ones of `ARCHETYPES`).
      cities_per_archetype: twins per archetype; classes = num_archetypes * cities_per_archetype.
      num_cities: cities used; each hosts num_archetypes * cities_per_archetype / num_cities
        archetypes (when that divides evenly).
      train_per_class, test_per_class: photos per class in each split.
      twin_cue: strength of the per-city visual cue (1.0 = tuned default, see BUILD_NOTES.md).
      jitter_km: σ of the Gaussian location jitter around the city centre, per axis (cut at 4σ).
      seed: everything generated is a function of this seed.
      image_format: ``png`` (lossless) or ``jpeg`` (quality 90; 10x smaller for the large,
        noisy photos, and what GLDv2 stores).
    """

    image_size: int = 32
    num_archetypes: int = 8
    cities_per_archetype: int = 4
    num_cities: int = 8
    train_per_class: int = 160
    test_per_class: int = 50
    twin_cue: float = 1.0
    jitter_km: float = 2.5
    seed: int = 0
    image_format: str = "png"

    @property
    def classes(self) -> tuple[LandmarkClass, ...]:
        return class_table(
            num_archetypes=self.num_archetypes,
            cities_per_archetype=self.cities_per_archetype,
            num_cities=self.num_cities,
            seed=self.seed,
        )


@contextlib.contextmanager
def _deterministic_example_serialization():
    """Makes TFDS write the records of a tf.Example with its feature map in sorted order.

    The upb protobuf runtime serialises map fields (a tf.Example's features) in an order seeded
    per process, so two processes building the same geo_twins would write different bytes for
    equal examples. Sorted maps make the files a function of the config alone.
    """
    serializer = example_serializer.ExampleSerializer
    original = serializer.serialize_example

    def serialize_example(self, example):
        return self.get_tf_example(example).SerializeToString(deterministic=True)

    serializer.serialize_example = serialize_example
    try:
        yield
    finally:
        serializer.serialize_example = original


def _config(name: str, description: str, **kwargs) -> GeoTwinsConfig:
    return GeoTwinsConfig(name=name, description=description, **kwargs)


# 8 archetypes x 4 cities = 32 classes over 8 cities, each city hosting 4 archetypes.
_STANDARD = dict(
    num_archetypes=8, cities_per_archetype=4, num_cities=8, train_per_class=160, test_per_class=50
)


class GeoTwins(tfds.core.GeneratorBasedBuilder):
    """Procedural look-alike landmarks in real cities (the paper's Fig. 1 problem)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _config("32px", "32 px, 8 archetypes x 4 cities, 5120 train / 1600 test.", **_STANDARD),
        _config("64px", "64 px, 8 archetypes x 4 cities.", image_size=64, **_STANDARD),
        _config(
            "112px",
            "112 px JPEG, 8 archetypes x 4 cities.",
            image_size=112,
            image_format="jpeg",
            **_STANDARD,
        ),
        _config(
            "224px",
            "224 px JPEG, 8 archetypes x 4 cities.",
            image_size=224,
            image_format="jpeg",
            **_STANDARD,
        ),
        _config(
            "64px_wide",
            "64 px, 10 archetypes x 6 of 12 cities (60 classes), 9600 train / 3000 test.",
            image_size=64,
            num_archetypes=10,
            cities_per_archetype=6,
            num_cities=12,
            train_per_class=160,
            test_per_class=50,
        ),
        _config(
            "smoke",
            "32 px, 4 archetypes x 2 cities, 16 train / 8 test per class: for tests.",
            num_archetypes=4,
            cities_per_archetype=2,
            num_cities=4,
            train_per_class=16,
            test_per_class=8,
        ),
    ]
    DEFAULT_CONFIG_NAME = "32px"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own `code_path` imports `importlib_resources`, which it only requires on
        # Python < 3.9, so it crashes for any builder that lives in a package. The answer (this
        # file) is what it would compute; remove this once TFDS fixes it.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        # array_record by default: the grain pipeline reads it with random access.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _download_and_prepare(self, dl_manager, download_config=None):
        with _deterministic_example_serialization():
            return super()._download_and_prepare(dl_manager, download_config)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(size, size, 3), encoding_format=config.image_format
                    ),
                    "label": tfds.features.ClassLabel(names=[c.name for c in config.classes]),
                    "archetype": tfds.features.ClassLabel(
                        names=list(ARCHETYPES[: config.num_archetypes])
                    ),
                    "city": tfds.features.Text(),
                    "landmark_id": np.int64,
                    "latitude": np.float32,
                    "longitude": np.float32,
                    "location": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                    "image_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Procedural: nothing to download.
        return {split: self._generate_examples(split) for split in _SPLIT_IDS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        classes = config.classes
        per_class = config.train_per_class if split == "train" else config.test_per_class
        options = RenderOptions(image_size=config.image_size, twin_cue=config.twin_cue)
        archetypes = ARCHETYPES[: config.num_archetypes]
        for index in range(per_class * len(classes)):
            label = index % len(classes)
            cls = classes[label]
            # Seeded by (seed, split, index): any generation order gives the same examples.
            rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
            pixels = render(cls, rng, options)
            latitude, longitude = jittered_location(cls.city, rng, jitter_km=config.jitter_km)
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, **_SAVE_OPTIONS[config.image_format])
            image_id = f"geo_twins-{split}-{index:06d}"
            yield (
                image_id,
                {
                    "image": encoded.getvalue(),
                    "label": label,
                    "archetype": archetypes.index(cls.archetype),
                    "city": cls.city.name,
                    "landmark_id": label,
                    "latitude": latitude,
                    "longitude": longitude,
                    "location": geo.encode_location(latitude, longitude),
                    "image_id": image_id,
                },
            )


_SAVE_OPTIONS = {"png": dict(format="PNG"), "jpeg": dict(format="JPEG", quality=90)}


def build(name: str = "geo_twins", *, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Generates a geo_twins config (if not already there) as array_record files; no network.

    Args:
      name: ``geo_twins`` (the 32 px default) or ``geo_twins/<config>``, a config of
        `GeoTwins.BUILDER_CONFIGS` (``32px``, ``64px``, ``112px``, ``224px``, ``64px_wide``,
        ``smoke``).
      data_dir: TFDS data directory; None means TFDS's default (``~/tensorflow_datasets`` or
        ``$TFDS_DATA_DIR``).

    Returns:
      The prepared builder (``builder.as_data_source(split)`` reads it).
    """
    if name.split("/")[0].split(":")[0] != "geo_twins":
        raise ValueError(f"build() makes geo_twins datasets only, got {name!r}.")
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    logging.info("Building %s in %s (if missing).", builder.info.full_name, builder.data_dir)
    # try_download_gcs=False: never look for a prepared copy on the network.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
