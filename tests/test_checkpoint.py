"""Checkpoint integrity: checksums, unreadable steps set aside, disk errors as OS errors."""

import errno
import glob
import os
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest

from m2net_jax import checkpoint as ckpt
from m2net_jax import user_errors

STATE = {"params": {"w": np.random.default_rng(0).standard_normal(4096).astype(np.float32)}}


def _args(state, save=True):
    if save:
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"n": 1})
        )
    return ocp.args.Composite(state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore())


def _save(workdir, *steps):
    mngr = ckpt.manager(str(workdir), "pretrain", async_save=False, max_to_keep=None)
    for step in steps:
        mngr.save(step, args=_args(STATE), custom_metadata=ckpt.save_metadata(STATE))
    return mngr


def _garble(workdir, step, where):
    """Flips one byte of the largest array file: near its start the decoder fails; in the
    middle of the compressed data it decodes silently into other values."""
    files = glob.glob(str(workdir / f"checkpoints/pretrain/{step}/state/**/*"), recursive=True)
    path = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[50 if where == "start" else len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_checksums_name_leaves_alike_in_a_state_and_in_a_partial_dict():
    sums = ckpt.state_checksums(STATE)
    assert list(sums) == ["params/w"]
    changed = {"params": {"w": STATE["params"]["w"].copy()}}
    changed["params"]["w"][7] = 3e38
    assert ckpt.state_checksums(changed) != sums


@pytest.mark.parametrize("where", ["start", "middle"])
def test_a_garbled_newest_step_is_set_aside_and_the_previous_one_restored(tmp_path, where):
    mngr = _save(tmp_path, 1, 2)
    _garble(tmp_path, 2, where)
    if where == "middle":  # The silent kind: Orbax alone restores other values.
        wrong = mngr.restore(2, args=_args(STATE, save=False))["state"]["params"]["w"]
        assert not np.array_equal(wrong, STATE["params"]["w"])
    step, restored = ckpt.restore_latest_readable(
        mngr, lambda _: _args(STATE, save=False), stage="pretrain", set_aside=True
    )
    assert step == 1
    np.testing.assert_array_equal(restored["state"]["params"]["w"], STATE["params"]["w"])
    assert mngr.all_steps() == [1]
    assert glob.glob(str(tmp_path / "checkpoints/pretrain/2.unreadable-*/state"))
    mngr.save(2, args=_args(STATE))  # The step can be saved again.
    assert mngr.all_steps() == [1, 2]
    mngr.close()


def test_a_plain_exception_from_a_restore_counts_as_unreadable(tmp_path, monkeypatch):
    mngr = _save(tmp_path, 1, 2)
    real = mngr.restore

    def restore(step, args):
        if step == 2:  # What Orbax raises for some damaged compressed chunks.
            raise Exception("DATA_LOSS: Error reading chunk")  # noqa: TRY002
        return real(step, args=args)

    monkeypatch.setattr(mngr, "restore", restore)
    step, _ = ckpt.restore_latest_readable(
        mngr, lambda _: _args(STATE, save=False), stage="pretrain", set_aside=True
    )
    assert step == 1
    mngr.close()


def test_a_read_only_restore_leaves_damaged_steps_alone_and_says_so(tmp_path):
    _save(tmp_path, 1).close()
    _garble(tmp_path, 1, "middle")
    mngr = ckpt.manager(str(tmp_path), "pretrain", read_only=True)
    with pytest.raises(ckpt.NoReadableCheckpointError, match="step 1: checksum mismatch") as e:
        ckpt.restore_latest_readable(mngr, lambda _: _args(STATE, save=False), stage="pretrain")
    assert isinstance(e.value, user_errors.UserError)
    assert mngr.all_steps() == [1]
    mngr.close()


def test_checkpoint_errors_are_user_errors():
    assert issubclass(ckpt.IncompatibleCheckpointError, user_errors.UserError)
    assert issubclass(ckpt.IncompatibleCheckpointError, ValueError)
    assert issubclass(ckpt.NoReadableCheckpointError, user_errors.UserError)
    assert issubclass(ckpt.NoReadableCheckpointError, RuntimeError)


# Verbatim (but for the paths) what Orbax 0.12.8 raised on a full tmpfs: TensorStore's ValueError.
_FULL_DISK = (
    'RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "/w/1.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/d/c7": '
    "Failed to write 1252178 bytes to file 11: No space left on device [os_error_code='28']"
)


def test_a_tensorstore_disk_error_becomes_the_os_error_user_errors_reports():
    with pytest.raises(OSError) as e, ckpt.disk_errors_as_os_errors("/w"):
        raise ValueError(_FULL_DISK)
    assert e.value.errno == errno.ENOSPC
    assert user_errors.user_message(e.value).startswith("The disk holding /w is full")
    with pytest.raises(ValueError, match="other"), ckpt.disk_errors_as_os_errors("/w"):
        raise ValueError("other")


def test_saving_to_a_really_full_disk_is_reported_in_one_line(tmp_path):
    """Needs root and mount (a 256 KiB tmpfs); skipped elsewhere. Root ignores chmod, so a
    really full disk is the faithful check."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "none", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        mngr = ckpt.manager(str(disk), "pretrain")
        big = {"params": {"w": np.random.default_rng(0).standard_normal(200_000)}}
        with pytest.raises(OSError) as e, ckpt.disk_errors_as_os_errors(mngr.directory):
            mngr.save(1, args=_args(big))
            mngr.wait_until_finished()
        assert e.value.errno == errno.ENOSPC, e.value
        assert user_errors.user_message(e.value).startswith("The disk holding")
        mngr.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
