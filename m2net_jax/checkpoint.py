"""Checkpoints of the training stages: one Orbax manager per stage (DESIGN.md §4).

A stage's checkpoint holds its train state (`state`) and its grain iterator (`data`), saved
together, so a resumed stage sees exactly the batches it would have seen. Layout:
`workdir/checkpoints/<stage>/<step>/{state,data}`. Saves are asynchronous and atomic (Orbax
writes a temporary directory and renames it when complete). Each stage's directory records the
model it was written for, so resuming with an incompatible config is a clear error instead of a
shape mismatch deep inside a restore; and a newest checkpoint that cannot be read is reported and
the previous one used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


class IncompatibleCheckpointError(ValueError):
    """A workdir's checkpoints were written for another model than the config describes."""


class NoReadableCheckpointError(RuntimeError):
    """Every checkpoint of a stage failed to restore."""


def stage_directory(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def manager(
    workdir: str,
    stage: str,
    *,
    save_interval_steps: int = 1,
    max_to_keep: int | None = 2,
    async_save: bool = True,
    model_signature: Mapping[str, Any] | None = None,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """The stage's CheckpointManager (items 'state' and 'data').

    Args:
      model_signature: what determines the checkpoint's shapes (depth, width, classes, ...). It
        is recorded the first time and compared on every later open; a difference raises
        IncompatibleCheckpointError naming the differing keys.
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    directory = stage_directory(workdir, stage)
    mngr = ocp.CheckpointManager(
        directory,
        item_names=("state", "data"),
        options=options,
        metadata=None if model_signature is None else {"model": dict(model_signature)},
    )
    if model_signature is not None:
        _check_signature(mngr, stage, directory, dict(model_signature))
    return mngr


def _check_signature(mngr, stage: str, directory: str, expected: dict[str, Any]) -> None:
    recorded = (mngr.metadata().custom_metadata or {}).get("model")
    if recorded is None or mngr.latest_step() is None:
        return
    differing = {
        key: (recorded.get(key), value)
        for key, value in expected.items()
        if recorded.get(key) != value
    }
    if differing:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differing.items()
        )
        raise IncompatibleCheckpointError(
            f"The {stage!r} checkpoints in {directory} were written for another model ({details}). "
            "Use a new --workdir, or the config that wrote them."
        )


def restore_latest_readable(mngr: ocp.CheckpointManager, args_for_step, *, stage: str):
    """Restores the newest checkpoint that reads back; returns (step, restored) or None.

    A checkpoint that fails to restore (corrupt or truncated files) is reported and skipped in
    favour of the one before it; if none can be read, NoReadableCheckpointError.

    Args:
      args_for_step: callable step -> `ocp.args.Composite` to restore with.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            return step, mngr.restore(step, args=args_for_step(step))
        # Orbax, TensorStore and msgpack report damaged files as one of these.
        except (ValueError, OSError, KeyError, TypeError) as error:
            failures.append(f"step {step}: {type(error).__name__}: {error}")
            logging.error(
                "[%s] Checkpoint at step %d cannot be restored (%s: %s); trying an older one.",
                stage, step, type(error).__name__, str(error)[:500],
            )  # fmt: skip
    if failures:
        raise NoReadableCheckpointError(
            f"[{stage}] No checkpoint in {mngr.directory} could be restored:\n"
            + "\n".join(failures)
        )
    return None
