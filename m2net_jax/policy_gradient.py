"""Policy-gradient math of M²Net: sampling, uniqueness, reward and the REINFORCE loss.

Paper sections: §3.2 (uniqueness, Eqn 2), §3.4 (reward, Eqn 5; policy gradient, Eqns 6 and 8).
Sampling, the exploration bound, the self-critical baseline and the curriculum follow BlockDrop
(Wu et al., CVPR 2018), which M²Net extends.

Notation: M samples in the global batch, B samples on one device, N droppable blocks. A policy
``p ∈ {0, 1}^N`` says which blocks run (1 = run). The policy network outputs probabilities
``s ∈ (0, 1)^N``; the exploration bound b turns them into ``s' = b·s + (1 − b)(1 − s)``, from
which training samples ``p ~ Bernoulli(s')``; evaluation uses the greedy ``p̃ = [s ≥ 0.5]``.

Everything except `policy_diversity` is pure jax.numpy and jit-able. Hyperparameters are
keyword-only. Functions that need the whole global batch (`uniqueness`, `self_critical_advantage`)
take an optional ``axis_name`` and, inside `jax.shard_map`, reduce only O(N) numbers across it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Probabilities are kept this far from 0 and 1 before taking logs; with the default bound 0.8
# the bounded probabilities lie in [0.2, 0.8] and the clip never binds.
_PROB_EPS = 1e-6


def bounded_probs(probs: jax.Array, *, bound: float = 0.8) -> jax.Array:
    """Exploration bound ``s' = b·s + (1 − b)(1 − s)`` (BlockDrop's ``alpha``).

    Keeps every block's sampling probability inside [1 − b, b] so that the policy keeps
    exploring, while ``s = 0.5`` stays at 0.5 and the order of probabilities is kept for b > 0.5.

    Args:
      probs: (B, N) policy-network probabilities s in [0, 1].
      bound: b in [0.5, 1]; 1 disables the bound.

    Returns:
      (B, N) bounded probabilities s', same dtype as `probs`.
    """
    return bound * probs + (1.0 - bound) * (1.0 - probs)


def sample_policy(key: jax.Array, probs: jax.Array, *, bound: float = 0.8) -> jax.Array:
    """Samples training policies ``p ~ Bernoulli(s')`` with s' the bounded probabilities.

    Args:
      key: PRNG key.
      probs: (B, N) policy-network probabilities s.
      bound: exploration bound b (see `bounded_probs`).

    Returns:
      (B, N) float32 in {0, 1}; 1 = run the block.
    """
    return jax.random.bernoulli(key, bounded_probs(probs, bound=bound)).astype(jnp.float32)


def greedy_policy(probs: jax.Array) -> jax.Array:
    """The maximally probable policy ``p̃_n = [s_n ≥ 0.5]``, used for evaluation and inference.

    Args:
      probs: (B, N) policy-network probabilities s.

    Returns:
      (B, N) float32 in {0, 1}.
    """
    return (probs >= 0.5).astype(jnp.float32)


def curriculum_steps(curriculum_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps per curriculum step: ``max(1, floor(E · steps_per_epoch))``.

    BlockDrop hands the policy one more block every E epochs; E may be a fraction of an epoch
    (a short stage must still open all N blocks), and a curriculum step is never under one step.
    Rounding down keeps the promise of `validation`: a stage of at least N · E epochs ends with
    at least E epochs at k = N.

    Args:
      curriculum_epochs: E > 0 (`config.sampling.curriculum_epochs`).
      steps_per_epoch: the policy stage's optimizer steps per epoch.
    """
    if not curriculum_epochs > 0:
        raise ValueError(f"curriculum_epochs must be positive, got {curriculum_epochs}.")
    return max(1, math.floor(curriculum_epochs * steps_per_epoch))


def curriculum_k(step, *, num_blocks: int, steps_per_k: int) -> jax.Array:
    """Number of blocks the policy decides at `step`: ``k = min(N, 1 + step // steps_per_k)``.

    BlockDrop's curriculum: the policy first learns to drop only the last block, and every
    `steps_per_k` steps (E epochs, `curriculum_steps`) one more block, counted from the end, is
    handed to it.

    Args:
      step: 0-based step of the policy stage; Python int or (traced) integer array.
      num_blocks: N, the number of droppable blocks.
      steps_per_k: ≥ 1, optimizer steps per curriculum step.

    Returns:
      Scalar int32 array k in [1, N].
    """
    if steps_per_k < 1:
        raise ValueError(f"steps_per_k must be at least 1, got {steps_per_k}.")
    return jnp.minimum(num_blocks, 1 + jnp.asarray(step, jnp.int32) // steps_per_k)


def curriculum_mask(num_blocks: int, k) -> jax.Array:
    """Which blocks the policy decides under the curriculum: the last `k` of `num_blocks`.

    Args:
      num_blocks: N (static).
      k: number of decided blocks; Python int or (traced) integer array. k ≥ N decides all.

    Returns:
      (N,) float32: 1 for the last k blocks (decided by the policy, in the loss), 0 for the
      earlier ones (forced on, out of the loss).
    """
    return (jnp.arange(num_blocks) >= num_blocks - k).astype(jnp.float32)


def apply_curriculum(policies: jax.Array, mask: jax.Array) -> jax.Array:
    """Forces the blocks outside the curriculum on.

    Args:
      policies: (B, N) bool or float policies.
      mask: (N,) or (B, N) curriculum mask, 1 = decided by the policy (`curriculum_mask`).

    Returns:
      (B, N) policies of the same dtype with every block where ``mask == 0`` set to 1.
    """
    return jnp.where(mask > 0, policies, jnp.ones_like(policies))


def uniqueness(policies: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Uniqueness of each policy within the global batch (Eqn 2).

    ``u_i = (1/M) Σ_j Hamming(p_i, p_j) / N``, the mean normalised Hamming distance from policy i
    to all M policies of the batch (itself included, at distance 0). It is computed in O(M·N)
    from the per-block counts ``c_n = Σ_j p_jn``: policy j differs from p_i at block n exactly
    when ``p_jn ≠ p_in``, so ``Σ_j |p_in − p_jn| = p_in (M − c_n) + (1 − p_in) c_n`` and

        u_i = (1 / (M·N)) Σ_n [p_in (M − c_n) + (1 − p_in) c_n].

    With `axis_name` (inside `jax.shard_map` or another named-axis context) the batch is the
    union of all shards along that axis: the N counts and the sample count are `psum`-ed, so no
    device ever holds the M×M distance matrix or the other shards' policies.

    Args:
      policies: (B, N) bool or float policies in {0, 1}; B = M without `axis_name`.
      axis_name: mesh axis over which the global batch is sharded, or None.

    Returns:
      (B,) float32 in [0, 1]: the uniqueness of this shard's policies within the global batch.
      All-equal policies give 0.
    """
    policies = policies.astype(jnp.float32)
    counts = jnp.sum(policies, axis=0)  # (N,) c_n
    num_samples = jnp.float32(policies.shape[0])
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
        num_samples = jax.lax.psum(num_samples, axis_name)
    num_blocks = policies.shape[-1]
    mismatches = policies * (num_samples - counts) + (1.0 - policies) * counts  # (B, N)
    return jnp.sum(mismatches, axis=-1) / (num_samples * num_blocks)


def reward(
    correct: jax.Array,
    policies: jax.Array,
    uniq: jax.Array,
    *,
    theta_s: float,
    theta_d: float,
    penalty: float,
) -> jax.Array:
    """Reward of each policy (Eqn 5).

    ``R(p) = θ_s (1 − (|p|₀ / N)²) + θ_d (1 − (1 − u)²)`` if the recognizer's prediction under p
    is correct, else ``−λ``. The first term prefers few blocks, the second policies that differ
    from the rest of the batch. ``θ_d = 0`` gives BlockDrop's reward.

    Args:
      correct: (B,) bool (or {0, 1}) — was the recognizer's prediction under p correct.
      policies: (B, N) bool or float policies; |p|₀ counts every executed block, including
        blocks forced on by the curriculum.
      uniq: (B,) uniqueness u of each policy (`uniqueness`).
      theta_s: θ_s, weight of the sparsity term.
      theta_d: θ_d, weight of the diversity term.
      penalty: λ > 0; a wrong prediction is rewarded −λ.

    Returns:
      (B,) float32 rewards.
    """
    # BlockDrop's code stores the penalty with its sign (e.g. -1); the paper writes −λ. Catch a
    # config that gives the sign twice, which would silently reward wrong predictions.
    if isinstance(penalty, int | float) and penalty < 0:
        raise ValueError(f"penalty is λ > 0 (wrong predictions get −λ); got {penalty}.")
    policies = policies.astype(jnp.float32)
    used_fraction = jnp.sum(policies, axis=-1) / policies.shape[-1]
    correct_reward = theta_s * (1.0 - used_fraction**2) + theta_d * (1.0 - (1.0 - uniq) ** 2)
    return jnp.where(jnp.asarray(correct, bool), correct_reward, -penalty).astype(jnp.float32)


def self_critical_advantage(
    *,
    sample_policies: jax.Array,
    sample_correct: jax.Array,
    greedy_policies: jax.Array,
    greedy_correct: jax.Array,
    theta_s: float,
    theta_d: float,
    penalty: float,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Self-critical advantage ``A = R(p) − R(p̃)`` (BlockDrop's baseline, paper Eqn 8).

    Each reward uses the uniqueness of its own kind of policy: sampled policies against the
    sampled policies of the global batch, greedy ones against the greedy policies.

    Args:
      sample_policies: (B, N) sampled policies p (after the curriculum is applied).
      sample_correct: (B,) bool, recognizer correct under p.
      greedy_policies: (B, N) greedy policies p̃ (after the curriculum is applied).
      greedy_correct: (B,) bool, recognizer correct under p̃.
      theta_s, theta_d, penalty: as in `reward`.
      axis_name: mesh axis of the global batch for `uniqueness`, or None.

    Returns:
      (advantage, aux): advantage (B,) float32; aux holds the (B,) arrays ``reward``,
      ``greedy_reward``, ``uniqueness`` and ``greedy_uniqueness``.
    """
    hyper = dict(theta_s=theta_s, theta_d=theta_d, penalty=penalty)
    uniq = uniqueness(sample_policies, axis_name)
    greedy_uniq = uniqueness(greedy_policies, axis_name)
    sample_reward = reward(sample_correct, sample_policies, uniq, **hyper)
    greedy_reward = reward(greedy_correct, greedy_policies, greedy_uniq, **hyper)
    aux = dict(
        reward=sample_reward,
        greedy_reward=greedy_reward,
        uniqueness=uniq,
        greedy_uniqueness=greedy_uniq,
    )
    return sample_reward - greedy_reward, aux


def reinforce_loss(
    probs: jax.Array,
    policies: jax.Array,
    advantage: jax.Array,
    *,
    bound: float = 0.8,
    entropy_weight: float = 0.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE loss with entropy bonus (Eqns 6, 8), to be minimised w.r.t. the probabilities.

        loss = −mean_i A_i Σ_n m_n log π(p_in) − β · mean_i Σ_n m_n H(s'_in)

    with ``log π(p_in) = p_in log s'_in + (1 − p_in) log(1 − s'_in)`` under the bounded
    probabilities s' (the distribution the policies were sampled from), H the Bernoulli entropy
    of s', m the curriculum mask and β the entropy weight. The advantage is a constant
    (`jax.lax.stop_gradient`). Summing over blocks and averaging over samples is BlockDrop's
    normalisation. Inside `jax.shard_map` this is the mean over the local B samples; the
    `pmean` of the gradients over equal shards then gives the global-batch mean.

    Args:
      probs: (B, N) policy-network probabilities s (unbounded), the differentiated input.
      policies: (B, N) bool or float sampled policies p.
      advantage: (B,) advantage A, e.g. `self_critical_advantage`.
      bound: exploration bound b used when sampling.
      entropy_weight: β ≥ 0.
      mask: optional (N,) or (B, N) curriculum mask; blocks with 0 (forced on) are left out of
        both terms. None = every block decided.

    Returns:
      (loss, aux): scalar float32 loss; aux holds scalars ``pg_loss`` (first term),
      ``log_prob`` (mean_i Σ_n m_n log π), ``entropy`` (mean_i Σ_n m_n H, the bonus's quantity)
      and ``entropy_per_block`` (the mean H over decided blocks, at most log 2).
    """
    policies = policies.astype(jnp.float32)
    advantage = jax.lax.stop_gradient(advantage)
    if mask is None:
        mask = jnp.ones_like(policies)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), policies.shape)

    s = jnp.clip(bounded_probs(probs, bound=bound), _PROB_EPS, 1.0 - _PROB_EPS)
    log_s, log_not_s = jnp.log(s), jnp.log1p(-s)
    log_prob = jnp.sum(mask * (policies * log_s + (1.0 - policies) * log_not_s), axis=-1)  # (B,)
    entropy = jnp.sum(mask * -(s * log_s + (1.0 - s) * log_not_s), axis=-1)  # (B,)

    pg_loss = -jnp.mean(advantage * log_prob)
    mean_entropy = jnp.mean(entropy)
    loss = pg_loss - entropy_weight * mean_entropy
    aux = dict(
        pg_loss=pg_loss,
        log_prob=jnp.mean(log_prob),
        entropy=mean_entropy,
        entropy_per_block=jnp.sum(entropy) / jnp.maximum(jnp.sum(mask), 1.0),
    )
    return loss, aux


def policy_diversity(policies) -> int:
    """Number of distinct policies (rows) — the paper's policy-diversity metric (§4, Fig. 4).

    Host-side numpy; call it on the policies gathered over the evaluated set.

    Args:
      policies: (M, N) bool, int or float array (numpy or jax) with entries in {0, 1}.

    Returns:
      The number of distinct rows, 0 for M = 0.
    """
    policies = np.asarray(policies)
    if policies.ndim != 2:
        raise ValueError(f"Expected policies of shape (M, N), got {policies.shape}.")
    if not np.isin(policies, (0, 1)).all():
        raise ValueError("Policies must hold only 0/1 (or False/True) entries.")
    return int(np.unique(policies.astype(bool), axis=0).shape[0])
