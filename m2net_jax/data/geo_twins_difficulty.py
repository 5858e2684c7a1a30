"""How hard geo_twins is by design: what a photo alone tells, and what the location adds.

geo_twins is meant to reproduce the paper's Fig. 1 problem: different archetypes are easy,
twins (one archetype in different cities) are hard from the photo alone, and the location
resolves them. This module measures that with a small image-only CNN trained briefly through
the real input pipeline (random resized crops and flips, as the recognizer sees them):

* archetype accuracy — the CNN's archetype (its class probabilities summed per archetype);
* twin accuracy — the CNN's choice among the classes of the true archetype (chance 1/cities);
* image-only accuracy — the CNN's class over all K classes;
* location-known accuracy — the CNN's archetype plus the city nearest to the photo's location;
* location-only accuracy — the nearest city plus a uniform guess among the archetypes standing
  there (expected value; it shows that the location alone is not enough either).

Run (builds the dataset if it is missing; about a minute on 2 CPU cores):

    python -m m2net_jax.data.geo_twins_difficulty --dataset=geo_twins [--data_dir=DIR]

The numbers are in BUILD_NOTES.md.
"""

import collections
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from m2net_jax import geo
from m2net_jax.data import geo_twins, pipeline

_DATASET = flags.DEFINE_string("dataset", "geo_twins", "A geo_twins config, e.g. geo_twins/64px.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Resolution the CNN sees.")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Training batch size.")
_WIDTH = flags.DEFINE_integer("width", 16, "Channels of the CNN's first stage.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data order, augmentation and init.")


class SmallCNN(nn.Module):
    """Three stages of two 3x3 conv + batch norm + ReLU (width, 2·width, 4·width channels),
    2x2 max pooling between stages, global average pooling, Dense(K)."""

    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, images, train: bool = False):
        """images: (B, H, W, 3) float32 in [0, 1] -> (B, K) logits."""
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = images - 0.5
        for stage in range(3):
            for _ in range(2):
                x = nn.relu(norm()(conv(self.width * 2**stage)(x)))
            if stage < 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def train_classifier(
    *,
    dataset: str,
    data_dir: str | None,
    num_classes: int,
    image_size: int,
    steps: int,
    batch_size: int,
    width: int,
    seed: int,
):
    """Trains `SmallCNN` with Adam on the training pipeline; returns (model, variables)."""
    model = SmallCNN(num_classes=num_classes, width=width)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))
    params, batch_stats = variables["params"], variables["batch_stats"]
    schedule = optax.cosine_decay_schedule(3e-3, steps)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    batches = pipeline.make_train_iterator(
        dataset,
        data_dir=data_dir,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        shard_index=0,
        shard_count=1,
    )
    for i in range(steps):
        batch = next(batches)
        params, batch_stats, opt_state, loss = step(
            params, batch_stats, opt_state, batch["image"], batch["label"]
        )
        if i % 100 == 0 or i == steps - 1:
            logging.info("step %d/%d  loss %.3f", i, steps, float(loss))
    return model, {"params": params, "batch_stats": batch_stats}


def difficulty(
    *, model, variables, dataset: str, data_dir: str | None, image_size: int
) -> dict[str, float]:
    """The accuracies of the module docstring on the test split."""
    spec = pipeline.dataset_info(dataset, data_dir=data_dir)
    archetype_of = np.array([name.split("@")[0] for name in spec.class_names])
    city_of = np.array([name.split("@")[1] for name in spec.class_names])
    archetypes = sorted(set(archetype_of))
    cities = {c.name: c for c in geo_twins.load_cities()}
    used_cities = sorted(set(city_of))
    city_lat = np.radians([cities[c].latitude for c in used_cities])
    city_lon = np.radians([cities[c].longitude for c in used_cities])
    class_of = {(a, c): k for k, (a, c) in enumerate(zip(archetype_of, city_of, strict=True))}
    archetypes_in_city = collections.Counter(city_of)

    apply = jax.jit(functools.partial(model.apply, variables))
    counts = collections.Counter()
    batches = pipeline.make_eval_iterator(
        dataset,
        data_dir=data_dir,
        image_size=image_size,
        batch_size=256,
        shard_index=0,
        shard_count=1,
    )
    for batch in batches:
        keep = batch["mask"]
        logits = np.asarray(apply(batch["image"]))[keep]
        labels = batch["label"][keep]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        per_archetype = np.stack([probs[:, archetype_of == a].sum(axis=1) for a in archetypes], 1)
        predicted_archetype = np.array(archetypes)[per_archetype.argmax(axis=1)]
        same_archetype = archetype_of[None, :] == archetype_of[labels][:, None]
        twin_choice = np.where(same_archetype, logits, -np.inf).argmax(axis=1)
        # Nearest city by great-circle distance (haversine) to the decoded photo location.
        lat, lon = (np.radians(v) for v in geo.decode_location(batch["location"][keep]))
        hav = (
            np.sin((city_lat[None] - lat[:, None]) / 2) ** 2
            + np.cos(lat[:, None])
            * np.cos(city_lat[None])
            * np.sin((city_lon[None] - lon[:, None]) / 2) ** 2
        )
        nearest_city = np.array(used_cities)[hav.argmin(axis=1)]
        located = [
            class_of.get((a, c), -1) for a, c in zip(predicted_archetype, nearest_city, strict=True)
        ]
        counts["n"] += len(labels)
        counts["image_only"] += int((logits.argmax(axis=1) == labels).sum())
        counts["archetype"] += int((predicted_archetype == archetype_of[labels]).sum())
        counts["twin"] += int((twin_choice == labels).sum())
        counts["location_known"] += int((np.array(located) == labels).sum())
        location_only = (nearest_city == city_of[labels]) / np.array(
            [archetypes_in_city[c] for c in nearest_city]
        )
        counts["location_only"] += float(location_only.sum())
    n = counts.pop("n")
    accuracies = {name: value / n for name, value in counts.items()}
    accuracies["twin_chance"] = 1.0 / np.mean([np.sum(archetype_of == a) for a in archetypes])
    accuracies["image_only_chance"] = 1.0 / len(spec.class_names)
    return accuracies


def main(argv):
    del argv
    spec = pipeline.ensure_built(_DATASET.value, data_dir=_DATA_DIR.value, build_if_missing=True)
    start = time.time()
    model, variables = train_classifier(
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        num_classes=spec.num_classes,
        image_size=_IMAGE_SIZE.value,
        steps=_STEPS.value,
        batch_size=_BATCH_SIZE.value,
        width=_WIDTH.value,
        seed=_SEED.value,
    )
    train_seconds = time.time() - start
    accuracies = difficulty(
        model=model,
        variables=variables,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        image_size=_IMAGE_SIZE.value,
    )
    result = {"dataset": spec.name, "train_seconds": round(train_seconds, 1)}
    result.update({name: round(float(value), 4) for name, value in accuracies.items()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
