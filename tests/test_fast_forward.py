"""Skipping dropped blocks: same logits as the masked forward, and the work is really skipped."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_variables import random_variables

from m2net_jax import fast_forward
from m2net_jax import policy_gradient as pg
from m2net_jax.models import Recognizer

N = 9  # ResNet-29
B = 6


class Model:
    """A tiny ResNet-29 with random variables, and its forwards jitted once for all tests."""

    def __init__(self):
        self.rec = rec = Recognizer(depth=29, num_classes=5, width=8, stem="small")
        self.variables = random_variables(rec, jnp.zeros((1, 32, 32, 3)), jnp.ones((1, N)))
        self.images = jax.random.uniform(jax.random.PRNGKey(3), (B, 32, 32, 3))
        # The definition: the masked forward (every block computed, then blended), jitted like
        # the paths it checks, so that both are compiled programs.
        self.masked = jax.jit(
            lambda v, x, p: rec.apply(v, x, jnp.asarray(p, jnp.float32), train=False)
        )
        self.skipping = jax.jit(lambda v, x, p: fast_forward.skipping_logits(rec, v, x, p))
        self.shared = jax.jit(lambda v, x, g, s: fast_forward.frozen_logits(rec, v, x, g, s))


@pytest.fixture(scope="module")
def model():
    return Model()


def _policies():
    rng = np.random.default_rng(0)
    mixed = (rng.random((B, N)) < 0.5).astype(np.float32)
    mixed[:, [0, 4, 5]] = 0.0  # Dropped by every photo: skipped for the whole batch (incl. the
    # first block of stage 2, whose downsample must still run).
    return {
        "all_on": np.ones((B, N), np.float32),
        "all_off": np.zeros((B, N), np.float32),
        "mixed": mixed,
    }


@pytest.mark.parametrize("name", ["all_on", "all_off", "mixed"])
def test_skipping_logits_equal_the_masked_forward(model, name):
    policy = _policies()[name]
    np.testing.assert_allclose(
        model.skipping(model.variables, model.images, policy),
        model.masked(model.variables, model.images, policy),
        rtol=1e-5,
        atol=1e-5,
    )


def test_batch_of_one_path_equals_the_masked_forward_photo_by_photo(model):
    policy = _policies()["mixed"]
    policy[1] = 1.0 - policy[0]  # Complementary photos: each runs what the other skips.
    masked = model.masked(model.variables, model.images, policy)
    for i in range(B):
        one = model.skipping(model.variables, model.images[i : i + 1], policy[i : i + 1])
        np.testing.assert_allclose(one[0], masked[i], rtol=1e-5, atol=1e-5)


def _poisoned(variables, block):
    """Variables whose block `block` has NaN weights: computing it at all makes NaNs."""
    params = dict(variables["params"])
    params[block] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params[block])
    return {"params": params, "batch_stats": variables["batch_stats"]}


def test_a_block_no_photo_keeps_is_not_computed(model):
    policy = _policies()["mixed"]  # Block 4 = stage2_block1 is dropped by every photo.
    poisoned = _poisoned(model.variables, "stage2_block1")
    # The masked forward computes the block (0 · NaN = NaN); the skipping one never touches it.
    assert np.isnan(model.masked(poisoned, model.images, policy)).all()
    np.testing.assert_allclose(
        model.skipping(poisoned, model.images, policy),
        model.masked(model.variables, model.images, policy),
        rtol=1e-5,
        atol=1e-5,
    )


def _greedy_and_sampled(k, *, seed):
    """Policies as the policy stage makes them: greedy and sampled, curriculum k applied."""
    probs = jax.random.uniform(jax.random.PRNGKey(seed), (B, N))
    mask = pg.curriculum_mask(N, k)
    greedy = pg.apply_curriculum(pg.greedy_policy(probs), mask)
    sampled = pg.apply_curriculum(pg.sample_policy(jax.random.PRNGKey(seed + 1), probs), mask)
    return greedy, sampled


@pytest.mark.parametrize("k", [1, 4, N])
def test_frozen_logits_equal_two_masked_forwards(model, k):
    greedy, sampled = _greedy_and_sampled(k, seed=k)
    logits_g, logits_s = model.shared(model.variables, model.images, greedy, sampled)
    # The same ops at the same batch size; XLA may fuse them differently around the conds.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(logits_g, model.masked(model.variables, model.images, greedy))
    close(logits_s, model.masked(model.variables, model.images, sampled))


def test_frozen_logits_when_greedy_and_sampled_agree_everywhere(model):
    policy = jnp.asarray(_policies()["mixed"])
    logits_g, logits_s = model.shared(model.variables, model.images, policy, policy)
    np.testing.assert_array_equal(logits_g, logits_s)
    np.testing.assert_allclose(
        logits_g, model.masked(model.variables, model.images, policy), rtol=1e-5, atol=1e-5
    )


def test_policy_gradient_through_frozen_logits_equals_the_two_forward_one(model):
    """A REINFORCE loss (Eqns 5, 8) whose rewards come from the frozen recognizer: the same loss
    and gradient whether its logits come from frozen_logits or from two masked forwards."""
    labels = jnp.arange(B) % 5
    features = jax.random.normal(jax.random.PRNGKey(7), (B, 4))
    theta = jax.random.normal(jax.random.PRNGKey(8), (4, N))
    mask = pg.curriculum_mask(N, 4)

    def loss(theta, forward):
        probs = jax.nn.sigmoid(features @ theta + 1.0)
        sampled = pg.apply_curriculum(pg.sample_policy(jax.random.PRNGKey(9), probs), mask)
        greedy = pg.apply_curriculum(pg.greedy_policy(probs), mask)
        logits_g, logits_s = forward(model.rec, model.variables, model.images, greedy, sampled)
        hyper = dict(theta_s=1.0, theta_d=0.5, penalty=5.0)
        r_s = pg.reward(
            jnp.argmax(logits_s, -1) == labels, sampled, pg.uniqueness(sampled), **hyper
        )
        r_g = pg.reward(jnp.argmax(logits_g, -1) == labels, greedy, pg.uniqueness(greedy), **hyper)
        value, _ = pg.reinforce_loss(probs, sampled, r_s - r_g, entropy_weight=0.1, mask=mask)
        # The cross-entropy makes the loss depend on the logits' values, not only their argmax.
        ce = -jnp.mean(jax.nn.log_softmax(logits_s)[jnp.arange(B), labels])
        return value + ce

    grad = lambda forward: jax.jit(jax.value_and_grad(lambda t: loss(t, forward)))(theta)
    shared_loss, shared_grad = grad(fast_forward.frozen_logits)
    naive_loss, naive_grad = grad(fast_forward.naive_frozen_logits)
    np.testing.assert_allclose(shared_loss, naive_loss, rtol=1e-6)
    np.testing.assert_allclose(shared_grad, naive_grad, rtol=1e-6, atol=1e-7)


def test_policy_of_the_wrong_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expected \(B, N\)"):
        fast_forward.skipping_logits(model.rec, model.variables, model.images, jnp.ones((B, N + 1)))
    with pytest.raises(ValueError, match="sampled has shape"):
        fast_forward.frozen_logits(
            model.rec, model.variables, model.images, jnp.ones((B, N)), jnp.ones((1, N))
        )
