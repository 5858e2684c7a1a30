"""Tests of m2net_jax.mechanism: each metric against its definition, written out here."""

import itertools
import math

import numpy as np
import pytest

from m2net_jax import mechanism

# Unequal city counts: the tower stands in 3 cities, the arch in 2; Paris hosts both.
NAMES = ("tower@paris", "tower@vegas", "tower@tokyo", "arch@paris", "arch@rome")
ARCHETYPE = np.array([0, 0, 0, 1, 1])
CITY = np.array([0, 1, 2, 0, 3])

# Seven photos. Photo 2 (tower@tokyo) is called arch@paris: archetype missed.
LABELS = np.array([0, 1, 2, 3, 4, 0, 3])
PREDICTIONS = np.array([0, 2, 3, 3, 3, 1, 4])


def test_class_structure_numbers_archetypes_and_cities_in_order_of_first_appearance():
    archetype_of_class, city_of_class = mechanism.class_structure(NAMES)
    np.testing.assert_array_equal(archetype_of_class, ARCHETYPE)
    np.testing.assert_array_equal(city_of_class, CITY)


@pytest.mark.parametrize("bad", ["tower", "tower@", "@paris", "tower@paris@fr", ""])
def test_class_structure_rejects_names_not_archetype_at_city(bad):
    with pytest.raises(ValueError, match="archetype@city"):
        mechanism.class_structure(["arch@rome", bad])


def test_class_structure_rejects_repeated_names():
    with pytest.raises(ValueError, match="tower@paris"):
        mechanism.class_structure(["tower@paris", "arch@rome", "tower@paris"])


def test_has_twin_structure_needs_archetype_at_city_names_and_a_twin():
    assert mechanism.has_twin_structure(NAMES)
    assert not mechanism.has_twin_structure(["landmark_0", "landmark_1"])  # Landmark-420 style
    assert not mechanism.has_twin_structure(["tower@paris", "arch@rome"])  # no archetype twice
    assert not mechanism.has_twin_structure([])


def test_geo_twins_class_table_names_give_its_archetypes_and_cities():
    from m2net_jax.data import geo_twins

    table = geo_twins.class_table(num_archetypes=4, cities_per_archetype=3, num_cities=6, seed=0)
    archetype_of_class, city_of_class = mechanism.class_structure([c.name for c in table])
    assert mechanism.has_twin_structure([c.name for c in table])
    for i, j in itertools.combinations(range(len(table)), 2):
        assert (archetype_of_class[i] == archetype_of_class[j]) == (
            table[i].archetype == table[j].archetype
        )
        assert (city_of_class[i] == city_of_class[j]) == (table[i].city == table[j].city)


# ----------------------------------------------------------------------------------------------
# Accuracies on the hand-made case.


def test_archetype_accuracy_hand_counted():
    # Archetypes right for every photo but photo 2: 6 of 7.
    assert mechanism.archetype_accuracy(PREDICTIONS, LABELS, ARCHETYPE) == pytest.approx(6 / 7)


def test_twin_accuracy_hand_counted():
    # Of the 6 photos with the right archetype, photos 0 and 3 have the right city.
    assert mechanism.twin_accuracy(PREDICTIONS, LABELS, ARCHETYPE) == pytest.approx(2 / 6)


def test_twin_accuracy_is_nan_when_no_archetype_is_recognised():
    assert math.isnan(mechanism.twin_accuracy([3, 0], [0, 3], ARCHETYPE))


def test_image_only_ceiling_divides_each_archetype_by_its_own_city_count():
    # Recognised towers (photos 0, 1, 5) each score 1/3; recognised arches (3, 4, 6) 1/2.
    expected = (3 * (1 / 3) + 3 * (1 / 2)) / 7
    got = mechanism.image_only_ceiling(PREDICTIONS, LABELS, ARCHETYPE, CITY)
    assert got == pytest.approx(expected)
    # Not the overall archetype accuracy over the mean city count.
    assert got != pytest.approx((6 / 7) / np.mean([3, 2]))


def test_image_only_ceiling_is_archetype_accuracy_over_n_for_equal_city_counts():
    archetype_of_class = np.repeat(np.arange(4), 3)
    city_of_class = np.arange(12) % 5
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=200)
    predictions = rng.integers(0, 12, size=200)
    assert mechanism.image_only_ceiling(
        predictions, labels, archetype_of_class, city_of_class
    ) == pytest.approx(mechanism.archetype_accuracy(predictions, labels, archetype_of_class) / 3)


def test_image_only_ceiling_is_the_expected_accuracy_of_a_uniform_city_guess():
    # Simulate the reference system: keep each photo's archetype right/wrong as measured, then
    # pick a city of the true archetype uniformly; the mean accuracy tends to the ceiling.
    rng = np.random.default_rng(1)
    labels = np.tile(LABELS, 3)
    predictions = np.tile(PREDICTIONS, 3)
    recognised = ARCHETYPE[predictions] == ARCHETYPE[labels]
    classes_of = {a: np.flatnonzero(ARCHETYPE == a) for a in (0, 1)}
    trials = 20000
    hits = 0
    for i, label in enumerate(labels):
        if recognised[i]:
            guesses = rng.choice(classes_of[ARCHETYPE[label]], size=trials)
            hits += np.sum(guesses == label)
    simulated = hits / (trials * len(labels))
    ceiling = mechanism.image_only_ceiling(predictions, labels, ARCHETYPE, CITY)
    assert simulated == pytest.approx(ceiling, abs=0.01)


def test_accuracies_reject_class_ids_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mechanism.twin_accuracy([0, 5], [0, 1], ARCHETYPE)
    with pytest.raises(ValueError, match="one entry per test photo"):
        mechanism.archetype_accuracy([0, 1], [0], ARCHETYPE)


# ----------------------------------------------------------------------------------------------
# Path–city mutual information.


def _entropy(values) -> float:
    """Plug-in entropy in bits of a list of hashable values."""
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    n = len(values)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _mutual_information(policies, cities) -> float:
    """I = H(P) + H(C) − H(P, C), paths as tuples."""
    paths = [tuple(int(b) for b in row) for row in policies]
    return (
        _entropy(paths) + _entropy(list(cities)) - _entropy(list(zip(paths, cities, strict=True)))
    )


def _policies_from_codes(codes, num_blocks=4):
    """(E, N) {0, 1} rows: the binary digits of each code."""
    return np.array([[(c >> k) & 1 for k in range(num_blocks)] for c in codes], np.float32)


def test_mutual_information_of_paths_copying_the_city_is_the_city_entropy():
    cities = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    policies = _policies_from_codes(cities * 3 + 1)  # one path per city
    got = mechanism.path_city_mutual_information(policies, cities)
    assert got == pytest.approx(_entropy(list(cities)))
    assert got == pytest.approx(mechanism.city_entropy_bits(cities))


def test_mutual_information_of_constant_paths_is_zero():
    cities = np.array([0, 1, 1, 2, 3, 3, 3])
    assert mechanism.path_city_mutual_information(np.ones((7, 5)), cities) == 0.0


def test_mutual_information_of_paths_balanced_over_cities_is_zero():
    # Every (path, city) combination equally often: independent exactly, in the sample too.
    paths, cities = zip(*itertools.product(range(4), range(3)), strict=True)
    policies = _policies_from_codes(list(paths) * 5)
    got = mechanism.path_city_mutual_information(policies, np.array(list(cities) * 5))
    assert got == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_independent_random_paths_is_near_zero():
    rng = np.random.default_rng(2)
    cities = rng.integers(0, 4, size=20000)
    policies = _policies_from_codes(rng.integers(0, 3, size=20000))
    assert 0.0 <= mechanism.path_city_mutual_information(policies, cities) < 2e-3


def test_miller_madow_removes_the_upward_bias_of_independent_paths_on_average():
    # 3 paths, 4 cities, E = 200: plug-in bias ≈ (3 − 1)(4 − 1) / (2 E ln 2) ≈ 0.0216 bits.
    rng = np.random.default_rng(5)
    e, repeats = 200, 300
    plug_in, corrected = [], []
    for _ in range(repeats):
        cities = rng.integers(0, 4, size=e)
        policies = _policies_from_codes(rng.integers(0, 3, size=e))
        plug_in.append(mechanism.path_city_mutual_information(policies, cities))
        corrected.append(
            mechanism.path_city_mutual_information(policies, cities, miller_madow=True)
        )
    bias = 2 * 3 / (2 * e * math.log(2))
    assert np.mean(plug_in) == pytest.approx(bias, abs=0.004)
    assert abs(np.mean(corrected)) < 0.004


def test_mutual_information_matches_its_definition_on_random_dependent_paths():
    rng = np.random.default_rng(3)
    for _ in range(20):
        e = int(rng.integers(1, 60))
        cities = rng.integers(0, 5, size=e)
        # Paths depend partly on the city: a mix of copying and noise.
        codes = np.where(rng.random(e) < 0.5, cities, rng.integers(0, 8, size=e))
        policies = _policies_from_codes(codes)
        expected = _mutual_information(policies, cities)
        assert mechanism.path_city_mutual_information(policies, cities) == pytest.approx(
            max(expected, 0.0), abs=1e-12
        )


def test_miller_madow_adds_the_cell_count_terms_to_each_entropy():
    cities = np.array([0, 0, 1, 1, 1, 2])
    policies = _policies_from_codes([0, 1, 1, 1, 2, 2])
    # Paths {0, 1, 2} (m_p = 3), cities {0, 1, 2} (m_c = 3); occupied (path, city) cells:
    # (0,0) (1,0) (1,1) (2,1) (2,2): m_pc = 5.
    e = len(cities)
    expected = _mutual_information(policies, cities) + ((3 - 1) + (3 - 1) - (5 - 1)) / (
        2 * e * math.log(2)
    )
    got = mechanism.path_city_mutual_information(policies, cities, miller_madow=True)
    assert got == pytest.approx(expected)


def test_mutual_information_rejects_non_binary_policies_and_mismatched_rows():
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        mechanism.path_city_mutual_information(np.full((2, 3), 0.5), [0, 1])
    with pytest.raises(ValueError, match="3 rows"):
        mechanism.path_city_mutual_information(np.ones((3, 2)), [0, 1])


# ----------------------------------------------------------------------------------------------
# Look-alike pairs.


def _lookalike_paths_differ_pairwise(policies, labels, archetype_of_class, city_of_class):
    """The definition: over unordered pairs with the same archetype and different city."""
    pairs = differ = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        a_i, a_j = archetype_of_class[labels[i]], archetype_of_class[labels[j]]
        c_i, c_j = city_of_class[labels[i]], city_of_class[labels[j]]
        if a_i == a_j and c_i != c_j:
            pairs += 1
            differ += not np.array_equal(policies[i], policies[j])
    return differ / pairs if pairs else float("nan")


def test_lookalike_paths_differ_hand_counted():
    # Photos 0 (tower@paris), 1 (tower@vegas), 2 (tower@tokyo), 3 (arch@paris), 4 (arch@rome).
    labels = np.array([0, 1, 2, 3, 4])
    policies = _policies_from_codes([5, 5, 6, 5, 5])
    # Look-alike pairs: towers {0,1} same, {0,2} differ, {1,2} differ; arches {3,4} same.
    # Photos 0 and 3 share Paris, not an archetype: not a pair though their paths agree.
    got = mechanism.lookalike_paths_differ(policies, labels, ARCHETYPE, CITY)
    assert got == pytest.approx(2 / 4)


def test_lookalike_paths_differ_ignores_pairs_in_the_same_class():
    labels = np.array([0, 0, 1])
    policies = _policies_from_codes([1, 2, 1])
    # Pairs (0,1) is one class; (0,2) same path; (1,2) differs: 1 of 2.
    assert mechanism.lookalike_paths_differ(policies, labels, ARCHETYPE, CITY) == 0.5


def test_lookalike_paths_differ_is_zero_for_constant_paths_and_one_for_city_paths():
    labels = np.tile(np.arange(5), 4)
    assert mechanism.lookalike_paths_differ(np.ones((20, 3)), labels, ARCHETYPE, CITY) == 0.0
    city_paths = _policies_from_codes(CITY[labels])
    assert mechanism.lookalike_paths_differ(city_paths, labels, ARCHETYPE, CITY) == 1.0


def test_lookalike_paths_differ_is_nan_without_lookalike_pairs():
    labels = np.array([0, 0, 3])  # tower@paris twice, arch@paris: no twin of a photo's archetype
    assert math.isnan(mechanism.lookalike_paths_differ(np.ones((3, 2)), labels, ARCHETYPE, CITY))


def test_lookalike_pair_count_matches_the_pairwise_loop_on_random_cases():
    rng = np.random.default_rng(4)
    for _ in range(40):
        num_archetypes = int(rng.integers(1, 4))
        cities_of = [
            rng.choice(6, size=int(rng.integers(1, 4)), replace=False)
            for _ in range(num_archetypes)
        ]
        archetype_of_class = np.concatenate([np.full(len(c), a) for a, c in enumerate(cities_of)])
        city_of_class = np.concatenate(cities_of)
        e = int(rng.integers(0, 50))
        labels = rng.integers(0, len(archetype_of_class), size=e)
        policies = _policies_from_codes(rng.integers(0, 4, size=e), num_blocks=2)
        expected = _lookalike_paths_differ_pairwise(
            policies, labels, archetype_of_class, city_of_class
        )
        got = mechanism.lookalike_paths_differ(policies, labels, archetype_of_class, city_of_class)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# All together.


def test_mechanism_metrics_gives_each_metric_under_its_key():
    policies = _policies_from_codes([1, 2, 3, 1, 2, 1, 1])
    metrics = mechanism.mechanism_metrics(PREDICTIONS, LABELS, policies, NAMES)
    assert tuple(metrics) == mechanism.METRIC_KEYS
    cities = CITY[LABELS]
    assert metrics["twin_accuracy"] == pytest.approx(2 / 6)
    assert metrics["archetype_accuracy"] == pytest.approx(6 / 7)
    assert metrics["image_only_ceiling"] == pytest.approx(2.5 / 7)
    assert metrics["path_city_mi_bits"] == pytest.approx(_mutual_information(policies, cities))
    assert metrics["city_entropy_bits"] == pytest.approx(_entropy(list(cities)))
    assert metrics["lookalike_paths_differ"] == pytest.approx(
        _lookalike_paths_differ_pairwise(policies, LABELS, ARCHETYPE, CITY)
    )
    assert all(isinstance(v, float) for v in metrics.values())


def test_mechanism_metrics_is_empty_without_twin_structure():
    names = [f"landmark_{k}" for k in range(5)]
    assert mechanism.mechanism_metrics(PREDICTIONS, LABELS, np.ones((7, 3)), names) == {}


def test_mechanism_metrics_reports_undefined_metrics_as_none():
    # Only tower@paris photos: no look-alike pairs; archetype never recognised.
    labels = np.array([0, 0])
    predictions = np.array([3, 4])
    metrics = mechanism.mechanism_metrics(predictions, labels, np.ones((2, 3)), NAMES)
    assert metrics["lookalike_paths_differ"] is None
    assert metrics["twin_accuracy"] is None
    assert metrics["archetype_accuracy"] == 0.0
