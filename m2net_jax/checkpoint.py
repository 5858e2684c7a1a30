"""Checkpoints of the training stages: one Orbax manager per stage, and restoring from them.

A stage's checkpoint holds its train state (`state`) and its grain iterator (`data`), saved
together, so a resumed stage sees exactly the batches it would have seen. Layout:
`workdir/checkpoints/<stage>/<step>/{state,data}`. Saves are asynchronous and atomic (Orbax
writes a temporary directory and renames it when complete). Each stage's directory records the
model it was written for, so resuming with an incompatible config is a clear error instead of a
shape mismatch deep inside a restore; and a newest checkpoint that cannot be read is reported and
the previous one used.

Restoring a stage's variables (for evaluation, inference or the next stage) needs only the
config and the workdir: the class count is read from the recorded model signature, and only the
parameters and batch statistics are read back (no optimizer state, so no optimizer and no
dataset size are needed to describe it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2net_jax import state as state_lib
from m2net_jax import steps


class IncompatibleCheckpointError(ValueError):
    """A workdir's checkpoints were written for another model than the config describes."""


class NoReadableCheckpointError(RuntimeError):
    """Every checkpoint of a stage failed to restore."""


def checkpoints_directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def stage_directory(workdir: str, stage: str) -> str:
    return os.path.join(checkpoints_directory(workdir), stage)


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


# --------------------------------------------------------------------------------------------
# A stage's manager and its variables.


def stage_manager(workdir: str, stage: str, config, num_classes: int, **kwargs):
    """The Orbax manager of a config's stage, checking (or recording) its model signature."""
    return manager(
        workdir,
        stage,
        save_interval_steps=config.checkpoint.save_interval_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
        model_signature=state_lib.model_signature(
            config, num_classes, state_lib.STAGE_SPECS[stage]
        ),
        **kwargs,
    )


def recorded_signature(workdir: str, stage: str) -> dict[str, Any] | None:
    """The model signature a stage's checkpoints were written with (None: no checkpoints)."""
    directory = stage_directory(workdir, stage)
    if not os.path.isdir(directory):
        return None
    with manager(workdir, stage, read_only=True) as mngr:
        if mngr.latest_step() is None:
            return None
        return (mngr.metadata().custom_metadata or {}).get("model")


@dataclasses.dataclass
class StageVariables:
    """A stage's restored variables, the networks they belong to, and the checkpoint step."""

    networks: state_lib.Networks
    variables: dict[str, Any]  # {'params', 'batch_stats'}, each {network name: tree}.
    step: int


def restore_variables(
    workdir: str,
    stage: str,
    config,
    *,
    mesh: jax.sharding.Mesh | None = None,
    step: int | None = None,
) -> StageVariables | None:
    """A stage's ``{'params', 'batch_stats'}`` from `workdir`, replicated on `mesh`.

    Only the stage's networks are read, and no optimizer state: the config (network shapes)
    and the class count recorded with the checkpoint are all it needs.

    Args:
      config: the config the workdir was trained with.
      mesh: where to place the variables (default: replicated on every device).
      step: a checkpoint step; None = the newest one that reads back.

    Returns:
      The restored variables, or None when the stage has no checkpoint.

    Raises:
      FileNotFoundError: `step` names no checkpoint of the stage.
      IncompatibleCheckpointError: the checkpoint was written for another model.
      NoReadableCheckpointError: every checkpoint of the stage is damaged.
    """
    signature = recorded_signature(workdir, stage)
    if signature is None:
        return None
    networks = state_lib.create_networks(config, int(signature["num_classes"]))
    sharding = NamedSharding(steps.make_mesh() if mesh is None else mesh, P())
    spec = state_lib.STAGE_SPECS[stage]
    abstract = state_lib.select_networks(
        state_lib.abstract_variables(networks, config.data.image_size, sharding), spec.networks
    )
    args = lambda _: ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
    )
    with stage_manager(
        workdir, stage, config, networks.recognizer.num_classes, read_only=True
    ) as mngr:
        if step is not None:
            if step not in mngr.all_steps():
                raise FileNotFoundError(
                    f"No {stage!r} checkpoint at step {step} in {mngr.directory}; "
                    f"there are: {sorted(mngr.all_steps())}."
                )
            restored = (step, mngr.restore(step, args=args(step)))
        else:
            restored = restore_latest_readable(mngr, args, stage=stage)
    if restored is None:
        return None
    step, items = restored
    variables = {c: dict(items["state"][c]) for c in state_lib.COLLECTIONS}
    return StageVariables(networks=networks, variables=variables, step=int(step))
