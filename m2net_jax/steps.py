"""The jitted, data-parallel steps: losses, the train step of each stage and the predict step.

Every step is `jax.jit` of `jax.shard_map` over the 1-D ``('data',)`` mesh of every device of
every process. Inside, each device holds B rows of the global batch of M: gradients and metrics
are `pmean`-ed over the axis, the uniqueness counts of Eqn 2 `psum`-ed, batch norm synced. The
same program runs on one CPU and on a pod.

The step is a pure function of (state, batch); everything else is a keyword bound before
jitting. This module needs only jax, flax, optax and numpy (plus the math and model modules):
no TensorFlow, TFDS, grain, clu, ml_collections or Orbax, so it runs on any machine with JAX.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2net_jax import fast_forward
from m2net_jax import policy_gradient as pg
from m2net_jax.state import (
    AXIS,
    Networks,
    StageSpec,
    TrainState,
    location_kwargs,
    network_variables,
    trainable,
)


@flax.struct.dataclass
class LossHyperparams:
    """A stage's scalars that the loss reads (static: baked into the compiled step).

    `penalty` is λ > 0 of Eqn 5 (a wrong prediction is rewarded −λ); `bound` the exploration
    bound of the sampling; the policy stage's curriculum opens one more block every
    `curriculum_steps` steps (`policy_gradient.curriculum_steps`).
    """

    theta_s: float = flax.struct.field(pytree_node=False)
    theta_d: float = flax.struct.field(pytree_node=False)
    penalty: float = flax.struct.field(pytree_node=False)
    entropy_weight: float = flax.struct.field(pytree_node=False)
    bound: float = flax.struct.field(pytree_node=False)
    curriculum_steps: int = flax.struct.field(pytree_node=False)


def loss_hyperparams(config, stage: str, *, steps_per_epoch: int) -> LossHyperparams:
    """The `LossHyperparams` of a config's stage."""
    stage_cfg = config.stages[stage]
    return LossHyperparams(
        theta_s=config.reward.theta_s,
        theta_d=config.reward.theta_d,
        penalty=stage_cfg.penalty,
        entropy_weight=stage_cfg.entropy_weight,
        bound=config.sampling.bound,
        curriculum_steps=pg.curriculum_steps(config.sampling.curriculum_epochs, steps_per_epoch),
    )


# --------------------------------------------------------------------------------------------
# Losses (per device, inside shard_map).


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, K) logits against (B,) integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classification_loss(params, batch_stats, batch, key, step, *, networks: Networks, hp):
    """Pretrain: cross-entropy of the full recognizer (all blocks on), plus that of the image
    classifier on the policy-resolution photos when the stage trains one.

    The two networks share no parameter, so summing the losses trains each as if alone.
    """
    del key, step, hp
    rec = networks.recognizer
    variables = {"params": params, "batch_stats": batch_stats}
    policy = jnp.ones((batch["label"].shape[0], rec.num_blocks), jnp.float32)
    logits, updates = rec.apply(
        network_variables(variables, "recognizer"),
        batch["image"],
        policy,
        train=True,
        mutable=["batch_stats"],
        **location_kwargs(rec, batch["location"]),
    )
    ce = cross_entropy(logits, batch["label"])
    scalars = {"cross_entropy": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    new_stats = {**batch_stats, "recognizer": updates["batch_stats"]}
    loss = ce
    if "image_classifier" in params:
        cls_logits, cls_updates = networks.image_classifier.apply(
            network_variables(variables, "image_classifier"),
            batch["policy_image"],
            train=True,
            mutable=["batch_stats"],
        )
        cls_ce = cross_entropy(cls_logits, batch["label"])
        loss = loss + cls_ce
        new_stats["image_classifier"] = cls_updates["batch_stats"]
        scalars["image_classifier_accuracy"] = jnp.mean(
            jnp.argmax(cls_logits, -1) == batch["label"]
        )
    return loss, (new_stats, {"loss": loss, **scalars})


def sample_per_example(key, probs, *, bound: float) -> jax.Array:
    """Samples each example's policy from a key folded with its index in the global batch.

    Folding by global example index (not by device) makes the draws independent of how the
    batch is split over devices and processes: 1 device and 64 devices sample the same policies.
    """
    b = probs.shape[0]
    index = lax.axis_index(AXIS) * b + jnp.arange(b)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
    return jax.vmap(lambda k, s: pg.sample_policy(k, s[None], bound=bound)[0])(keys, probs)


def policy_loss(
    params,
    batch_stats,
    batch,
    key,
    step,
    *,
    networks: Networks,
    hp: LossHyperparams,
    train_recognizer: bool,
    frozen_logits=fast_forward.frozen_logits,
):
    """Policy and finetune stages: REINFORCE with a self-critical baseline (Eqns 2, 5, 8).

    With `train_recognizer` (finetune) the recognizer runs in training mode and its
    cross-entropy under the sampled policy is added; otherwise it is frozen, inference-mode,
    and `frozen_logits` computes its greedy and sampled forwards (by default sharing the blocks
    where the two policies agree; `fast_forward.naive_frozen_logits` runs two plain forwards).
    """
    rec, pol = networks.recognizer, networks.policy
    variables = {"params": params, "batch_stats": batch_stats}
    n = rec.num_blocks
    probs, pol_updates = pol.apply(
        network_variables(variables, "policy"),
        batch["policy_image"],
        batch["location"],
        train=True,
        mutable=["batch_stats"],
    )
    if train_recognizer:
        k = jnp.asarray(n, jnp.int32)
    else:
        k = pg.curriculum_k(step, num_blocks=n, steps_per_k=hp.curriculum_steps)
    mask = pg.curriculum_mask(n, k)
    sampled = pg.apply_curriculum(sample_per_example(key, probs, bound=hp.bound), mask)
    greedy = pg.apply_curriculum(pg.greedy_policy(probs), mask)

    rec_vars = network_variables(variables, "recognizer")
    geo = location_kwargs(rec, batch["location"])
    if train_recognizer:
        # BlockDrop's finetune runs both forwards in training mode; only the sampled one trains.
        recognize = functools.partial(rec.apply, rec_vars, batch["image"], **geo)
        logits_s, rec_updates = recognize(sampled, train=True, mutable=["batch_stats"])
        logits_g, _ = recognize(greedy, train=True, mutable=["batch_stats"])
        logits_g = lax.stop_gradient(logits_g)
        new_rec_stats = rec_updates["batch_stats"]
    else:
        logits_g, logits_s = frozen_logits(rec, rec_vars, batch["image"], greedy, sampled, **geo)
        new_rec_stats = batch_stats["recognizer"]

    labels = batch["label"]
    correct_s = jnp.argmax(logits_s, -1) == labels
    correct_g = jnp.argmax(logits_g, -1) == labels
    advantage, rewards = pg.self_critical_advantage(
        sample_policies=sampled,
        sample_correct=correct_s,
        greedy_policies=greedy,
        greedy_correct=correct_g,
        theta_s=hp.theta_s,
        theta_d=hp.theta_d,
        penalty=hp.penalty,
        axis_name=AXIS,
    )
    loss, aux = pg.reinforce_loss(
        probs, sampled, advantage, bound=hp.bound, entropy_weight=hp.entropy_weight, mask=mask
    )
    ce = cross_entropy(logits_s, labels)
    if train_recognizer:
        loss = loss + ce
    new_stats = {"recognizer": new_rec_stats, "policy": pol_updates["batch_stats"]}
    scalars = {
        "loss": loss,
        "cross_entropy": ce,
        "accuracy": jnp.mean(correct_g),
        "accuracy_sampled": jnp.mean(correct_s),
        "reward": jnp.mean(rewards["reward"]),
        "advantage": jnp.mean(advantage),
        "blocks": jnp.mean(jnp.sum(greedy, -1)),
        "blocks_sampled": jnp.mean(jnp.sum(sampled, -1)),
        "uniqueness": jnp.mean(rewards["greedy_uniqueness"]),
        "curriculum_k": k.astype(jnp.float32),
        **{name: jnp.mean(value) for name, value in aux.items()},
    }
    return loss, (new_stats, scalars)


# --------------------------------------------------------------------------------------------
# The sharded train step.


def train_step(state: TrainState, batch, *, spec: StageSpec, loss_fn, tx) -> tuple:
    """One optimizer step on this device's shard; gradients and metrics averaged over 'data'.

    A step whose loss, gradient, or any parameter, batch statistic or optimizer moment it would
    keep is not finite changes nothing but the step counter (so the state never absorbs a NaN
    or an overflow) and reports `nonfinite` = 1; the loop decides what that means.
    """
    key = jax.random.fold_in(state.rng, state.step)
    train_params = trainable(state.params, spec)

    def loss_of_trainable(train_params):
        params = {**state.params, **train_params}
        return loss_fn(params, state.batch_stats, batch, key, state.step)

    grads, (batch_stats, scalars) = jax.grad(loss_of_trainable, has_aux=True)(train_params)
    grads = lax.pmean(grads, AXIS)
    scalars = lax.pmean(scalars, AXIS)
    batch_stats = lax.pmean(batch_stats, AXIS)  # Already equal when BN is synced; keeps it so.
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    new_params = optax.apply_updates(train_params, updates)
    grad_norm = optax.tree.norm(grads)
    # A finite loss and gradient can still overflow what the step keeps (a huge update, a
    # batch-norm variance of inf), so the kept trees are checked too: one cheap pass over them.
    finite = jnp.isfinite(scalars["loss"]) & jnp.isfinite(grad_norm)
    for tree in (new_params, batch_stats, opt_state):
        finite &= _all_finite(tree)
    # One `lax.cond` over the whole kept state, not a `jnp.where` per leaf: with per-leaf
    # selects XLA:CPU fuses the finiteness reductions into every select and compiles the
    # ResNet-47 finetune step in minutes instead of seconds (BUILD_NOTES, "Compile time").
    new_params, batch_stats, opt_state = lax.cond(
        finite,
        lambda: (new_params, batch_stats, opt_state),
        lambda: (train_params, state.batch_stats, state.opt_state),
    )
    scalars["grad_norm"] = grad_norm
    scalars["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **new_params},
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, scalars


def _all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of `tree` is finite (integer leaves, e.g. counts, always are)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(
    spec: StageSpec,
    networks: Networks,
    hp: LossHyperparams,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    frozen_logits=fast_forward.frozen_logits,
) -> Callable:
    """`jax.jit(jax.shard_map(train_step))` for a stage: state replicated, batch split.

    The returned function maps (state, batch) -> (state, scalars) and donates the state.
    `frozen_logits` computes the policy stage's two frozen-recognizer forwards (see
    `policy_loss`); the benchmark passes the naive one to measure what sharing buys.
    """
    if spec.name == "pretrain":
        loss_fn = functools.partial(classification_loss, networks=networks, hp=hp)
    else:
        loss_fn = functools.partial(
            policy_loss,
            networks=networks,
            hp=hp,
            train_recognizer="recognizer" in spec.trains,
            frozen_logits=frozen_logits,
        )
    step = functools.partial(train_step, spec=spec, loss_fn=loss_fn, tx=tx)
    # check_vma=False: classic data-parallel semantics, per-device gradients pmean-ed explicitly.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)


# --------------------------------------------------------------------------------------------
# The predict step (evaluation).


def predict_step(
    variables, batch, *, networks: Networks, use_policy: bool, decided_blocks: int | None = None
):
    """Per device: greedy policies (B, N) bool and whether each prediction is right (B,).

    Also returns the predicted class (B,) int32, which the mechanism metrics need. With
    `decided_blocks` = k, only the last k blocks follow the policy and the earlier ones run, as
    in the policy stage's training at a curriculum step k < N.
    """
    rec = networks.recognizer
    b = batch["label"].shape[0]
    if use_policy:
        probs = networks.policy.apply(
            network_variables(variables, "policy"),
            batch["policy_image"],
            batch["location"],
            train=False,
        )
        policy = pg.greedy_policy(probs)
        if decided_blocks is not None:
            policy = pg.apply_curriculum(policy, pg.curriculum_mask(rec.num_blocks, decided_blocks))
    else:
        policy = jnp.ones((b, rec.num_blocks), jnp.float32)
    logits = rec.apply(
        network_variables(variables, "recognizer"),
        batch["image"],
        policy,
        train=False,
        **location_kwargs(rec, batch["location"]),
    )
    prediction = jnp.argmax(logits, -1).astype(jnp.int32)
    return {
        "correct": prediction == batch["label"],
        "prediction": prediction,
        "policy": policy > 0.5,
    }


@functools.lru_cache(maxsize=16)
def make_predict_step(
    networks: Networks,
    mesh: jax.sharding.Mesh,
    *,
    use_policy: bool,
    decided_blocks: int | None = None,
):
    """The jitted, data-parallel `predict_step` over `mesh`: (variables, batch) -> outputs.

    Cached: equal networks on one mesh (every stage's evaluation, systems that differ only in
    their reward) share one compiled program.
    """
    step = functools.partial(
        predict_step, networks=networks, use_policy=use_policy, decided_blocks=decided_blocks
    )
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False
    )
    return jax.jit(sharded)


# --------------------------------------------------------------------------------------------
# The mesh and the batches.


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D ('data',) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def shard_batch(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's share) -> global arrays split over 'data'.

    The one place where host data becomes global: each process passes its own rows.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }


def replicate(tree: Any, mesh) -> Any:
    """`tree` placed, whole, on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch(global_batch: int, mesh, key: str) -> None:
    """A clear error unless the global batch splits evenly over devices and processes."""
    n_dev, n_proc = mesh.size, jax.process_count()
    if global_batch % n_dev or global_batch % n_proc:
        raise ValueError(
            f"{key}={global_batch} must be divisible by the device count ({n_dev}) and the "
            f"process count ({n_proc}); set it to a multiple of {n_dev}."
        )


# --------------------------------------------------------------------------------------------
# The persistent compilation cache.


def default_compilation_cache_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR when set, else ``$XDG_CACHE_HOME/m2net_jax/jax`` (by default
    ``~/.cache/m2net_jax/jax``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "m2net_jax", "jax")


def configure_compilation_cache(directory: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `directory`; returns the one in use.

    A rerun, a resumed job or the evaluation of a workdir then loads the compiled steps from disk
    instead of compiling them again (minutes at paper sizes). Call it once per process, before
    the first compilation: JAX opens the cache at its first compile and keeps it.

    Args:
      directory: `config.compilation_cache_dir`: None for `default_compilation_cache_dir`, ''
        to turn the cache off, or a path (``~`` expanded).

    Returns:
      The cache directory, or None when the cache is off.
    """
    if directory == "":
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("Persistent compilation cache off (config.compilation_cache_dir='').")
        return None
    path = default_compilation_cache_dir() if directory is None else os.path.expanduser(directory)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("Persistent compilation cache in %s.", path)
    return path
