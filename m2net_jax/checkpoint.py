"""Checkpoints of the training stages: one Orbax manager per stage, and restoring from them.

A stage's checkpoint holds its train state (`state`) and its grain iterator (`data`), saved
together, so a resumed stage sees exactly the batches it would have seen. Layout:
`workdir/checkpoints/<stage>/<step>/{state,data}`. Saves are asynchronous and atomic (Orbax
writes a temporary directory and renames it when complete). Each stage's directory records the
model it was written for, so resuming with an incompatible config is a clear error instead of a
shape mismatch deep inside a restore.

Each saved step also records a checksum of every array of its state (`state_checksums`), checked
after a restore: damaged files that still decode (a flipped byte in compressed data) count as
unreadable instead of resuming from garbage. Restoring tries the steps newest first; an unreadable
one is reported and, when the manager may write, moved aside to `<step>.unreadable-<time>` (kept
for inspection, outside Orbax's step names) so that training can save that step again.

Restoring a stage's variables (for evaluation, inference or the next stage) needs only the
config and the workdir: the class count is read from the recorded model signature, and only the
parameters and batch statistics are read back (no optimizer state, so no optimizer and no
dataset size are needed to describe it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2net_jax import state as state_lib
from m2net_jax import steps, user_errors


class IncompatibleCheckpointError(user_errors.UserError, ValueError):
    """A workdir's checkpoints were written for another model than the config describes."""


class NoReadableCheckpointError(user_errors.UserError, RuntimeError):
    """Every checkpoint of a stage failed to restore."""


class MissingCheckpointError(user_errors.UserError, FileNotFoundError):
    """A stage needs a checkpoint (its own, or the previous stage's to start from) that the
    workdir does not hold."""


class ChecksumMismatchError(ValueError):
    """A restored array differs from the one saved: the checkpoint's files are damaged."""


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


# --------------------------------------------------------------------------------------------
# Integrity: checksums recorded at save time, checked after a restore.

_CHECKSUMS = "checksums"


def _path_name(path) -> str:
    """'params/recognizer/stem/kernel' for both a TrainState's attributes and a plain dict's
    keys, so a partial restore into dicts finds the checksums of the full state."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def state_checksums(tree) -> dict[str, str]:
    """CRC32 of each array's bytes (with its dtype and shape), by leaf path.

    Computed on host: one device-to-host copy of the (replicated) state per save, the same copy
    Orbax makes before it writes in the background, and CRC32 runs at GB/s, so a save costs
    about twice its host transfer; restores pay it once.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(
        [
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for _, x in leaves
        ]
    )
    checksums = {}
    for (path, _), value in zip(leaves, values, strict=True):
        array = np.ascontiguousarray(value)
        header = f"{array.dtype.str}{array.shape}".encode()
        checksums[_path_name(path)] = f"{zlib.crc32(array.tobytes(), zlib.crc32(header)):08x}"
    return checksums


def save_metadata(state) -> dict[str, Any]:
    """The `custom_metadata` to save a step with (`mngr.save(..., custom_metadata=...)`)."""
    return {_CHECKSUMS: state_checksums(state)}


def _verify(recorded: Mapping[str, str] | None, step: int, restored_state) -> None:
    """Raises ChecksumMismatchError unless every restored array has its recorded checksum."""
    if recorded is None:
        logging.warning(
            "Checkpoint %d records no checksums (written before they were); restored unverified.",
            step,
        )
        return
    got = state_checksums(restored_state)
    differing = sorted(name for name, value in got.items() if recorded.get(name) != value)
    if differing:
        raise ChecksumMismatchError(
            f"{len(differing)} array(s) differ from what was saved, e.g. {differing[:3]}"
        )


# --------------------------------------------------------------------------------------------
# Restoring, newest readable first.


def _set_aside(mngr: ocp.CheckpointManager, step: int, stage: str) -> None:
    """Renames an unreadable step directory out of Orbax's step names (it is kept)."""
    if jax.process_index() == 0:
        source = os.path.join(str(mngr.directory), str(step))
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target, n = f"{source}.unreadable-{stamp}", 1
        while os.path.exists(target):
            target, n = f"{source}.unreadable-{stamp}-{n}", n + 1
        os.rename(source, target)
        logging.error("[%s] Moved the unreadable checkpoint %s to %s.", stage, source, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"m2net_jax set aside {stage} {step}")
    mngr.reload()


def restore_latest_readable(
    mngr: ocp.CheckpointManager, args_for_step, *, stage: str, set_aside: bool = False
):
    """Restores the newest checkpoint that reads back intact; returns (step, restored) or None.

    A checkpoint that fails to restore, or whose arrays differ from the checksums recorded when
    it was saved, is reported and skipped in favour of the one before it.

    Args:
      args_for_step: callable step -> `ocp.args.Composite` to restore with; its 'state' item
        is checked against the recorded checksums.
      set_aside: move an unreadable checkpoint to `<step>.unreadable-<time>` (training does, so
        it can save that step again). Then a stage whose checkpoints were all unreadable has
        none left, and None is returned; without it, NoReadableCheckpointError.
    """
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(step, args=args_for_step(step))
            recorded = (mngr.metadata(step).custom_metadata or {}).get(_CHECKSUMS)
        # Deliberately broad, and around the reads only: Orbax re-raises TensorStore's errors
        # for damaged compressed chunks as a plain `Exception`; msgpack and JSON decoding raise
        # ValueError/TypeError/KeyError, truncated files OSError. Any of them means this step
        # cannot be read, and an older one may be.
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        else:
            try:
                _verify(recorded, step, restored["state"])
                return step, restored
            except ChecksumMismatchError as error:
                reason = f"checksum mismatch: {error}"
        failures.append(f"step {step}: {reason}")
        logging.error(
            "[%s] Checkpoint at step %d cannot be restored (%s); trying an older one.",
            stage,
            step,
            reason[:500],
        )
        if set_aside:
            _set_aside(mngr, step, stage)
    if failures and not set_aside:
        raise NoReadableCheckpointError(
            f"[{stage}] No checkpoint in {mngr.directory} could be restored:\n"
            + "\n".join(failures)
            + "\nMove the damaged step directories out of the way (or use a new --workdir)."
        )
    return None


# --------------------------------------------------------------------------------------------
# Saving: a full or read-only disk, however Orbax reports it, reaches the user as an OSError.

# TensorStore (which writes the arrays) reports an OS error as a ValueError whose message ends
# with e.g. "No space left on device [os_error_code='28']"; Orbax re-raises it without a cause.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def disk_errors_as_os_errors(directory: str):
    """Re-raises a checkpoint write's error that carries an OS error code as that OSError
    (ENOSPC, EROFS, ...), chained to the original, so `user_errors` reports a full or read-only
    disk in one line. Other errors pass through unchanged."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        match = _OS_ERROR_CODE.search(str(error))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(directory)) from error


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
      ChecksumMismatchError: the checkpoint at `step` is damaged.
      NoReadableCheckpointError: every checkpoint of the stage is damaged (`step` None).
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
            recorded = (mngr.metadata(step).custom_metadata or {}).get(_CHECKSUMS)
            _verify(recorded, step, restored[1]["state"])
        else:
            restored = restore_latest_readable(mngr, args, stage=stage)
    if restored is None:
        return None
    step, items = restored
    variables = {c: dict(items["state"][c]) for c in state_lib.COLLECTIONS}
    return StageVariables(networks=networks, variables=variables, step=int(step))
