"""The photos and paths of Fig. 5: look-alike landmarks (twins) from a dataset with
`archetype`/`city` features, and the greedy paths a finished system's policy network picks.

The photos are read from the TFDS build with `tfds.builder(...).as_data_source`, which needs no
TensorFlow.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from m2net_jax import checkpoint
from m2net_jax import policy_gradient as pg
from m2net_jax.state import network_variables


def twin_examples(config: ml_collections.ConfigDict, *, per_class: int = 2) -> dict | None:
    """Test photos for a Fig. 5-style picture, from a dataset with `archetype`/`city` features.

    Picks the archetype of class 0 and (a) one photo set per archetype standing in the city of
    its first twin — one place, different landmarks — and (b) one per city that archetype stands
    in — look-alike landmarks in different places.

    Returns:
      None when the dataset has no such features (the GLDv2 subsets); else a dict with
      'same_city' and 'twins', each a batch dict as the eval pipeline makes it (image,
      policy_image, location, label) plus 'names' (E,) "archetype@city", and 'archetype',
      'city'.
    """
    import tensorflow_datasets as tfds

    from m2net_jax.data import pipeline

    builder = tfds.builder(config.data.dataset, data_dir=config.data.data_dir)
    features = builder.info.features
    if "archetype" not in features or "city" not in features:
        return None
    archetype_names = features["archetype"].names
    source = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
    # One pass over the split's metadata; photos in generation order (image_id), not file order.
    rows = []
    for index in range(len(source)):
        record = source[index]
        city = record["city"].decode() if isinstance(record["city"], bytes) else record["city"]
        rows.append((record["image_id"], index, int(record["archetype"]), city, record["label"]))
    by_class: dict[tuple[int, str], list[int]] = {}
    for _, index, archetype, city, _ in sorted(rows):
        by_class.setdefault((archetype, city), []).append(index)
    archetype = next(row_archetype for _, _, row_archetype, _, label in rows if label == 0)
    twins = sorted(
        twin_city for twin_archetype, twin_city in by_class if twin_archetype == archetype
    )
    city = twins[0]
    same_city = sorted(
        other_archetype for other_archetype, other_city in by_class if other_city == city
    )

    transforms = (
        pipeline.DecodeImage(),
        pipeline.ResizeCentreCrop(size=config.data.image_size),
        pipeline.AddPolicyImage(),
        pipeline.ToModelInputs(),
    )

    def batch(keys):
        elements, names = [], []
        for key_archetype, key_city in keys:
            for index in by_class[(key_archetype, key_city)][:per_class]:
                element = {**source[index], "index": index}
                for transform in transforms:
                    element = transform.map(element)
                elements.append(element)
                names.append(f"{archetype_names[key_archetype]}@{key_city}")
        stacked = {key: np.stack([element[key] for element in elements]) for key in elements[0]}
        return {**stacked, "names": names}

    return {
        "same_city": batch([(other_archetype, city) for other_archetype in same_city]),
        "twins": batch([(archetype, twin_city) for twin_city in twins]),
        "archetype": archetype_names[archetype],
        "city": city,
    }


def greedy_paths(system_dir: str, config: ml_collections.ConfigDict, batch) -> np.ndarray | None:
    """The greedy policies (E, N) bool that a finished system's policy network picks for `batch`.

    Uses the system's finetune checkpoint (else its policy checkpoint); None when it has neither
    (its policy stages ran 0 epochs).
    """
    for stage in ("finetune", "policy"):
        restored = checkpoint.restore_variables(system_dir, stage, config)
        if restored is not None:
            break
    else:
        return None
    variables = jax.device_get(restored.variables)
    policy = restored.networks.policy.clone(axis_name=None)
    probs = policy.apply(
        network_variables(variables, "policy"),
        batch["policy_image"],
        batch["location"],
        train=False,
    )
    return np.asarray(pg.greedy_policy(probs)) > 0.5
