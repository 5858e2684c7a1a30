"""Tests for m2net_jax.policy_gradient, each against its definition written out here."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from m2net_jax import policy_gradient as pg


def pairwise_uniqueness(policies: np.ndarray) -> np.ndarray:
    """Eqn 2 literally: u_i = (1/M) Σ_j Hamming(p_i, p_j) / N, as an O(M²) loop."""
    m, n = policies.shape
    u = np.zeros(m)
    for i in range(m):
        for j in range(m):
            u[i] += np.sum(policies[i] != policies[j]) / n
    return u / m


def random_policies(seed: int, m: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(m, n)).astype(np.float32)


# --- sampling ------------------------------------------------------------------------------


def test_bounded_probs_maps_into_bound_interval():
    probs = jnp.array([[0.0, 0.25, 0.5, 1.0]])
    expected = [[0.2, 0.8 * 0.25 + 0.2 * 0.75, 0.5, 0.8]]
    np.testing.assert_allclose(pg.bounded_probs(probs, bound=0.8), expected, rtol=1e-6)
    np.testing.assert_allclose(pg.bounded_probs(probs, bound=1.0), probs)


def test_sample_policy_frequencies_match_bounded_probs():
    probs = jnp.array([0.0, 0.1, 0.5, 0.7, 1.0])
    num_samples = 20_000
    samples = pg.sample_policy(jax.random.key(0), jnp.tile(probs, (num_samples, 1)), bound=0.8)
    assert samples.shape == (num_samples, 5) and samples.dtype == jnp.float32
    assert set(np.unique(np.asarray(samples))) <= {0.0, 1.0}
    q = 0.8 * np.asarray(probs) + 0.2 * (1 - np.asarray(probs))
    standard_error = np.sqrt(q * (1 - q) / num_samples)
    frequencies = np.asarray(samples).mean(axis=0)
    np.testing.assert_array_less(np.abs(frequencies - q), 5 * standard_error)


def test_sample_policy_without_bound_is_deterministic_at_zero_and_one():
    samples = pg.sample_policy(
        jax.random.key(1), jnp.tile(jnp.array([0.0, 1.0]), (500, 1)), bound=1.0
    )
    np.testing.assert_array_equal(samples[:, 0], 0.0)
    np.testing.assert_array_equal(samples[:, 1], 1.0)


def test_greedy_policy_runs_blocks_with_probability_at_least_one_half():
    probs = jnp.array([[0.0, 0.4999, 0.5, 0.5001, 1.0]])
    greedy = pg.greedy_policy(probs)
    assert greedy.dtype == jnp.float32
    np.testing.assert_array_equal(greedy, [[0, 0, 1, 1, 1]])


# --- curriculum ----------------------------------------------------------------------------


def test_curriculum_k_grows_by_one_every_steps_per_k_up_to_num_blocks():
    ks = [int(pg.curriculum_k(t, num_blocks=4, steps_per_k=3)) for t in range(15)]
    assert ks == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4]
    traced = jax.jit(lambda t: pg.curriculum_k(t, num_blocks=4, steps_per_k=3))
    assert int(traced(jnp.int32(7))) == 3
    with pytest.raises(ValueError, match="steps_per_k"):
        pg.curriculum_k(0, num_blocks=4, steps_per_k=0)


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, expected",
    [(1, 40, 40), (3, 40, 120), (0.5, 40, 20), (0.4, 39, 15), (1 / 16, 8, 1), (0.01, 5, 1)],
)
def test_curriculum_steps_are_whole_steps_rounded_down_never_below_one(
    epochs, steps_per_epoch, expected
):
    assert pg.curriculum_steps(epochs, steps_per_epoch) == expected
    with pytest.raises(ValueError, match="positive"):
        pg.curriculum_steps(0, steps_per_epoch)


@pytest.mark.parametrize(
    "k, expected",
    [(1, [0, 0, 0, 0, 1]), (3, [0, 0, 1, 1, 1]), (5, [1, 1, 1, 1, 1]), (9, [1, 1, 1, 1, 1])],
)
def test_curriculum_mask_decides_only_the_last_k_blocks(k, expected):
    np.testing.assert_array_equal(pg.curriculum_mask(5, k), expected)
    traced = jax.jit(lambda k: pg.curriculum_mask(5, k))(jnp.int32(k))
    np.testing.assert_array_equal(traced, expected)


def test_apply_curriculum_forces_undecided_blocks_on():
    policies = jnp.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    forced = pg.apply_curriculum(policies, pg.curriculum_mask(4, 2))
    np.testing.assert_array_equal(forced, [[1, 1, 0, 1], [1, 1, 0, 0]])
    forced_bool = pg.apply_curriculum(policies.astype(bool), jnp.array([1.0, 0.0, 1.0, 0.0]))
    assert forced_bool.dtype == jnp.bool_
    np.testing.assert_array_equal(forced_bool, [[0, 1, 0, 1], [0, 1, 0, 1]])


# --- uniqueness (Eqn 2) --------------------------------------------------------------------


@pytest.mark.parametrize("m, n", [(1, 5), (2, 3), (7, 9), (32, 15), (64, 21)])
def test_uniqueness_equals_pairwise_hamming_definition(m, n):
    policies = random_policies(m * 100 + n, m, n)
    u = pg.uniqueness(jnp.asarray(policies))
    assert u.shape == (m,) and u.dtype == jnp.float32
    np.testing.assert_allclose(u, pairwise_uniqueness(policies), rtol=1e-6, atol=1e-7)


def test_uniqueness_accepts_bool_policies():
    policies = random_policies(3, 10, 6)
    np.testing.assert_allclose(
        pg.uniqueness(jnp.asarray(policies, bool)), pairwise_uniqueness(policies), rtol=1e-6
    )


def test_uniqueness_of_identical_policies_is_zero():
    policies = jnp.tile(jnp.array([1.0, 0.0, 1.0, 1.0]), (6, 1))
    np.testing.assert_array_equal(pg.uniqueness(policies), np.zeros(6))


def test_uniqueness_of_two_complementary_policies_is_one_half():
    # Each is at distance 1 from the other and 0 from itself: (0 + 1) / 2.
    policies = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(pg.uniqueness(policies), [0.5, 0.5])


def test_uniqueness_under_shard_map_equals_global_batch_value():
    assert jax.device_count() >= 4, "tests/conftest.py should force 4 CPU devices"
    mesh = jax.make_mesh((4,), ("data",))
    policies = random_policies(11, 4 * 6, 9)
    # jax.make_mesh gives Explicit axes: shard_map wants inputs already laid out as in_specs.
    global_policies = jax.device_put(policies, jax.sharding.NamedSharding(mesh, P("data")))
    sharded = jax.jit(
        jax.shard_map(
            lambda p: pg.uniqueness(p, axis_name="data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
        )
    )(global_policies)
    np.testing.assert_allclose(sharded, pairwise_uniqueness(policies), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sharded, pg.uniqueness(jnp.asarray(policies)), rtol=1e-6)


# --- reward (Eqn 5) ------------------------------------------------------------------------


def test_reward_matches_eqn5_term_by_term():
    theta_s, theta_d, penalty = 1.0, 0.5, 2.0
    policies = np.array(
        [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], np.float32
    )
    uniq = np.array([0.1, 0.4, 0.0, 0.9, 0.3], np.float32)
    correct = np.array([True, True, True, True, False])
    expected = [
        theta_s * (1 - (4 / 4) ** 2) + theta_d * (1 - (1 - 0.1) ** 2),
        theta_s * (1 - (1 / 4) ** 2) + theta_d * (1 - (1 - 0.4) ** 2),
        theta_s * (1 - (0 / 4) ** 2) + theta_d * (1 - (1 - 0.0) ** 2),
        theta_s * (1 - (2 / 4) ** 2) + theta_d * (1 - (1 - 0.9) ** 2),
        -penalty,
    ]
    r = pg.reward(
        jnp.asarray(correct),
        jnp.asarray(policies),
        jnp.asarray(uniq),
        theta_s=theta_s,
        theta_d=theta_d,
        penalty=penalty,
    )
    assert r.shape == (5,) and r.dtype == jnp.float32
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_reward_without_diversity_term_is_blockdrop_reward():
    policies = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    r = pg.reward(
        jnp.array([1, 0]), policies, jnp.array([0.7, 0.2]), theta_s=1.0, theta_d=0.0, penalty=5.0
    )
    np.testing.assert_allclose(r, [1 - (1 / 3) ** 2, -5.0], rtol=1e-6)


def test_reward_rejects_negative_penalty():
    with pytest.raises(ValueError, match="penalty"):
        pg.reward(jnp.ones(1), jnp.ones((1, 3)), jnp.zeros(1), theta_s=1, theta_d=0, penalty=-1)


def test_self_critical_advantage_is_sample_minus_greedy_reward():
    samples = random_policies(5, 8, 6)
    greedy = random_policies(6, 8, 6)
    sample_correct = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    greedy_correct = np.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
    hyper = dict(theta_s=1.0, theta_d=0.3, penalty=1.5)

    def eqn5(correct, policies):
        u = pairwise_uniqueness(policies)
        used = policies.sum(-1) / policies.shape[-1]
        return np.where(
            correct, (1 - used**2) + hyper["theta_d"] * (1 - (1 - u) ** 2), -hyper["penalty"]
        )

    advantage, aux = pg.self_critical_advantage(
        sample_policies=jnp.asarray(samples),
        sample_correct=jnp.asarray(sample_correct),
        greedy_policies=jnp.asarray(greedy),
        greedy_correct=jnp.asarray(greedy_correct),
        **hyper,
    )
    expected = eqn5(sample_correct, samples) - eqn5(greedy_correct, greedy)
    np.testing.assert_allclose(advantage, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["uniqueness"], pairwise_uniqueness(samples), rtol=1e-6)


# --- REINFORCE loss (Eqns 6, 8) ------------------------------------------------------------


def analytic_loss_and_grad(probs, policies, advantage, *, bound, beta, mask):
    """Loss and d loss / d s by hand, with s' = b s + (1 - b)(1 - s), ds'/ds = 2b - 1.

    log π = p log s' + (1 - p) log(1 - s'):   d/ds' = p / s' - (1 - p) / (1 - s')
    H = -s' log s' - (1 - s') log(1 - s'):     d/ds' = log((1 - s') / s')
    """
    b_size = probs.shape[0]
    s = bound * probs + (1 - bound) * (1 - probs)
    log_pi = policies * np.log(s) + (1 - policies) * np.log(1 - s)
    entropy = -s * np.log(s) - (1 - s) * np.log(1 - s)
    a = advantage[:, None]
    loss = -np.sum(a * mask * log_pi) / b_size - beta * np.sum(mask * entropy) / b_size
    d_log_pi = policies / s - (1 - policies) / (1 - s)
    d_entropy = np.log((1 - s) / s)
    grad = (2 * bound - 1) * mask * (-a * d_log_pi - beta * d_entropy) / b_size
    return loss, grad


@pytest.mark.parametrize(
    "beta, mask",
    [
        (0.0, None),
        (0.0, np.array([0, 0, 1, 1, 1], np.float32)),
        (0.1, None),
        (0.1, np.array([0, 1, 1, 0, 1], np.float32)),
        (0.3, np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]], np.float32)),
    ],
)
def test_reinforce_loss_gradient_equals_analytic_reinforce_gradient(beta, mask):
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.05, 0.95, size=(3, 5))
    policies = rng.integers(0, 2, size=(3, 5)).astype(np.float64)
    advantage = np.array([0.7, -1.2, 0.3])
    bound = 0.8

    def loss_fn(probs, advantage):
        return pg.reinforce_loss(
            probs,
            jnp.asarray(policies, jnp.float32),
            advantage,
            bound=bound,
            entropy_weight=beta,
            mask=None if mask is None else jnp.asarray(mask),
        )

    (loss, aux), (grad, advantage_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(probs, jnp.float32), jnp.asarray(advantage, jnp.float32)
    )
    full_mask = np.ones((3, 5)) if mask is None else np.broadcast_to(mask, (3, 5))
    expected_loss, expected_grad = analytic_loss_and_grad(
        probs, policies, advantage, bound=bound, beta=beta, mask=full_mask
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    # The advantage is a constant of the policy gradient.
    np.testing.assert_array_equal(advantage_grad, np.zeros(3))
    s = bound * probs + (1 - bound) * (1 - probs)
    entropy = -s * np.log(s) - (1 - s) * np.log(1 - s)
    np.testing.assert_allclose(aux["entropy"], np.sum(full_mask * entropy) / 3, rtol=1e-5)
    np.testing.assert_allclose(
        aux["entropy_per_block"], np.sum(full_mask * entropy) / full_mask.sum(), rtol=1e-5
    )
    assert aux["entropy_per_block"] <= np.log(2)


def test_reinforce_loss_is_finite_at_saturated_probs_without_bound():
    probs = jnp.array([[0.0, 1.0, 0.0, 1.0]])
    policies = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    loss, _ = pg.reinforce_loss(probs, policies, jnp.array([1.0]), bound=1.0, entropy_weight=0.1)
    grad = jax.grad(lambda s: pg.reinforce_loss(s, policies, jnp.array([1.0]), bound=1.0)[0])(probs)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_reinforce_loss_jits_with_traced_curriculum_mask():
    probs = jnp.full((2, 4), 0.6)
    policies = jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])

    @jax.jit
    def loss_for_k(k):
        mask = pg.curriculum_mask(4, k)
        return pg.reinforce_loss(probs, policies, jnp.array([1.0, -1.0]), mask=mask)[0]

    s = 0.8 * 0.6 + 0.2 * 0.4
    # k = 1 decides only the last block: -(1/2)(1·log s + (-1)·log(1 - s)).
    np.testing.assert_allclose(
        loss_for_k(jnp.int32(1)), -(np.log(s) - np.log(1 - s)) / 2, rtol=1e-5
    )


# --- policy diversity ----------------------------------------------------------------------


def test_policy_diversity_counts_distinct_policies_like_paper_fig4():
    # Fig. 4: five images, three distinct inference paths.
    policies = np.array(
        [
            [1, 0, 1, 1, 0, 1],
            [1, 0, 1, 1, 0, 1],
            [0, 1, 1, 0, 1, 1],
            [1, 1, 0, 1, 1, 0],
            [0, 1, 1, 0, 1, 1],
        ]
    )
    assert pg.policy_diversity(policies) == 3
    assert pg.policy_diversity(policies.astype(bool)) == 3
    assert pg.policy_diversity(jnp.asarray(policies, jnp.float32)) == 3


def test_policy_diversity_edge_cases():
    all_policies = np.array(list(itertools.product([0, 1], repeat=4)), np.float32)
    assert pg.policy_diversity(all_policies) == 16
    assert pg.policy_diversity(np.zeros((0, 4))) == 0
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        pg.policy_diversity(np.zeros(4))
    with pytest.raises(ValueError, match="0/1"):
        pg.policy_diversity(np.full((2, 3), 0.5))
