"""geo_twins' classes: landmark archetypes placed in real cities, and where their photos are taken.

A geo_twins class is one (archetype, city) pair, named like ``tower@paris``; the archetypes are
the kinds of landmark the drawing code knows (`ARCHETYPES`), the cities come from the table
shipped with the package (`cities.csv`). One archetype stands in several cities (the *twins* of
the paper's Fig. 1) and every city hosts several archetypes, so neither the photo nor the
location alone gives the class. A photo's location is its city plus a few km of Gaussian jitter.
"""

import csv
import dataclasses
import functools
import importlib.resources
import io
import math

import numpy as np

ARCHETYPES = (
    "tower",
    "arch",
    "dome",
    "pyramid",
    "bridge",
    "obelisk",
    "pagoda",
    "lighthouse",
    "windmill",
    "amphitheatre",
)

_KM_PER_DEGREE = 111.32  # one degree of latitude (and of longitude at the equator)


@dataclasses.dataclass(frozen=True)
class City:
    name: str
    latitude: float
    longitude: float


@functools.cache
def load_cities() -> tuple[City, ...]:
    """The city table shipped with the package (`m2net_jax/data/cities.csv`)."""
    text = importlib.resources.files("m2net_jax.data").joinpath("cities.csv").read_text()
    rows = csv.DictReader(io.StringIO(text))
    return tuple(City(r["name"], float(r["latitude"]), float(r["longitude"])) for r in rows)


@dataclasses.dataclass(frozen=True)
class LandmarkClass:
    """One geo_twins class: an archetype standing in a city.

    `twin_cue` in [-1, 1] places this class among its twins: the per-city cue (proportions,
    detail, tint) is this number times the config's cue strength, spread evenly over the twins
    so that neighbouring twins are equally (and only slightly) different.
    """

    name: str
    archetype: str
    city: City
    twin_cue: float


def class_table(
    *, num_archetypes: int, cities_per_archetype: int, num_cities: int, seed: int
) -> tuple[LandmarkClass, ...]:
    """The classes of a config, archetype-major: label = archetype_index * cities + slot.

    `num_cities` cities are drawn from the table; each archetype then takes the
    `cities_per_archetype` of them that host the fewest archetypes so far (ties broken at
    random), so every city hosts about num_archetypes * cities_per_archetype / num_cities
    archetypes. The location alone then does not give the class (several landmarks per city,
    Fig. 5a), and the photo alone does not either (one archetype in several cities, Fig. 5b).
    """
    cities = load_cities()
    if not 1 <= num_archetypes <= len(ARCHETYPES):
        raise ValueError(f"num_archetypes={num_archetypes} must be in [1, {len(ARCHETYPES)}].")
    if not 1 <= cities_per_archetype <= num_cities <= len(cities):
        raise ValueError(
            f"Need 1 <= cities_per_archetype={cities_per_archetype} <= num_cities={num_cities}"
            f" <= {len(cities)} (the size of the city table)."
        )
    rng = np.random.default_rng([seed, 2718])
    pool = [cities[int(i)] for i in rng.choice(len(cities), size=num_cities, replace=False)]
    hosted = np.zeros(num_cities, np.int64)
    cues = np.linspace(-1.0, 1.0, cities_per_archetype) if cities_per_archetype > 1 else [0.0]
    table = []
    for archetype in ARCHETYPES[:num_archetypes]:
        order = rng.permutation(num_cities)
        chosen = sorted(order[np.argsort(hosted[order], kind="stable")[:cities_per_archetype]])
        hosted[chosen] += 1
        for cue, city_index in zip(cues, chosen, strict=True):
            city = pool[city_index]
            table.append(LandmarkClass(f"{archetype}@{city.name}", archetype, city, float(cue)))
    return tuple(table)


def jittered_location(city: City, rng: np.random.Generator, *, jitter_km: float):
    """The city's coordinates moved by Gaussian jitter (σ = jitter_km per axis, cut at 4σ)."""
    north, east = np.clip(rng.normal(0.0, jitter_km, 2), -4 * jitter_km, 4 * jitter_km)
    latitude = city.latitude + north / _KM_PER_DEGREE
    longitude = city.longitude + east / (_KM_PER_DEGREE * math.cos(math.radians(city.latitude)))
    return latitude, (longitude + 180.0) % 360.0 - 180.0
