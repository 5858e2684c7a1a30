"""A stage's hyperparameters, recorded when it starts: a resumed stage keeps the ones it began with.

Resuming a stage (or skipping it as finished) under other hyperparameters would silently mix two
runs, or report the old results under new values. `record` writes the values a stage depends on
next to its checkpoints (`checkpoints/<stage>.config.json`) when it starts from scratch; `check`
compares them when it resumes and refuses a difference, naming the keys and the commands that
train the stage again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

from m2net_jax import checkpoint, user_errors
from m2net_jax.state import STAGES

# Keys that do not change what a stage computes: where data and logs go, how often to save.
_NOT_HYPERPARAMETERS = ("mode", "stages.run", "eval.", "log.", "checkpoint.", "on_nonfinite")
_NOT_HYPERPARAMETERS += ("data.data_dir", "data.worker_count", "data.prefetch_buffer_size")
_NOT_HYPERPARAMETERS += ("data.build_if_missing", "compilation_cache_dir")


class ChangedStageConfigError(user_errors.UserError):
    """A stage with checkpoints was rerun with other hyperparameters than it started with."""


def hyperparameters(config, stage: str) -> dict[str, Any]:
    """The config values a stage's training depends on (other stages' blocks excluded)."""
    others = tuple(f"stages.{s}." for s in STAGES if s != stage)
    return {
        key: value
        for key, value in flatten(config).items()
        if not key.startswith(_NOT_HYPERPARAMETERS + others)
    }


def _path(workdir: str, stage: str) -> str:
    return os.path.join(checkpoint.checkpoints_directory(workdir), f"{stage}.config.json")


def record(workdir: str, stage: str, values: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    path = _path(workdir, stage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(values), f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def check(workdir: str, stage: str, values: Mapping[str, Any]) -> None:
    """Refuses to resume (or to skip as finished) a stage whose hyperparameters changed."""
    path = _path(workdir, stage)
    if not os.path.exists(path):  # Written before this check existed: nothing to compare.
        return
    with open(path) as f:
        recorded = json.load(f)
    now = json.loads(json.dumps(dict(values), default=str))
    changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if not changed:
        return
    details = ", ".join(f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
    stage_dir = checkpoint.stage_directory(workdir, stage)
    raise ChangedStageConfigError(
        f"The {stage!r} stage in {workdir} was trained with other values ({details}); resuming "
        f"would silently mix them. To train it again with the new values from the previous "
        f"stage's checkpoint, move its checkpoints aside: mv {stage_dir} {stage_dir}.old "
        f"(and mv {path} {path}.old), then rerun; or use a new --workdir."
    )


def flatten(config, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of a (nested) config or mapping."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping) or hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
