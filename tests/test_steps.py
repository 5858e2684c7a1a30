"""The train step's non-finite guard: nothing a step keeps may absorb a NaN or an overflow."""

import functools

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
