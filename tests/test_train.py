"""The training loop: stages, checkpoints, resume, device-count invariance, main's errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from m2net_jax import checkpoint, evaluate, results, stage_config, steps, train
from m2net_jax import state as state_lib
from m2net_jax.configs import base as base_config
from m2net_jax.configs import quickstart, r47
from m2net_jax.user_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_dir, **stage_epochs):
    """A seconds-long config: ResNet-29 of width 8 on the tiny geo_twins build."""
    c = r47.get_config("smoke")
    c.recognizer.depth = 29
    c.data.data_dir = data_dir
    for stage, epochs in stage_epochs.items():
        c.stages[stage].epochs = epochs
    return c


class Interrupt(Exception):
    pass


def interrupt_at(step):
    def on_step(done):
        if done == step:
            raise Interrupt(f"interrupted after step {step}")

    return on_step


def run_stage(config, workdir, stage, *, mesh=None, init=None, on_step=None):
    mesh = steps.make_mesh() if mesh is None else mesh
    info = _dataset_info(config)
    networks = state_lib.create_networks(config, info.num_classes)
    if init is None:
        key = jax.random.PRNGKey(0)
        init = steps.replicate(
            state_lib.init_variables(networks, key, config.data.image_size), mesh
        )
    return train.train_stage(
        stage,
        config,
        workdir,
        networks=networks,
        start_variables=init,
        mesh=mesh,
        num_train_examples=info.num_examples["train"],
        on_step=on_step,
    )


def _dataset_info(config):
    from m2net_jax.data import pipeline

    return pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_all_stages_train_checkpoint_evaluate_and_eval_mode_reproduces(smoke_data_dir, tmp_path):
    config = smoke_config(smoke_data_dir)
    workdir = str(tmp_path / "run")
    evaluated = train.train_and_evaluate(config, workdir)

    assert set(evaluated) == {"pretrain", "policy", "finetune"}
    for stage in state_lib.STAGES:
        assert os.listdir(os.path.join(workdir, "checkpoints", stage)), stage
        assert set(results.RESULT_KEYS) <= set(evaluated[stage])
    with open(os.path.join(workdir, "results.json")) as f:
        written = json.load(f)
    assert list(written) == ["pretrain", "policy", "finetune"]
    # The pretrained recognizer runs every block; the policy stages decide with the policy.
    assert evaluated["pretrain"]["pr"] == 1.0 and evaluated["pretrain"]["diversity"] == 1
    n = 9
    for stage in ("policy", "finetune"):
        r = evaluated[stage]
        assert 0.0 <= r["pr"] <= 1.0
        assert r["blocks_mean"] == pytest.approx(r["pr"] * n)
        assert r["full_flops"] > 0 and r["flops_mean"] > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

    # The policy stage started its image branch from the classifier trained in pretraining:
    # 24 Adam steps of 1e-3 leave its stem and blocks near that classifier, far from a fresh
    # network's (independent random weights).
    pretrained = checkpoint.restore_variables(workdir, "pretrain", config).variables
    policy = checkpoint.restore_variables(workdir, "policy", config).variables
    networks = state_lib.create_networks(config, num_classes=8)
    fresh = state_lib.init_variables(networks, jax.random.PRNGKey(7), config.data.image_size)

    def trunk(variables, network):
        branch = variables["params"][network]["img_resnet10"]
        return np.concatenate(
            [x.ravel() for x in _leaves({k: branch[k] for k in branch if k != "fc"})]
        )

    to_trained = np.linalg.norm(trunk(policy, "policy") - trunk(pretrained, "image_classifier"))
    to_fresh = np.linalg.norm(trunk(policy, "policy") - trunk(fresh, "policy"))
    assert to_trained < 0.1 * to_fresh, (to_trained, to_fresh)

    eval_config = smoke_config(smoke_data_dir)
    eval_config.mode = "eval"
    again = evaluate.evaluate_workdir(eval_config, workdir)
    for stage in state_lib.STAGES:
        assert again[stage]["accuracy"] == evaluated[stage]["accuracy"]
        assert again[stage]["diversity"] == evaluated[stage]["diversity"]
        assert again[stage]["num_examples"] == evaluated[stage]["num_examples"]


def test_interrupted_stage_resumes_at_its_step_and_ends_like_an_uninterrupted_run(
    smoke_data_dir, tmp_path
):
    # The policy stage: its state has the most parts (two networks, curriculum, sampling key).
    # tests/test_reliability.py kills whole processes at several points of both stages.
    stage = "policy"
    config = smoke_config(smoke_data_dir, **{stage: 2})
    full = run_stage(config, str(tmp_path / "full"), stage)

    workdir = str(tmp_path / "interrupted")
    # Checkpoints every 2 steps; interrupt after step 5, so step 5 is lost and redone.
    with pytest.raises(Interrupt):
        run_stage(config, workdir, stage, on_step=interrupt_at(5))
    mngr = checkpoint.stage_manager(workdir, stage, config, 8, read_only=True)
    assert mngr.latest_step() == 4  # The save in flight at the interruption completed.
    mngr.close()
    seen = []
    resumed = run_stage(config, workdir, stage, on_step=seen.append)
    assert seen[:2] == [4, 5]  # It restored step 4 and continued with step 5.
    assert resumed.steps == full.steps == seen[-1]
    for a, b in zip(_leaves(resumed.variables), _leaves(full.variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stage", ["pretrain", "policy"])
def test_four_devices_and_one_device_give_the_same_training(smoke_data_dir, tmp_path, stage):
    config = smoke_config(smoke_data_dir, **{stage: 1})
    config.checkpoint.save_interval_steps = 1000
    # A gentler step size keeps SGD from amplifying the last-bit differences of sums taken in
    # another order over 4 shards into visible ones.
    config.stages[stage].learning_rate /= 10
    devices = jax.devices()
    assert len(devices) == 4
    one = run_stage(config, str(tmp_path / "one"), stage, mesh=steps.make_mesh(devices[:1]))
    four = run_stage(config, str(tmp_path / "four"), stage, mesh=steps.make_mesh(devices))
    for a, b in zip(_leaves(one.variables), _leaves(four.variables), strict=True):
        # Reductions over 1 vs 4 shards add in different orders; SGD amplifies that a little.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_batch_not_divisible_by_devices_is_a_clear_error(smoke_data_dir):
    config = smoke_config(smoke_data_dir)
    config.stages.pretrain.batch_size = 6
    with pytest.raises(ValueError, match="divisible by the device count"):
        train.stage_steps_per_epoch("pretrain", config, steps.make_mesh(), 64)


def test_configs_are_locked_and_complete():
    c = quickstart.get_config()
    with pytest.raises(AttributeError):
        c.data.datset = "x"  # A typo is an error, not a new key.
    for variant in ("landmark420", "landmark732", "geo_twins", "smoke"):
        v = r47.get_config(variant)
        assert v.recognizer.depth == 47
    with pytest.raises(ValueError, match="Unknown config variant"):
        base_config.apply_variant(base_config.get_config(), "landmark999")


def _main(args, **env):
    return subprocess.run(
        [sys.executable, "-m", "m2net_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        check=False,
    )


def test_main_rejects_a_typo_in_a_config_override(tmp_path):
    proc = _main(
        [
            "--config=m2net_jax/configs/quickstart.py",
            f"--workdir={tmp_path}",
            "--config.data.datset=x",
        ]
    )
    assert proc.returncode != 0
    assert "datset" in proc.stderr


def test_main_without_landmark420_exits_with_build_instructions(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    proc = _main(
        [
            "--config=m2net_jax/configs/r47.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.data_dir={empty}",
        ]
    )
    assert proc.returncode == 2  # a user error: one line, no traceback
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert "python -m m2net_jax.data.build --dataset=landmark420" in error
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_rerun_with_a_changed_stage_hyperparameter_is_refused_not_reused(smoke_data_dir, tmp_path):
    config = smoke_config(smoke_data_dir, pretrain=1)
    workdir = str(tmp_path / "w")
    run_stage(config, workdir, "pretrain")
    # Where logs go and how often to evaluate do not change what the stage computed.
    config.log.every_steps = 1
    config.eval.batch_size = 8
    again = run_stage(config, workdir, "pretrain")  # Finished: restored, 0 steps.
    assert again.steps > 0
    config.stages.pretrain.learning_rate = 0.5
    with pytest.raises(stage_config.ChangedStageConfigError) as error:
        run_stage(config, workdir, "pretrain")
    message = str(error.value)
    assert "stages.pretrain.learning_rate" in message and "mv " in message
    assert isinstance(error.value, UserError)


@pytest.mark.parametrize("stage", ["policy", "finetune"])
def test_bfloat16_compute_trains_to_a_finite_loss_with_float32_state(smoke_data_dir, stage):
    # policy: the frozen recognizer's shared-prefix forwards (fast_forward) in bfloat16;
    # finetune: both networks trained, both networks' batch statistics updated.
    from m2net_jax.data import pipeline

    config = smoke_config(smoke_data_dir)
    config.compute_dtype = "bfloat16"
    mesh = steps.make_mesh()
    spec = state_lib.STAGE_SPECS[stage]
    info = _dataset_info(config)
    networks = state_lib.create_networks(config, info.num_classes)
    assert networks.recognizer.dtype == networks.policy.dtype == jax.numpy.bfloat16
    tx = state_lib.make_optimizer(config.stages[stage], steps_per_epoch=4)
    hp = steps.loss_hyperparams(config, stage, steps_per_epoch=4)
    variables = state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size)
    initial = _leaves(state_lib.trainable(variables["params"], spec))  # Before donation.
    start = steps.replicate(
        state_lib.create_train_state(variables, spec, tx, jax.random.PRNGKey(1)), mesh
    )
    batches = pipeline.make_train_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        batch_size=config.stages[stage].batch_size,
        seed=0,
    )
    step_fn = steps.make_train_step(spec, networks, hp, tx, mesh)
    batch = steps.shard_batch(next(batches), mesh)
    assert "bf16" in step_fn.lower(start, batch).as_text()  # The convolutions run in bfloat16.
    state = start
    for _ in range(3):
        state, scalars = step_fn(state, batch)
        assert np.isfinite(float(scalars["loss"])) and float(scalars["nonfinite"]) == 0.0
        batch = steps.shard_batch(next(batches), mesh)

    for part in (state.params, state.batch_stats, state.opt_state):
        floats = [x for x in jax.tree.leaves(part) if jax.numpy.issubdtype(x.dtype, np.floating)]
        assert floats and {str(x.dtype) for x in floats} == {"float32"}
    trained = _leaves(state_lib.trainable(state.params, spec))
    assert any(not np.array_equal(a, b) for a, b in zip(trained, initial, strict=True))
