"""m2net_jax/steps.py: the train step's non-finite guard (nothing a step keeps may absorb a NaN or
an overflow) and the persistent compilation cache. The losses are exercised by test_train.py."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from m2net_jax import state as state_lib
from m2net_jax import steps

SPEC = state_lib.STAGE_SPECS["pretrain"]


def _one_step(loss_fn, tx):
    variables = {
        "params": {"recognizer": {"w": jnp.ones(3, jnp.float32)}},
        "batch_stats": {"recognizer": {"mean": jnp.zeros(3, jnp.float32)}},
    }
    state = state_lib.create_train_state(variables, SPEC, tx, jax.random.PRNGKey(0))
    before = jax.device_get(state)
    step = functools.partial(steps.train_step, spec=SPEC, loss_fn=loss_fn, tx=tx)
    fn = jax.shard_map(
        step,
        mesh=steps.make_mesh(jax.devices()[:1]),
        in_specs=(P(), P(state_lib.AXIS)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    after, scalars = jax.jit(fn)(state, {"x": np.full((1, 3), 2.0, np.float32)})
    return before, jax.device_get(after), jax.device_get(scalars)


def _linear_loss(params, batch_stats, batch, key, step, *, new_mean=None):
    del key, step
    loss = jnp.sum(params["recognizer"]["w"] * batch["x"][0])
    stats = batch_stats if new_mean is None else {"recognizer": {"mean": new_mean}}
    return loss, (stats, {"loss": loss})


@pytest.mark.parametrize(
    "case",
    ["update_overflows_the_parameters", "batch_norm_statistics_become_inf"],
)
def test_a_step_with_finite_loss_and_gradient_keeps_nothing_non_finite(case):
    if case == "update_overflows_the_parameters":
        # Gradient 2 (finite) times a step size of 3e38 overflows float32 to -inf.
        loss_fn, tx = _linear_loss, optax.sgd(3e38)
    else:
        loss_fn = functools.partial(_linear_loss, new_mean=jnp.full(3, jnp.inf, jnp.float32))
        tx = optax.sgd(0.1)
    before, after, scalars = _one_step(loss_fn, tx)
    assert np.isfinite(scalars["loss"]) and np.isfinite(scalars["grad_norm"])
    assert scalars["nonfinite"] == 1.0
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(
        jax.tree.leaves(after.variables), jax.tree.leaves(before.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_finite_step_updates_the_parameters():
    before, after, scalars = _one_step(_linear_loss, optax.sgd(0.5))
    assert scalars["nonfinite"] == 0.0
    np.testing.assert_array_equal(after.params["recognizer"]["w"], np.zeros(3, np.float32))


JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compilation_cache_job.py")


def _run_job(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # Store every compilation, however quick (JAX's default skips those under a second).
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, JOB, cache_dir],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_compiled_step_from_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    first = _run_job(cache)
    assert first["cache_dir"] == cache
    assert first["hits"] == 0 and first["misses"] > 0
    written = set(os.listdir(cache))
    assert written
    second = _run_job(cache)
    assert second["hits"] > 0 and second["misses"] == 0
    assert set(os.listdir(cache)) == written  # Nothing compiled anew.


def test_an_empty_cache_dir_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    off = _run_job("")
    assert off == {"cache_dir": None, "hits": 0, "misses": 0}
    assert os.listdir(tmp_path) == []


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert steps.default_compilation_cache_dir() == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert steps.default_compilation_cache_dir() == str(tmp_path / "xdg" / "m2net_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    assert steps.default_compilation_cache_dir() == os.path.join(home, ".cache", "m2net_jax", "jax")


# --- the predict step under the curriculum ---------------------------------------------------


def _networks_and_variables():
    from m2net_jax.configs import r47

    config = r47.get_config("smoke")
    config.recognizer.depth = 29
    networks = state_lib.create_networks(config, num_classes=8)
    variables = state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size)
    # Both branches' last biases far below 0: every keep probability < 0.5, the greedy policy
    # drops every block the policy decides.
    policy = variables["params"]["policy"]
    policy["img_resnet10"]["fc"]["bias"] = jnp.full_like(policy["img_resnet10"]["fc"]["bias"], -30)
    policy["loc_mlp"]["fc5"]["bias"] = jnp.full_like(policy["loc_mlp"]["fc5"]["bias"], -30)
    return config, networks, variables


@pytest.mark.parametrize("decided", [None, 1, 4, 9])
def test_predict_step_forces_the_blocks_the_curriculum_has_not_handed_over(decided):
    config, networks, variables = _networks_and_variables()
    n = networks.recognizer.num_blocks
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((4, 32, 32, 3), np.float32),
        "policy_image": rng.random((4, 16, 16, 3), np.float32),
        "location": rng.normal(size=(4, 8)).astype(np.float32),
        "label": np.arange(4, dtype=np.int32),
    }
    mesh = steps.make_mesh(jax.devices()[:1])
    predict = steps.make_predict_step(networks, mesh, use_policy=True, decided_blocks=decided)
    out = jax.device_get(predict(variables, steps.shard_batch(batch, mesh)))
    forced_on = n if decided is None else n - decided
    expected = np.zeros((4, n), bool)
    if decided is not None:
        expected[:, :forced_on] = True  # The earlier blocks run; the last `decided` are dropped.
    np.testing.assert_array_equal(out["policy"], expected)
    logits = networks.recognizer.apply(
        state_lib.network_variables(variables, "recognizer"),
        batch["image"],
        expected.astype(np.float32),
        train=False,
    )
    np.testing.assert_array_equal(out["prediction"], np.argmax(logits, -1))


def test_evaluation_forces_the_curriculum_of_the_evaluated_policy_step():
    from m2net_jax import evaluate

    config, _, _ = _networks_and_variables()
    # geo_twins/smoke: 128 photos, batch 16 → 8 steps an epoch; E = 1/16 epoch → 1 step per k.
    assert config.stages.policy.batch_size == 16
    assert config.sampling.curriculum_epochs == 1 / 16
    decided = functools.partial(
        evaluate.decided_blocks, config, num_blocks=9, num_train_examples=128
    )
    # After t steps the last step run was t − 1, which decided min(N, t) blocks.
    assert [decided("policy", t) for t in (1, 2, 3, 8)] == [1, 2, 3, 8]
    assert decided("policy", 9) is None and decided("policy", 24) is None  # k = N: all decided.
    assert decided("finetune", 1) is None and decided("pretrain", 1) is None
    config.sampling.curriculum_epochs = 0.5  # 4 steps per k
    assert [decided("policy", t) for t in (4, 5, 8, 9, 36)] == [1, 2, 2, 3, None]
