"""Faults: SIGKILL at any point resumes bitwise, SIGTERM saves and stops cleanly, a corrupt
newest checkpoint falls back, a NaN stops with a named error, an incompatible workdir is refused.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from smoke_job import smoke_config

from m2net_jax import checkpoint as ckpt
from m2net_jax import state as state_lib
from m2net_jax import steps, train
from m2net_jax.data import pipeline

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(workdir, data_dir, *extra):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "smoke_job.py"), str(workdir), data_dir, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def final_variables(workdir, data_dir, stage):
    config = smoke_config(data_dir)
    restored = ckpt.restore_variables(str(workdir), stage, config)
    leaves = jax.tree.leaves(jax.device_get(restored.variables))
    return [np.asarray(x) for x in leaves], restored.step


def read_results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_ends_bitwise_like_an_uninterrupted_run(
    smoke_data_dir, tmp_path
):
    reference = tmp_path / "reference"
    done = run_job(reference, smoke_data_dir)
    assert done.returncode == 0, done.stderr[-3000:]

    workdir = tmp_path / "killed"
    # Before the first checkpoint; mid-stage; right after a save was issued (async, so the
    # kill lands while it may still be writing); between stages (policy not yet started).
    for point in ("pretrain:1", "pretrain:5", "pretrain:6", "policy:0"):
        killed = run_job(workdir, smoke_data_dir, "--kill-at", point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        assert f"STEP {point.replace(':', ' ')}" in killed.stdout
    resumed = run_job(workdir, smoke_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The resumed policy stage started from its beginning: it had no checkpoint yet.
    assert "STEP policy 0" in resumed.stdout

    for stage in ("pretrain", "policy"):
        got, got_step = final_variables(workdir, smoke_data_dir, stage)
        want, want_step = final_variables(reference, smoke_data_dir, stage)
        assert got_step == want_step
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert read_results(workdir) == read_results(reference)


def test_sigterm_saves_the_current_step_exits_zero_and_the_rerun_continues_there(
    smoke_data_dir, tmp_path
):
    workdir = tmp_path / "w"
    # Saves every 5 steps by schedule; SIGTERM during step 3 is noticed after step 4.
    stopped = run_job(
        workdir,
        smoke_data_dir,
        "--stages",
        "pretrain",
        "--save-interval",
        "5",
        "--term-at",
        "pretrain:3",
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "PREEMPTED" in stopped.stdout and "Stopped at step 4" in stopped.stdout
    assert "SIGTERM received" in stopped.stderr
    mngr = ckpt.manager(str(workdir), "pretrain", read_only=True)
    # Step 4 is no multiple of 5: that checkpoint exists because of the SIGTERM.
    assert mngr.latest_step() == 4
    mngr.close()
    assert not os.path.exists(workdir / "results.json")  # It stopped before evaluating.

    resumed = run_job(workdir, smoke_data_dir, "--stages", "pretrain", "--save-interval", "5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [line.split()[2] for line in resumed.stdout.splitlines() if line.startswith("STEP")]
    assert steps[:2] == ["4", "5"]
    assert "pretrain" in read_results(workdir)


def _run_stage(config, workdir, stage="pretrain", **kwargs):
    mesh = steps.make_mesh()
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    networks = state_lib.create_networks(config, info.num_classes)
    init = steps.replicate(
        state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size), mesh
    )
    return train.train_stage(
        stage,
        config,
        str(workdir),
        networks=networks,
        start_variables=init,
        mesh=mesh,
        num_train_examples=info.num_examples["train"],
        **kwargs,
    )


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(
    smoke_data_dir, tmp_path, caplog
):
    config = smoke_config(smoke_data_dir)
    workdir = tmp_path / "w"
    _run_stage(config, workdir)  # 8 steps; checkpoints at 6 and 8 are kept.
    files = [
        f
        for f in glob.glob(str(workdir / "checkpoints/pretrain/8/state/**/*"), recursive=True)
        if os.path.isfile(f)
    ]
    assert files
    for f in files:  # Truncate every file of the newest state, as a half-copied checkpoint.
        with open(f, "r+b") as handle:
            handle.truncate(max(0, os.path.getsize(f) // 3))

    caplog.set_level("ERROR")
    _, step = final_variables(workdir, smoke_data_dir, "pretrain")
    assert step == 6
    assert "Checkpoint at step 8 cannot be restored" in caplog.text


@pytest.fixture(scope="module")
def pretrained(smoke_data_dir, tmp_path_factory):
    """A workdir holding only finished pretrain checkpoints (steps 6 and 8), and its final
    variables; tests copy it."""
    workdir = tmp_path_factory.mktemp("pretrained") / "w"
    result = _run_stage(smoke_config(smoke_data_dir), workdir)
    return workdir, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.variables))]


def _garble_silently(step_dir):
    """Flips a byte in the middle of the largest compressed array file of a step: it decodes
    into other values without any error from Orbax."""
    files = [f for f in glob.glob(f"{step_dir}/state/**/*", recursive=True) if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_a_silently_garbled_newest_checkpoint_is_set_aside_and_the_stage_finishes_twice(
    smoke_data_dir, tmp_path, pretrained, caplog
):
    template, want = pretrained
    workdir = tmp_path / "w"
    shutil.copytree(template, workdir)
    _garble_silently(workdir / "checkpoints/pretrain/8")

    caplog.set_level("ERROR")
    seen = []
    result = _run_stage(smoke_config(smoke_data_dir), workdir, on_step=seen.append)
    assert seen[0] == 6  # Step 8 failed its checksums; step 6 was restored.
    assert "step 8 cannot be restored (checksum mismatch" in caplog.text
    assert glob.glob(str(workdir / "checkpoints/pretrain/8.unreadable-*/state"))
    got = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.variables))]
    for a, b in zip(got, want, strict=True):  # Resumed exactly: as if nothing had happened.
        np.testing.assert_array_equal(a, b)

    seen.clear()
    _run_stage(smoke_config(smoke_data_dir), workdir, on_step=seen.append)  # And again.
    assert seen == [8]
    got, step = final_variables(workdir, smoke_data_dir, "pretrain")
    assert step == 8


class _Stop(Exception):
    pass


def _stop_at(stage, step):
    def on_step(s, n):
        if (s, n) == (stage, step):
            raise _Stop(f"{s} {n}")

    return on_step


@pytest.mark.parametrize("left_behind", ["no_step", "only_unreadable_steps"])
def test_a_later_stage_without_a_readable_checkpoint_starts_from_the_previous_stage(
    smoke_data_dir, tmp_path, pretrained, left_behind
):
    template, _ = pretrained
    workdir = tmp_path / "w"
    shutil.copytree(template, workdir)
    config = smoke_config(smoke_data_dir, stages="policy,finetune")
    # The first policy run stops before its first save, or after saving step 2 (then garbled).
    stop = 0 if left_behind == "no_step" else 3
    with pytest.raises(_Stop):
        train.train_and_evaluate(config, str(workdir), on_step=_stop_at("policy", stop))
    policy_dir = workdir / "checkpoints/policy"
    assert policy_dir.is_dir()
    if left_behind == "only_unreadable_steps":
        _garble_silently(policy_dir / "2")

    with pytest.raises(_Stop):  # The rerun trains the policy stage, then stops.
        train.train_and_evaluate(config, str(workdir), on_step=_stop_at("finetune", 0))
    pretrain = ckpt.restore_variables(str(workdir), "pretrain", config)
    policy = ckpt.restore_variables(str(workdir), "policy", config)
    for collection in ("params", "batch_stats"):
        got = jax.tree.leaves(jax.device_get(policy.variables[collection]["recognizer"]))
        want = jax.tree.leaves(jax.device_get(pretrain.variables[collection]["recognizer"]))
        for a, b in zip(got, want, strict=True):  # The frozen recognizer is pretrain's, bitwise.
            np.testing.assert_array_equal(a, b)


def test_nan_in_the_loss_stops_with_stage_and_step_and_keeps_the_last_good_checkpoint(
    smoke_data_dir, tmp_path, monkeypatch
):
    config = smoke_config(smoke_data_dir)
    real = steps.shard_batch
    calls = []

    def poisoned(batch, mesh):
        calls.append(1)
        if len(calls) == 5:  # The batch of step 5.
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return real(batch, mesh)

    monkeypatch.setattr(steps, "shard_batch", poisoned)
    workdir = tmp_path / "w"
    with pytest.raises(train.NonFiniteError, match=r"\[pretrain\] Non-finite .* at step 5"):
        _run_stage(config, workdir)
    mngr = ckpt.manager(str(workdir), "pretrain", read_only=True)
    assert mngr.latest_step() == 4
    mngr.close()
    leaves, _ = final_variables(workdir, smoke_data_dir, "pretrain")
    assert all(np.isfinite(x).all() for x in leaves)

    config.on_nonfinite = "skip"
    calls.clear()
    result = _run_stage(config, tmp_path / "skip")
    assert result.steps == 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.variables))


def test_a_workdir_of_another_model_is_a_clear_error(smoke_data_dir, tmp_path):
    config = smoke_config(smoke_data_dir)
    config.stages.pretrain.epochs = 1
    _run_stage(config, tmp_path)
    other = smoke_config(smoke_data_dir)
    other.recognizer.width = 16
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="recognizer.width: checkpoint 8"):
        _run_stage(other, tmp_path)
