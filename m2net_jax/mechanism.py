"""Metrics of M²Net's mechanism: does the location tell look-alike landmarks apart, and how?

The paper's motivation (Fig. 1) is a failure of image-only networks: an Eiffel-like tower in
Paris and its copy in Las Vegas look almost the same, so a network that sees only the photo calls
them one landmark. M²Net's answer is that the policy network reads the location too, so two
look-alikes in different places get different inference paths (Fig. 1d, Fig. 5b), where
BlockDrop, blind to the location, gives them the same one (Fig. 5c). Accuracy and the number of
distinct paths alone do not show whether that is what happens; these metrics do:

- **twin accuracy** — among the test photos whose archetype was recognised, the fraction also
  given the right city. This is the part of the problem only the location can solve.
- **image-only ceiling** — what a system that cannot tell twins apart would score with the same
  archetype recognition (`image_only_ceiling`); accuracy above it needs the location (or, where
  twins differ slightly in the image, a cue the photo still carries).
- **path–city mutual information** — how many bits about the photo's city its greedy path
  carries (`path_city_mutual_information`).
- **look-alike paths differ** — the fraction of look-alike pairs (same archetype, different city)
  whose greedy paths differ (`lookalike_paths_differ`): Fig. 5b measured over the test split.

Classes have the geo_twins structure: one class per (archetype, city), named ``tower@paris``
(`m2net_jax.data.geo_twins.class_table`). Datasets without it (Landmark-420/732) get no
mechanism metrics: `mechanism_metrics` returns an empty dict for them.

Shapes: E test photos, N droppable blocks, K classes. `predictions` and `labels` are (E,) int
class ids in [0, K); `policies` are (E, N) in {0, 1} (bool or numeric), the greedy policy of
Eqn 8 per photo. Pure numpy: no JAX, no I/O.
"""

from collections.abc import Sequence

import numpy as np

_LN2 = np.log(2.0)


# ----------------------------------------------------------------------------------------------
# Class structure.


def _split_name(name: str) -> tuple[str, str]:
    archetype, at, city = name.partition("@")
    if not (at and archetype and city) or "@" in city:
        raise ValueError(
            f"Class name {name!r} is not of the form 'archetype@city' (one '@' between two "
            "non-empty parts). Only geo_twins class names have a twin structure; check "
            "has_twin_structure(class_names) first."
        )
    return archetype, city


def class_structure(class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The archetype and city of each class, from names ``archetype@city``.

    Args:
      class_names: K names, e.g. ``("tower@paris", "tower@tokyo", "arch@paris")``.

    Returns:
      `(archetype_of_class, city_of_class)`, two (K,) int64 arrays. Ids number the distinct
      archetypes (cities) in order of first appearance; classes in the same city share its id
      whatever their archetype.

    Raises:
      ValueError: a name is not ``archetype@city``, or two classes have the same name.
    """
    names = list(class_names)
    pairs = [_split_name(name) for name in names]
    if len(set(pairs)) != len(pairs):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Class names must be distinct; repeated: {duplicates}.")
    archetype_ids: dict[str, int] = {}
    city_ids: dict[str, int] = {}
    archetype_of_class = [archetype_ids.setdefault(a, len(archetype_ids)) for a, _ in pairs]
    city_of_class = [city_ids.setdefault(c, len(city_ids)) for _, c in pairs]
    return np.asarray(archetype_of_class, np.int64), np.asarray(city_of_class, np.int64)


def has_twin_structure(class_names: Sequence[str]) -> bool:
    """Whether the classes are distinct ``archetype@city`` names with at least one twin.

    A twin is an archetype standing in two or more cities. Without one there is nothing to tell
    apart by location and the mechanism metrics are not computed.
    """
    try:
        archetype_of_class, _ = class_structure(class_names)
    except ValueError:
        return False
    return bool(archetype_of_class.size) and bool(np.bincount(archetype_of_class).max() > 1)


# ----------------------------------------------------------------------------------------------
# Validation at the public boundary.


def _class_ids(name: str, values, num_classes: int) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D array of int class ids, got {values.dtype} {values.shape}."
        )
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (the number of classes), got values in "
            f"[{values.min()}, {values.max()}]."
        )
    return values.astype(np.int64)


def _predictions_and_labels(predictions, labels, num_classes: int):
    predictions = _class_ids("predictions", predictions, num_classes)
    labels = _class_ids("labels", labels, num_classes)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must have one entry per "
            "test photo."
        )
    return predictions, labels


def _path_ids(policies, num_examples: int | None = None) -> np.ndarray:
    """(E,) int64: the index of each photo's path among the distinct rows of `policies`."""
    policies = np.asarray(policies)
    if policies.ndim != 2:
        raise ValueError(f"policies must be (E, N), got shape {policies.shape}.")
    if num_examples is not None and policies.shape[0] != num_examples:
        raise ValueError(
            f"policies have {policies.shape[0]} rows but there are {num_examples} test photos."
        )
    if not np.isin(policies, (0, 1)).all():
        raise ValueError("policies must be in {0, 1} (the greedy policy of Eqn 8).")
    if policies.shape[0] == 0 or policies.shape[1] == 0:
        return np.zeros(policies.shape[0], np.int64)
    # One opaque bytes value per row: a 1-D unique is far faster than np.unique(axis=0).
    packed = np.ascontiguousarray(np.packbits(policies.astype(bool), axis=1))
    rows = packed.view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    return _dense_ids(rows)


def _dense_ids(values: np.ndarray) -> np.ndarray:
    """(E,) int64 in [0, number of distinct values): the rank of each value among them."""
    _, ids = np.unique(values, return_inverse=True)
    return ids.reshape(-1).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Accuracies.


def archetype_accuracy(predictions, labels, archetype_of_class) -> float:
    """The fraction of test photos whose predicted class has the right archetype.

    `archetype[predictions] == archetype[labels]`, averaged over the E photos; NaN when E = 0.
    """
    archetype_of_class = np.asarray(archetype_of_class)
    predictions, labels = _predictions_and_labels(predictions, labels, len(archetype_of_class))
    if not labels.size:
        return float("nan")
    return float(np.mean(archetype_of_class[predictions] == archetype_of_class[labels]))


def twin_accuracy(predictions, labels, archetype_of_class) -> float:
    """Among the test photos whose archetype was recognised, the fraction given the right city.

    A class is one (archetype, city) pair, so a photo with the right archetype has the right
    city exactly when its predicted class is right:

        twin_accuracy = #{i : pred_i = label_i} / #{i : archetype(pred_i) = archetype(label_i)}.

    Every recognised photo counts, also those of an archetype with one city (which are then
    right by construction; geo_twins gives every archetype the same number of cities). NaN when
    no archetype was recognised.
    """
    archetype_of_class = np.asarray(archetype_of_class)
    predictions, labels = _predictions_and_labels(predictions, labels, len(archetype_of_class))
    recognised = archetype_of_class[predictions] == archetype_of_class[labels]
    if not recognised.any():
        return float("nan")
    return float(np.sum(predictions == labels) / np.sum(recognised))


def image_only_ceiling(predictions, labels, archetype_of_class, city_of_class) -> float:
    """The accuracy a system blind to twin differences gets with this archetype recognition.

    The reference system recognises each photo's archetype exactly when the measured system does
    and then guesses uniformly among that archetype's n_a cities (n_a = the number of distinct
    cities among archetype a's classes). Its expected accuracy, over photos i with true archetype
    a_i, is

        ceiling = (1/E) Σ_i [archetype(pred_i) = a_i] / n_{a_i}
                = (1/E) Σ_a E_a · acc_a / n_a,

    with E_a the test photos of archetype a and acc_a their measured archetype accuracy. With
    equal city counts n this is archetype_accuracy / n; with unequal counts each archetype is
    divided by its own (an overall archetype accuracy divided by a mean n would be wrong).

    Why it is a ceiling: when twins are identical in the image (geo_twins' twin_cue = 0), the
    photo's distribution is the same for all cities of an archetype, so an image-only system
    predicts the same distribution over classes q_1..q_n for all of them; on a test split with
    equally many photos per class (geo_twins') its accuracy on archetype a is then
    (1/n) Σ_j q_j = acc_a / n_a whatever it does. (With unequal city frequencies w_j among an
    archetype's test photos it could reach max_j w_j · acc_a by always naming the commonest city;
    this function keeps the uniform guess.) With twin_cue > 0 the photo carries a small cue and an
    image-only system may beat it; the ceiling is then the reference for "twins not told apart".

    NaN when E = 0.
    """
    archetype_of_class = np.asarray(archetype_of_class)
    city_of_class = np.asarray(city_of_class)
    if archetype_of_class.shape != city_of_class.shape:
        raise ValueError(
            f"archetype_of_class {archetype_of_class.shape} and city_of_class "
            f"{city_of_class.shape} must have one entry per class."
        )
    predictions, labels = _predictions_and_labels(predictions, labels, len(archetype_of_class))
    if not labels.size:
        return float("nan")
    # n_a: distinct cities among archetype a's classes (= its classes when names are distinct).
    archetype_city = np.unique(np.stack([archetype_of_class, city_of_class], axis=1), axis=0)
    cities_per_archetype = np.bincount(archetype_city[:, 0])
    true_archetype = archetype_of_class[labels]
    recognised = archetype_of_class[predictions] == true_archetype
    return float(np.mean(recognised / cities_per_archetype[true_archetype]))


# ----------------------------------------------------------------------------------------------
# Paths.


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def city_entropy_bits(cities) -> float:
    """H(city) in bits, the empirical entropy of the test photos' cities: the most any path can
    say about the city (the bound of `path_city_mutual_information`)."""
    cities = np.asarray(cities)
    if not cities.size:
        return float("nan")
    _, counts = np.unique(cities, return_counts=True)
    return _entropy_bits(counts)


def path_city_mutual_information(policies, cities, *, miller_madow: bool = False) -> float:
    """I(path; city) in bits between the test photos' greedy paths and their cities.

    A path is a distinct row of `policies`. From the joint counts n_pc of path p and city c over
    the E photos (marginals n_p, n_c), the plug-in estimate is

        I = Σ_{p,c} (n_pc / E) · log2(n_pc · E / (n_p · n_c))   (terms with n_pc = 0 omitted),

    0 when paths and cities are independent in the sample (one path for all photos, say) and
    H(city) when the path determines the city. It is clipped at 0 against rounding.

    Bias: with few photos per (path, city) cell the plug-in estimate is biased *upward* — even
    paths independent of the city show I > 0 (about (m_p − 1)(m_c − 1) / (2 E ln 2) bits for m_p
    paths and m_c cities). With `miller_madow=True` each of the three entropies in
    I = H(P) + H(C) − H(P, C) gets the Miller–Madow term (m − 1) / (2 E ln 2), m its number of
    non-empty cells, so

        I_MM = I + ((m_p − 1) + (m_c − 1) − (m_pc − 1)) / (2 E ln 2),

    which removes the leading bias; it can be (slightly) negative and is not clipped.

    Args:
      policies: (E, N) in {0, 1}, the greedy policy per photo.
      cities: (E,) city ids (ints, or any values np.unique sorts), the city of each photo.

    Returns:
      bits as a float; NaN when E = 0.
    """
    cities = np.asarray(cities)
    if cities.ndim != 1:
        raise ValueError(f"cities must be (E,), got shape {cities.shape}.")
    paths = _path_ids(policies, cities.shape[0])
    num_examples = cities.shape[0]
    if not num_examples:
        return float("nan")
    city_ids = _dense_ids(cities)
    num_cities = int(city_ids.max()) + 1
    joint = np.bincount(paths * num_cities + city_ids)
    cells = np.nonzero(joint)[0]
    n_pc = joint[cells].astype(np.float64)
    n_p = np.bincount(paths)[cells // num_cities].astype(np.float64)
    n_c = np.bincount(city_ids)[cells % num_cities].astype(np.float64)
    mi = float(np.sum(n_pc / num_examples * np.log2(n_pc * num_examples / (n_p * n_c))))
    mi = max(mi, 0.0)
    if miller_madow:
        m_p, m_c, m_pc = int(paths.max()) + 1, num_cities, len(cells)
        mi += ((m_p - 1) + (m_c - 1) - (m_pc - 1)) / (2 * num_examples * _LN2)
    return float(mi)


def _pairs_with_different_city(groups: np.ndarray, cities: np.ndarray) -> int:
    """Unordered pairs of photos in the same group and different cities, counted per group as
    (S_g² − Σ_c n_gc²) / 2 with n_gc the photos of group g in city c and S_g = Σ_c n_gc."""
    if not groups.size:
        return 0
    groups, cities = _dense_ids(groups), _dense_ids(cities)
    group_sizes = np.bincount(groups)
    # Both ids are < E, so g · E + c numbers the (group, city) cells without collisions.
    _, cell_sizes = np.unique(groups * len(groups) + cities, return_counts=True)
    return int((np.sum(group_sizes**2) - np.sum(cell_sizes.astype(np.int64) ** 2)) // 2)


def lookalike_paths_differ(policies, labels, archetype_of_class, city_of_class) -> float:
    """The fraction of look-alike pairs of test photos whose greedy paths differ.

    A look-alike pair is an unordered pair {i, j}, i ≠ j, of test photos whose true classes have
    the same archetype and different cities (Fig. 5b). Counted without the E × E matrix: within
    an archetype a, with n_ac photos in city c, there are (S_a² − Σ_c n_ac²) / 2 look-alike
    pairs (S_a = Σ_c n_ac); those with the same path are counted the same way within each
    (archetype, path) group, and

        lookalike_paths_differ = 1 − Σ_{a,p} same-path pairs / Σ_a look-alike pairs.

    1 when every look-alike pair is routed differently (the location always changes the path),
    0 for a policy blind to the location that gives twins one path. NaN when there are no
    look-alike pairs.
    """
    archetype_of_class = np.asarray(archetype_of_class)
    city_of_class = np.asarray(city_of_class)
    if archetype_of_class.shape != city_of_class.shape:
        raise ValueError(
            f"archetype_of_class {archetype_of_class.shape} and city_of_class "
            f"{city_of_class.shape} must have one entry per class."
        )
    labels = _class_ids("labels", labels, len(archetype_of_class))
    paths = _path_ids(policies, labels.shape[0])
    archetypes = archetype_of_class[labels].astype(np.int64)
    cities = city_of_class[labels].astype(np.int64)
    pairs = _pairs_with_different_city(archetypes, cities)
    if not pairs:
        return float("nan")
    # (archetype, path) as one group id: path ids are < E, so archetype · E + path is unique.
    same_path = _pairs_with_different_city(archetypes * len(paths) + paths, cities)
    return float(1.0 - same_path / pairs)


# ----------------------------------------------------------------------------------------------
# All of them, for results.json.

METRIC_KEYS = (
    "twin_accuracy",
    "archetype_accuracy",
    "image_only_ceiling",
    "path_city_mi_bits",
    "path_city_mi_bits_miller_madow",
    "city_entropy_bits",
    "lookalike_paths_differ",
)


def mechanism_metrics(predictions, labels, policies, class_names: Sequence[str]) -> dict:
    """The mechanism metrics of one evaluation, keyed by METRIC_KEYS; {} without twin structure.

    Args:
      predictions: (E,) int, the predicted class per test photo (argmax of the logits).
      labels: (E,) int, the true class.
      policies: (E, N) in {0, 1}, the greedy policy per photo (all ones for a stage without a
        policy network: MI 0, no look-alike pair differs).
      class_names: the K class names; ``archetype@city`` names (geo_twins) give the metrics,
        anything else (`has_twin_structure` false) gives an empty dict.

    Returns:
      {twin_accuracy, archetype_accuracy, image_only_ceiling, path_city_mi_bits (plug-in),
      path_city_mi_bits_miller_madow, city_entropy_bits (the MI's upper bound),
      lookalike_paths_differ} as floats; a metric undefined on this split (e.g. no look-alike
      pairs) is None, so results.json stays strict JSON.
    """
    if not has_twin_structure(class_names):
        return {}
    archetype_of_class, city_of_class = class_structure(class_names)
    predictions, labels = _predictions_and_labels(predictions, labels, len(archetype_of_class))
    cities = city_of_class[labels]
    metrics = {
        "twin_accuracy": twin_accuracy(predictions, labels, archetype_of_class),
        "archetype_accuracy": archetype_accuracy(predictions, labels, archetype_of_class),
        "image_only_ceiling": image_only_ceiling(
            predictions, labels, archetype_of_class, city_of_class
        ),
        "path_city_mi_bits": path_city_mutual_information(policies, cities),
        "path_city_mi_bits_miller_madow": path_city_mutual_information(
            policies, cities, miller_madow=True
        ),
        "city_entropy_bits": city_entropy_bits(cities),
        "lookalike_paths_differ": lookalike_paths_differ(
            policies, labels, archetype_of_class, city_of_class
        ),
    }
    return {k: (None if np.isnan(v) else v) for k, v in metrics.items()}
