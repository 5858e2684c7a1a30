"""Checks a whole config before a job starts, so a bad value fails in seconds, not hours in.

Every problem becomes one message naming the key, the offending value and the override that fixes
it, e.g. ``config.stages.policy.learning_rate=-0.001 must be > 0; set
--config.stages.policy.learning_rate to a positive value``. All problems are reported at once.
Errors stop the job (`check_config` raises `ConfigError`); warnings are things that run but
probably not as meant (a photo size the pipeline has to resize to), and are logged.

The policy stage's curriculum (BlockDrop's, which M²Net follows; `policy_gradient.curriculum_k`)
is checked too: a stage too short for the policy to decide every block is an error.

Pure Python on the config: no JAX device is touched, so it can run before
`jax.distributed.initialize()` returns the device picture and the caller passes the counts.
"""

import dataclasses
import math
from collections.abc import Sequence

import ml_collections
from absl import logging

from m2net_jax import policy_gradient as pg
from m2net_jax.models import BLOCKS_PER_STAGE, CONV_TYPES, STEMS
from m2net_jax.state import (
    IMAGE_INITS,
    STAGES,  # The schedule's order: `stages.run` selects a subset.
)
from m2net_jax.user_errors import UserError

MODES = ("train", "eval")
ON_NONFINITE = ("stop", "skip")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
SPLITS = ("train", "test")
# The smallest photo side the networks take: the policy network sees half of it, and the
# ImageNet stem divides by 4 before the first block.
MIN_IMAGE_SIZE = 8
# Below this side the ImageNet stem (7x7/2 + max-pool/2) leaves a few pixels for the blocks.
IMAGENET_STEM_MIN_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Problems:
    """What `validate_config` found: errors stop a job, warnings are logged.

    Attributes:
      errors: one message per value the job cannot run with.
      warnings: one message per value that runs but probably not as meant.
    """

    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


class ConfigError(UserError, ValueError):
    """The config has values a job cannot run with; `errors` holds one message per problem."""

    def __init__(self, errors: Sequence[str], warnings: Sequence[str] = ()):
        self.errors = list(errors)
        self.warnings = list(warnings)
        count = f"{len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}"
        super().__init__(f"The config has {count}:\n" + "\n".join(f"  {e}" for e in self.errors))


def num_blocks(depth: int) -> int:
    """N, the droppable blocks of a recognizer depth (three stages)."""
    return 3 * BLOCKS_PER_STAGE[depth]


def policy_epochs_needed(num_blocks: int, curriculum_epochs: float) -> float:
    """Fewest policy-stage epochs that end with E = `curriculum_epochs` epochs at k = N: N · E.

    The policy decides the last ``k = min(N, 1 + t // T)`` blocks at step t, T the steps of E
    epochs (`policy_gradient.curriculum_k`), so k first reaches N after (N − 1) · E epochs; E
    more there make N · E in all. In whole steps, `policy_steps_needed`.
    """
    return num_blocks * curriculum_epochs


def policy_steps_needed(num_blocks: int, curriculum_epochs: float, steps_per_epoch: int) -> int:
    """`policy_epochs_needed` in optimizer steps: N curriculum steps of
    `policy_gradient.curriculum_steps(E, steps_per_epoch)` (at least one step each)."""
    return num_blocks * pg.curriculum_steps(curriculum_epochs, steps_per_epoch)


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    dataset_image_size: int | None = None,
    num_train_examples: int | None = None,
    device_count: int = 1,
    process_count: int = 1,
) -> Problems:
    """Every problem of a config (a `configs/base.py` ConfigDict), without raising.

    Args:
      config: the job's config.
      dataset_image_size: side of the built dataset's photos (`pipeline.DatasetSpec.image_size`),
        or None when unknown or varying; a different `data.image_size` is a warning.
      num_train_examples: size of the train split, or None when unknown; a stage's batch must
        not exceed it, and the curriculum is checked in whole steps when it is known.
      device_count: global devices of the job; every batch size must split over them.
      process_count: JAX processes of the job; every batch size must split over them.

    Returns:
      The errors and warnings, each a one-line message naming the key, value and fix.
    """
    c = _Checker(config)
    c.choice("mode", MODES)
    c.choice("on_nonfinite", ON_NONFINITE)
    c.integer("seed")

    _check_data(c, dataset_image_size)
    _check_networks(c)
    c.number("reward.theta_s", low=0)
    c.number("reward.theta_d", low=0)
    c.number("sampling.bound", low=0.5, high=1)
    c.number("sampling.curriculum_epochs", low=0, low_open=True)

    run = _check_run(c)
    batch_multiple = math.lcm(device_count, process_count)
    for stage in STAGES:
        _check_stage(c, stage, num_train_examples, batch_multiple)
    if config.mode == "train" and "policy" in run:
        _check_curriculum(c, num_train_examples)

    c.integer("checkpoint.save_interval_steps", low=1)
    if config.checkpoint.max_to_keep is not None:  # None: Orbax keeps every checkpoint.
        c.integer("checkpoint.max_to_keep", low=1)
    c.boolean("checkpoint.async_save")
    c.integer("log.every_steps", low=1)
    _check_batch(c, "eval.batch_size", None, batch_multiple)
    c.integer("eval.step", low=-1)
    c.choice("eval.split", SPLITS)
    return Problems(errors=c.errors, warnings=c.warnings)


def check_config(config: ml_collections.ConfigDict, **kwargs) -> Problems:
    """`validate_config`, then: log each warning and raise `ConfigError` if there is an error.

    Takes the keyword arguments of `validate_config`.
    """
    problems = validate_config(config, **kwargs)
    for warning in problems.warnings:
        logging.warning("Config: %s", warning)
    if problems.errors:
        raise ConfigError(problems.errors, problems.warnings)
    return problems


# ----------------------------------------------------------------------------------------------
# The checks, grouped as the config is.


def _check_data(c: "_Checker", dataset_image_size: int | None) -> None:
    if not isinstance(c.get("data.dataset"), str) or not c.get("data.dataset"):
        c.error("data.dataset", "must name a TFDS dataset, e.g. geo_twins or landmark420")
    size = c.integer("data.image_size", low=MIN_IMAGE_SIZE)
    if size is not None and size % 2:
        c.error(
            "data.image_size",
            "must be even (the policy network sees half of it)",
            f"set --config.data.image_size={size + 1}",
        )
    elif size is not None and dataset_image_size and size != dataset_image_size:
        direction = "up" if size > dataset_image_size else "down"
        c.warning(
            "data.image_size",
            f"differs from the {dataset_image_size} px photos {c.get('data.dataset')} is built "
            f"with: every photo is resized {direction} to {size} px (train: random resized crop; "
            f"eval: resize + centre crop) and the policy network sees {size // 2} px",
            f"to train at the built size set --config.data.image_size={dataset_image_size}",
        )
    c.integer("data.worker_count", low=0)
    c.integer("data.prefetch_buffer_size", low=0)


def _check_networks(c: "_Checker") -> None:
    c.choice("recognizer.depth", tuple(BLOCKS_PER_STAGE))
    width = c.integer("recognizer.width", low=1)
    conv_type = c.choice("recognizer.conv_type", tuple(CONV_TYPES))
    if width is not None and conv_type is not None and width % CONV_TYPES[conv_type].groups:
        groups = CONV_TYPES[conv_type].groups
        c.error(
            "recognizer.width",
            f"must be a multiple of {groups}: recognizer.conv_type={conv_type!r} splits the "
            f"channels into {groups} groups",
            f"set --config.recognizer.width={groups * max(1, round(width / groups))}",
        )
    c.boolean("recognizer.geo_conditioning")
    c.boolean("policy.use_geo")
    c.number("policy.fusion_alpha", low=0, high=1)
    c.integer("policy.width", low=1)
    c.choice("policy.image_init", IMAGE_INITS)
    size = c.get("data.image_size")
    for net, side in (("recognizer", size), ("policy", size // 2 if _is_int(size) else None)):
        stem = c.choice(f"{net}.stem", STEMS)
        if stem == "imagenet" and side is not None and side < IMAGENET_STEM_MIN_SIZE:
            c.warning(
                f"{net}.stem",
                f"shrinks the {net} network's {side} px input to {max(1, side // 4)} px before "
                "its first block (7x7/2 conv + max-pool/2)",
                f"for inputs under {IMAGENET_STEM_MIN_SIZE} px set --config.{net}.stem=small",
            )


def _check_run(c: "_Checker") -> tuple[str, ...]:
    """The stages `stages.run` selects, in schedule order (as `train.parse_stages`)."""
    value = c.get("stages.run")
    if not isinstance(value, str):
        c.error("stages.run", f"must be a comma-separated subset of {','.join(STAGES)}")
        return ()
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        c.error(
            "stages.run",
            f"names unknown stages {unknown}" if unknown else "selects no stage",
            f"use a comma-separated subset of {','.join(STAGES)}, e.g. "
            f"--config.stages.run={','.join(STAGES)}",
        )
        return ()
    run = tuple(s for s in STAGES if s in names)
    if list(run) != names:
        c.warning(
            "stages.run",
            "is not a list of distinct stages in schedule order; the stages run as "
            f"{','.join(run)}",
            f"write --config.stages.run={','.join(run)}",
        )
    skipped = [s for s in STAGES[STAGES.index(run[0]) : STAGES.index(run[-1])] if s not in run]
    if skipped:
        later = STAGES[STAGES.index(skipped[-1]) + 1]
        c.warning(
            "stages.run",
            f"skips {','.join(skipped)}: {later} starts from the previous selected stage's "
            "recognizer, with a freshly initialised policy network where it has none",
            f"to run the whole schedule set --config.stages.run={','.join(STAGES)}",
        )
    return run


def _check_stage(
    c: "_Checker", stage: str, num_train_examples: int | None, batch_multiple: int
) -> None:
    key = f"stages.{stage}"
    # A stage of 0 epochs trains nothing and passes its start on (plumbing suites).
    epochs = c.integer(f"{key}.epochs", low=0)
    _check_batch(c, f"{key}.batch_size", num_train_examples, batch_multiple)
    c.choice(f"{key}.optimizer", OPTIMIZERS)
    c.number(f"{key}.learning_rate", low=0, low_open=True)
    schedule = c.choice(f"{key}.schedule", SCHEDULES)
    warmup = c.integer(f"{key}.warmup_epochs", low=0)
    if warmup and epochs and schedule == "cosine" and warmup >= epochs:
        c.error(
            f"{key}.warmup_epochs",
            f"must be below {key}.epochs={epochs}, or the stage only warms up",
            f"set --config.{key}.warmup_epochs={max(0, min(warmup, epochs) - 1)}",
        )
    elif warmup and schedule == "constant":
        c.warning(
            f"{key}.warmup_epochs",
            f"is ignored: {key}.schedule='constant' has no warm-up",
            f"set --config.{key}.warmup_epochs=0, or --config.{key}.schedule=cosine",
        )
    c.number(f"{key}.momentum", low=0, high=1, high_open=True)
    c.number(f"{key}.weight_decay", low=0)
    penalty = c.get(f"{key}.penalty")
    c.number(
        f"{key}.penalty",
        low=0,
        # BlockDrop's code stores the penalty with its sign; here a wrong prediction gets
        # −penalty (policy_gradient.reward), so a negative value would reward mistakes.
        fix=(
            "it is the penalty lambda of Eqn 5, given without its sign (a wrong prediction is "
            f"rewarded -lambda); set --config.{key}.penalty={abs(penalty)}"
            if _is_number(penalty)
            else None
        ),
    )
    c.number(f"{key}.entropy_weight", low=0)


def _check_batch(
    c: "_Checker", key: str, num_train_examples: int | None, batch_multiple: int
) -> None:
    batch = c.integer(key, low=1)
    if batch is None:
        return
    if batch % batch_multiple:
        fixed = batch_multiple * max(1, round(batch / batch_multiple))
        c.error(
            key,
            f"must split evenly over the devices and processes: be a multiple of {batch_multiple}",
            f"set --config.{key}={fixed}",
        )
    if num_train_examples is not None and batch > num_train_examples:
        c.error(
            key,
            f"exceeds the {num_train_examples} training examples, so an epoch has no step",
            f"set --config.{key} to at most {num_train_examples}",
        )


def _check_curriculum(c: "_Checker", num_train_examples: int | None) -> None:
    """The policy stage must reach k = N and stay there for `curriculum_epochs` epochs, and
    should not decay its learning rate while blocks are still being opened."""
    if c.get("stages.policy.schedule") == "cosine":
        c.warning(
            "stages.policy.schedule",
            "decays the learning rate while the curriculum is still opening blocks "
            "(BlockDrop keeps the policy stage's rate constant)",
            "set --config.stages.policy.schedule=constant",
        )
    depth, per_k = c.get("recognizer.depth"), c.get("sampling.curriculum_epochs")
    epochs, batch = c.get("stages.policy.epochs"), c.get("stages.policy.batch_size")
    if (
        depth not in BLOCKS_PER_STAGE
        or not (_is_number(per_k) and per_k > 0)
        or not (_is_int(epochs) and epochs >= 1)
    ):
        return  # Already reported.
    n = num_blocks(depth)
    steps_per_epoch = None
    if num_train_examples and _is_int(batch) and 1 <= batch <= num_train_examples:
        steps_per_epoch = num_train_examples // batch
    if steps_per_epoch is None:  # In epochs: the dataset's size is not known here.
        needed = math.ceil(policy_epochs_needed(n, per_k) - 1e-9)
        last_k = min(n, math.ceil(epochs / per_k - 1e-9))
    else:  # In whole steps, as `policy_gradient.curriculum_k` counts.
        needed_steps = policy_steps_needed(n, per_k, steps_per_epoch)
        needed = math.ceil(needed_steps / steps_per_epoch)
        steps_per_k = pg.curriculum_steps(per_k, steps_per_epoch)
        last_k = min(n, 1 + (epochs * steps_per_epoch - 1) // steps_per_k)
    if epochs >= needed:
        return
    fix = f"set --config.stages.policy.epochs={needed}"
    shorter = math.floor(100 * epochs / n) / 100  # E that fits, to two decimals.
    fits = steps_per_epoch is None or n <= epochs * steps_per_epoch
    if shorter > 0 and fits:
        fix += f", or --config.sampling.curriculum_epochs={shorter:g}"
    c.error(
        "stages.policy.epochs",
        f"is too short for the curriculum: with sampling.curriculum_epochs={per_k} the policy "
        f"decides one more of ResNet-{depth}'s N={n} blocks every {per_k:g} epochs and ends at "
        f"k={last_k}; it needs N x curriculum_epochs = {policy_epochs_needed(n, per_k):g} "
        f"epochs to end with sampling.curriculum_epochs={per_k} epochs at k=N",
        fix,
    )


# ----------------------------------------------------------------------------------------------
# Reading values and writing messages.


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    if low is None:
        return f"< {high}" if high_open else f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


class _Checker:
    """Reads dotted keys of a config and collects `config.<key>=<value> <problem>; <fix>` lines."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def get(self, key: str):
        value = self.config
        for part in key.split("."):
            value = value[part]
        return value

    def _message(self, key: str, problem: str, fix: str | None) -> str:
        message = f"config.{key}={self.get(key)!r} {problem}"
        return f"{message}; {fix}." if fix else f"{message}."

    def error(self, key: str, problem: str, fix: str | None = None) -> None:
        self.errors.append(self._message(key, problem, fix))

    def warning(self, key: str, problem: str, fix: str | None = None) -> None:
        self.warnings.append(self._message(key, problem, fix))

    def number(self, key, *, low=None, high=None, low_open=False, high_open=False, fix=None):
        """The value if it is a finite number within the bounds, else None (error recorded)."""
        value = self.get(key)
        interval = _interval(low, high, low_open, high_open)
        default_fix = f"set --config.{key} to a number {interval}"
        if not _is_number(value) or not math.isfinite(value):
            self.error(key, f"must be a finite number {interval}", default_fix)
            return None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            self.error(key, f"must be {interval}", fix or default_fix)
            return None
        return value

    def integer(self, key: str, *, low: int | None = None, fix: str | None = None):
        """The value if it is an int >= `low`, else None (error recorded)."""
        value = self.get(key)
        if not _is_int(value):
            self.error(key, "must be an integer", f"set --config.{key} to an integer")
            return None
        if low is not None and value < low:
            self.error(key, f"must be >= {low}", fix or f"set --config.{key} to at least {low}")
            return None
        return value

    def boolean(self, key: str):
        value = self.get(key)
        if not isinstance(value, bool):
            self.error(key, "must be True or False", f"set --config.{key}=True or False")
            return None
        return value

    def choice(self, key: str, choices: tuple):
        """The value if it is one of `choices`, else None (error recorded)."""
        value = self.get(key)
        if value not in choices or isinstance(value, bool):
            shown = ", ".join(repr(x) for x in choices)
            self.error(key, f"must be one of {shown}", f"e.g. --config.{key}={choices[0]}")
            return None
        return value
