"""Tests for the procedural geo_twins dataset (m2net_jax/data/geo_twins*.py)."""

import collections
import csv
import importlib.resources
import io
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from m2net_jax import geo
from m2net_jax.data import geo_twins

SMOKE = "geo_twins/smoke"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between decimal-degree coordinates."""
    lat1, lon1, lat2, lon2 = (
        np.radians(np.asarray(v, np.float64)) for v in (lat1, lon1, lat2, lon2)
    )
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))


def city_table():
    """The shipped CSV, read here independently of the module's loader."""
    text = importlib.resources.files("m2net_jax.data").joinpath("cities.csv").read_text()
    return {
        r["name"]: (float(r["latitude"]), float(r["longitude"]))
        for r in csv.DictReader(io.StringIO(text))
    }


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    geo_twins.build(SMOKE, data_dir=str(data_dir))
    return data_dir


@pytest.fixture(scope="module")
def smoke_examples(smoke_dir):
    builder = tfds.builder(SMOKE, data_dir=str(smoke_dir))
    return {split: list(builder.as_data_source(split)) for split in ("train", "test")}


def test_smoke_builds_from_scratch_as_array_record_with_all_features(smoke_dir, smoke_examples):
    builder = tfds.builder(SMOKE, data_dir=str(smoke_dir))
    config = builder.builder_config
    num_classes = config.num_archetypes * config.cities_per_archetype
    assert builder.info.file_format.value == "array_record"
    assert list((smoke_dir / "geo_twins" / "smoke").glob("*/*.array_record*"))
    assert builder.info.splits["train"].num_examples == num_classes * config.train_per_class
    assert builder.info.splits["test"].num_examples == num_classes * config.test_per_class
    example = smoke_examples["train"][0]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["location"].shape == (8,) and example["location"].dtype == np.float32
    for key in ("label", "landmark_id", "latitude", "longitude", "image_id", "archetype", "city"):
        assert key in example
    labels = [e["label"] for e in smoke_examples["train"]]
    assert collections.Counter(labels) == {k: config.train_per_class for k in range(num_classes)}
    image_ids = [e["image_id"] for split in smoke_examples.values() for e in split]
    assert len(set(image_ids)) == len(image_ids)


def test_same_seed_writes_byte_identical_array_record_files_in_another_process(smoke_dir, tmp_path):
    # A separate process: the protobuf runtime's map order is seeded per process, so an
    # in-process rebuild would not catch nondeterministic serialisation.
    code = (
        "from m2net_jax.data import geo_twins; "
        f"geo_twins.build({SMOKE!r}, data_dir={str(tmp_path)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO_ROOT)
    first = sorted((smoke_dir / "geo_twins" / "smoke").rglob("*.array_record*"))
    second = sorted((tmp_path / "geo_twins" / "smoke").rglob("*.array_record*"))
    assert [p.name for p in first] == [p.name for p in second] and first
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_every_archetype_stands_in_at_least_two_cities(smoke_dir, smoke_examples):
    builder = tfds.builder(SMOKE, data_dir=str(smoke_dir))
    builder_names = builder.info.features["label"].names
    cities_of = collections.defaultdict(set)
    for example in smoke_examples["train"]:
        city = example["city"].decode()
        name = builder_names[example["label"]]
        archetype = name.split("@")[0]
        assert name == f"{archetype}@{city}"
        cities_of[archetype].add(city)
    assert len(cities_of) == builder.builder_config.num_archetypes
    assert all(len(cities) >= 2 for cities in cities_of.values()), cities_of


def test_locations_lie_within_15_km_of_their_city(smoke_examples):
    cities = city_table()
    for split, examples in smoke_examples.items():
        city = np.array([cities[e["city"].decode()] for e in examples])
        lat = np.array([e["latitude"] for e in examples])
        lon = np.array([e["longitude"] for e in examples])
        decoded_lat, decoded_lon = geo.decode_location(np.stack([e["location"] for e in examples]))
        for la, lo in ((lat, lon), (decoded_lat, decoded_lon)):
            distance = haversine_km(la, lo, city[:, 0], city[:, 1])
            assert distance.max() < 15.0, split
        # Jittered, not all on the city centre.
        assert np.median(haversine_km(lat, lon, city[:, 0], city[:, 1])) > 0.3


def test_each_default_city_hosts_several_archetypes():
    # The location alone must not give the class (several landmarks per city, Fig. 5a).
    config = tfds.builder("geo_twins").builder_config
    hosted = collections.Counter(c.city.name for c in config.classes)
    assert len(config.classes) == config.num_archetypes * config.cities_per_archetype
    assert min(hosted.values()) >= 2


def test_plain_name_selects_the_32px_default_and_all_resolutions_exist():
    builder = tfds.builder("geo_twins")
    assert builder.builder_config.name == "32px"
    assert builder.builder_config.image_size == 32
    sizes = {c.image_size for c in geo_twins.GeoTwins.BUILDER_CONFIGS}
    assert {32, 64, 112, 224} <= sizes
    for config in geo_twins.GeoTwins.BUILDER_CONFIGS:
        assert tfds.builder(f"geo_twins/{config.name}").builder_config is config


def test_identical_twins_build_is_the_standard_set_without_the_city_cue():
    """`geo_twins/32px_identical`: the 32px classes, photos rendered with twin_cue=0, where
    twins drawn with the same randomness are the same photo (next test)."""
    standard = tfds.builder("geo_twins/32px").builder_config
    identical = tfds.builder("geo_twins/32px_identical").builder_config
    assert identical.twin_cue == 0.0 and standard.twin_cue == 1.0
    assert identical.classes == standard.classes
    for field in ("image_size", "train_per_class", "test_per_class", "jitter_km", "seed"):
        assert getattr(identical, field) == getattr(standard, field)


def test_twins_differ_only_by_the_city_cue():
    classes = geo_twins.class_table(num_archetypes=2, cities_per_archetype=3, num_cities=4, seed=0)
    tower_a, tower_b, arch = classes[0], classes[2], classes[3]
    assert tower_a.archetype == tower_b.archetype != arch.archetype
    no_cue = geo_twins.RenderOptions(image_size=32, twin_cue=0.0)

    def photo(cls, options):
        return geo_twins.render(cls, np.random.default_rng(7), options).astype(np.int64)

    # Without the cue, twins drawn with the same randomness are the same photo.
    np.testing.assert_array_equal(photo(tower_a, no_cue), photo(tower_b, no_cue))
    cued = geo_twins.RenderOptions(image_size=32)
    twin_gap = np.abs(photo(tower_a, cued) - photo(tower_b, cued)).mean()
    archetype_gap = np.abs(photo(tower_a, cued) - photo(arch, cued)).mean()
    assert 0 < twin_gap < archetype_gap


def test_build_refuses_other_datasets(tmp_path):
    with pytest.raises(ValueError, match="geo_twins"):
        geo_twins.build("landmark420", data_dir=str(tmp_path))


def test_jitter_is_capped_at_four_sigma_per_axis():
    city = geo_twins.City("equator", 0.0, 179.99)
    rng = np.random.default_rng(0)
    points = np.array([geo_twins.jittered_location(city, rng, jitter_km=2.5) for _ in range(2000)])
    distance = haversine_km(points[:, 0], points[:, 1], 0.0, 179.99)
    assert distance.max() <= 4 * 2.5 * math.sqrt(2) + 0.05
    assert np.all(np.abs(points[:, 1]) <= 180.0)  # wrapped across the antimeridian


def test_builder_has_a_description_the_paper_citation_and_the_paper_as_homepage():
    info = tfds.builder("geo_twins/smoke", data_dir="/nonexistent-tfds-dir").info
    assert "twins" in info.description.lower() and "Fig. 1" in info.description
    citation = " ".join(info.citation.split())
    assert citation.startswith("@article{")
    assert "Diversifying Inference Path Selection: Moving-Mobile-Network for Landmark" in citation
    assert citation.count("{") == citation.count("}")
    # Not TFDS's placeholder catalogue page.
    assert info.homepage == "https://arxiv.org/abs/1912.00418"
