"""Predicting one photo with M²Net, computing only the blocks its policy keeps (§3, Fig. 2).

    predictor = Predictor.from_workdir(config, workdir)          # the finetuned checkpoint
    result = predictor.predict(photo, latitude=48.8582, longitude=2.2945)
    result.label, result.class_name, result.probabilities, result.policy, result.flops

A photo goes through the policy network (half-resolution copy + location, Eqn 4), its greedy
policy p̃ = [s ≥ 0.5] (Eqn 8) picks the recognizer's blocks, and the recognizer runs with each
dropped block *skipped* (`fast_forward.skipping_logits`: a `lax.cond` per block inside one
compiled function), so the photo costs what `flops.flops_per_image` says it does. The batched
path that skips a block for a whole batch when no photo uses it is the same function on a batch.

Inputs are checked here, at the boundary: the photo as (H, W, 3) uint8 or float in [0, 1], the
location as latitude/longitude (validated by `geo.encode_location`) or as the 8-vector.
Photos of another size than the model's are centre-cropped and resized as evaluation does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from m2net_jax import fast_forward, geo
from m2net_jax import flops as flops_lib
from m2net_jax import policy_gradient as pg
from m2net_jax.models import PolicyNetwork, Recognizer
from m2net_jax.state import network_variables


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What M²Net says about one photo.

    Attributes:
      label: the predicted class index, argmax of `probabilities`.
      class_name: its name, when the predictor knows the class names (else None).
      probabilities: (K,) float32 softmax of the recognizer's logits.
      policy: (N,) bool, the greedy policy: True = block n ran.
      keep_probabilities: (N,) float32, the policy network's s (Eqn 4).
      flops: FLOPs this photo cost: policy network + the recognizer's executed parts.
      recognizer_flops: the recognizer's share of `flops`.
      full_flops: the full recognizer's FLOPs (every block), for comparison.
    """

    label: int
    class_name: str | None
    probabilities: np.ndarray
    policy: np.ndarray
    keep_probabilities: np.ndarray
    flops: float
    recognizer_flops: float
    full_flops: float

    @property
    def blocks(self) -> int:
        """How many of the N blocks ran (|p̃|₀)."""
        return int(self.policy.sum())


def _forward(variables, image, policy_image, location, *, recognizer, policy_network):
    """One photo, jitted: (class probabilities (1, K), keep probabilities (1, N), policy (1, N))."""
    keep_probs = policy_network.apply(
        network_variables(variables, "policy"),
        policy_image,
        location,
        train=False,
    )
    policy = pg.greedy_policy(keep_probs)
    rec_vars = network_variables(variables, "recognizer")
    locations = location if recognizer.geo_conditioning else None
    logits = fast_forward.skipping_logits(recognizer, rec_vars, image, policy, locations=locations)
    return jax.nn.softmax(logits), keep_probs, policy


class Predictor:
    """M²Net's per-photo inference with trained variables.

    Args:
      recognizer: the `Recognizer` (its `axis_name` is dropped: inference needs no mesh).
      policy_network: the `PolicyNetwork`.
      variables: {'params', 'batch_stats'}, each {'recognizer': ..., 'policy': ...}, as the
        training stages hold them (`train.restore_variables`).
      image_size: S, the recognizer's resolution (the policy network sees S/2).
      class_names: K names in label order, or None.
    """

    def __init__(
        self,
        recognizer: Recognizer,
        policy_network: PolicyNetwork,
        variables: Any,
        *,
        image_size: int,
        class_names: Sequence[str] | None = None,
    ):
        if image_size < 2 or image_size % 2:
            raise ValueError(f"image_size={image_size} must be even (the policy image is half).")
        for collection in ("params", "batch_stats"):
            missing = {"recognizer", "policy"} - set(variables.get(collection, {}))
            if missing:
                raise ValueError(
                    f"variables[{collection!r}] lacks {sorted(missing)}: prediction needs both "
                    "networks, i.e. the 'policy' or 'finetune' stage's variables."
                )
        if class_names is not None and len(class_names) != recognizer.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a recognizer with "
                f"{recognizer.num_classes} classes."
            )
        self.recognizer = recognizer.clone(axis_name=None)
        self.policy_network = policy_network.clone(axis_name=None)
        # One photo needs one device: training's variables may be replicated over a mesh.
        self.variables = jax.device_put(
            {c: {n: variables[c][n] for n in ("recognizer", "policy")} for c in variables},
            jax.devices()[0],
        )
        self.image_size = image_size
        self.class_names = None if class_names is None else tuple(class_names)
        self.recognizer_flops = self.recognizer.flops(image_size)
        pol = self.policy_network
        self.policy_network_flops = flops_lib.policy_network_flops(
            num_blocks=pol.num_blocks,
            image_size=image_size // 2,
            width=pol.width,
            stem=pol.stem,
            use_geo=pol.use_geo,
        )
        self._forward = jax.jit(
            functools.partial(_forward, recognizer=self.recognizer, policy_network=pol)
        )

    @classmethod
    def from_workdir(
        cls, config, workdir: str, *, stage: str = "finetune", step: int | None = None
    ) -> Predictor:
        """Loads a trained stage's checkpoint ('finetune' or 'policy') from a training workdir.

        Args:
          config: the config the workdir was trained with (e.g. `m2net_jax/configs/quickstart.py`).
          workdir: the `--workdir` of `python -m m2net_jax.main`.
          stage: which stage's checkpoint: 'finetune' (default) or 'policy'.
          step: the checkpoint step; None = the newest readable one.
        """
        # Imported here: Orbax and the dataset's class names are only needed to load.
        from m2net_jax import checkpoint, steps
        from m2net_jax.data import pipeline

        if stage not in ("policy", "finetune"):
            raise ValueError(
                f"stage={stage!r} has no policy network to predict with; use 'finetune' or "
                "'policy'."
            )
        mesh = steps.make_mesh(jax.devices()[:1])
        restored = checkpoint.restore_variables(workdir, stage, config, mesh=mesh, step=step)
        if restored is None:
            raise FileNotFoundError(
                f"No {stage!r} checkpoint in {workdir}. Train it first: python -m m2net_jax.main "
                f"--config=<the config> --workdir={workdir}"
            )
        info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
        networks, variables = restored.networks, restored.variables
        return cls(
            networks.recognizer,
            networks.policy,
            variables,
            image_size=config.data.image_size,
            class_names=info.class_names,
        )

    def predict(
        self,
        image,
        latitude: float | None = None,
        longitude: float | None = None,
        *,
        location=None,
    ) -> Prediction:
        """Classifies one photo taken at a location, running only the blocks its policy keeps.

        Args:
          image: (H, W, 3) RGB photo, uint8 in [0, 255] or float in [0, 1]. Any other size than
            (S, S) is centre-cropped to a square and resized to S, as in evaluation.
          latitude, longitude: decimal degrees (north/east positive) of where it was taken.
          location: instead of latitude/longitude, the raw DMS 8-vector
            (`geo.encode_location`).

        Returns:
          A `Prediction`.

        Raises:
          ValueError: a malformed photo (shape, dtype, range) or location (missing, both forms
            given, out of range, not a DMS vector).
        """
        image, policy_image = self.preprocess(image)
        location = self._location(latitude, longitude, location)
        probs, keep_probs, policy = self._forward(
            self.variables, image[None], policy_image[None], location[None]
        )
        probs, keep_probs, policy = jax.device_get((probs[0], keep_probs[0], policy[0]))
        policy = policy > 0.5
        label = int(np.argmax(probs))
        rec_flops = float(flops_lib.flops_per_image(policy, self.recognizer_flops))
        return Prediction(
            label=label,
            class_name=None if self.class_names is None else self.class_names[label],
            probabilities=np.asarray(probs, np.float32),
            policy=policy,
            keep_probabilities=np.asarray(keep_probs, np.float32),
            flops=rec_flops + float(self.policy_network_flops),
            recognizer_flops=rec_flops,
            full_flops=float(self.recognizer_flops.full),
        )

    def preprocess(self, image) -> tuple[np.ndarray, np.ndarray]:
        """A photo → (S, S, 3) recognizer image and (S/2, S/2, 3) policy image, float32 in [0, 1].

        A photo already (S, S) is used as it is; others go through evaluation's centre crop and
        resize (on uint8 pixels, as the datasets store them), and the policy image is the 2×2
        average of the recognizer's, as in the input pipeline.
        """
        image = _check_image(image)
        size = self.image_size
        if image.shape[:2] != (size, size):
            from m2net_jax.data import pipeline

            pixels = image if image.dtype == np.uint8 else np.rint(image * 255.0).astype(np.uint8)
            image = pipeline.ResizeCentreCrop(size=size).map({"image": pixels})["image"]
        image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
        image = image.astype(np.float32)
        policy_image = image.reshape(size // 2, 2, size // 2, 2, 3).mean(axis=(1, 3))
        return image, policy_image

    def _location(self, latitude, longitude, location) -> np.ndarray:
        given_coordinates = latitude is not None or longitude is not None
        if location is not None and given_coordinates:
            raise ValueError(
                "Give the location either as latitude/longitude or as location=<8-vector>, "
                "not both."
            )
        if location is not None:
            return _check_location_vector(location)
        if given_coordinates:
            if latitude is None or longitude is None:
                raise ValueError(
                    f"Both latitude and longitude are needed; got latitude={latitude!r}, "
                    f"longitude={longitude!r}."
                )
            if np.ndim(latitude) or np.ndim(longitude):
                raise ValueError(
                    "latitude and longitude must be scalars (one photo); got shapes "
                    f"{np.shape(latitude)} and {np.shape(longitude)}."
                )
            return geo.encode_location(latitude, longitude)
        if self.policy_network.use_geo:
            raise ValueError(
                "M²Net's policy network reads the photo's location: pass latitude= and "
                "longitude= (decimal degrees) or location=<8-vector from geo.encode_location>."
            )
        return np.zeros(8, np.float32)  # Image-only policy (BlockDrop): the location is unused.


def _check_image(image) -> np.ndarray:
    """Validates a photo: (H, W, 3), uint8 or float in [0, 1], finite; returns it as numpy."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image has shape {image.shape}; expected one RGB photo (H, W, 3). Convert grey or "
            "RGBA photos to RGB first (e.g. PIL's image.convert('RGB'))."
        )
    if min(image.shape[:2]) < 2:
        raise ValueError(f"image has shape {image.shape}; it needs at least 2×2 pixels.")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"image has dtype {image.dtype}; expected uint8 in [0, 255] or float in [0, 1]."
        )
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"float image values span [{low:g}, {high:g}]; expected [0, 1]. For pixels in "
            "[0, 255] pass uint8, or divide by 255."
        )
    return image


def _check_location_vector(location) -> np.ndarray:
    """Validates a raw DMS 8-vector (§3.1) and returns it as float32."""
    vector = np.asarray(location, np.float64)
    if vector.shape != (8,):
        raise ValueError(
            f"location has shape {vector.shape}; expected the 8-vector [sign_lat, deg, min, sec, "
            "sign_lon, deg, min, sec] of geo.encode_location (or pass latitude=, longitude=)."
        )
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"location {vector.tolist()} contains NaN or infinite values.")
    signs, degrees, minutes, seconds = vector.reshape(2, 4).T
    problems = []
    if not np.all(np.isin(signs, (-1.0, 1.0))):
        problems.append("hemisphere flags (entries 0 and 4) must be +1 or -1")
    if np.any(degrees < 0) or np.any(degrees != np.round(degrees)):
        problems.append("degrees (entries 1 and 5) must be whole and non-negative")
    if np.any(minutes < 0) or np.any(minutes >= 60) or np.any(minutes != np.round(minutes)):
        problems.append("minutes (entries 2 and 6) must be whole numbers in [0, 60)")
    if np.any(seconds < 0) or np.any(seconds >= 60):
        problems.append("seconds (entries 3 and 7) must be in [0, 60)")
    if problems:
        raise ValueError(f"location {vector.tolist()} is not a DMS vector: {'; '.join(problems)}.")
    # The coordinates' range (|lat| ≤ 90, |lon| ≤ 180) is geo.encode_location's check.
    geo.encode_location(*geo.decode_location(vector))
    return vector.astype(np.float32)
