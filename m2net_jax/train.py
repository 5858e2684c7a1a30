"""Training M²Net: BlockDrop's three stages over one data-parallel mesh (DESIGN.md §1, §4).

1. *pretrain* — the recognizer alone, all blocks on, cross-entropy.
2. *policy* — the recognizer frozen (inference-mode batch norm); the policy network trained with
   REINFORCE (Eqns 5, 6, 8) under a curriculum that decides only the last k blocks.
3. *finetune* — policy and recognizer jointly: policy-gradient loss + cross-entropy of the
   recognizer under the sampled policy.

A stage is data (`StageSpec`): which networks train and which loss. One loop, `train_stage`,
runs any of them. Steps are `jax.jit` of `jax.shard_map` over a 1-D `('data',)` mesh of every
device of every process: gradients and metrics are `pmean`-ed, the uniqueness counts `psum`-ed,
batch norm is synced over the axis. The same code runs on 1 CPU and on a pod.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2net_jax import checkpoint as ckpt
from m2net_jax import fast_forward
from m2net_jax import policy_gradient as pg
from m2net_jax.data import pipeline
from m2net_jax.models import PolicyNetwork, Recognizer

AXIS = "data"
STAGES = ("pretrain", "policy", "finetune")


# --------------------------------------------------------------------------------------------
# Stages, models and state.


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What distinguishes one stage of the schedule from another."""

    name: str
    networks: tuple[str, ...]  # Which networks ('recognizer', 'policy') the stage runs.
    trains: tuple[str, ...]  # Which of them the optimizer updates.

    @property
    def uses_policy(self) -> bool:
        """Whether blocks are chosen by the policy network (else all of them run)."""
        return "policy" in self.networks


STAGE_SPECS = {
    "pretrain": StageSpec("pretrain", networks=("recognizer",), trains=("recognizer",)),
    "policy": StageSpec("policy", networks=("recognizer", "policy"), trains=("policy",)),
    "finetune": StageSpec(
        "finetune", networks=("recognizer", "policy"), trains=("recognizer", "policy")
    ),
}


def parse_stages(run: str) -> tuple[str, ...]:
    """'pretrain,policy' -> ('pretrain', 'policy'), validated and in schedule order."""
    names = tuple(s.strip() for s in run.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(
            f"config.stages.run={run!r} names unknown stages {unknown}; use a comma-separated "
            f"subset of {','.join(STAGES)}."
        )
    return tuple(s for s in STAGES if s in names)


@flax.struct.dataclass
class Models:
    """The two networks of M²Net (static: module definitions, no parameters)."""

    recognizer: Recognizer = flax.struct.field(pytree_node=False)
    policy: PolicyNetwork = flax.struct.field(pytree_node=False)


def create_models(config: ml_collections.ConfigDict, num_classes: int) -> Models:
    """Builds the recognizer and policy network a config describes, BN synced over 'data'."""
    recognizer = Recognizer(
        depth=config.recognizer.depth,
        num_classes=num_classes,
        width=config.recognizer.width,
        stem=config.recognizer.stem,
        conv_type=config.recognizer.conv_type,
        geo_conditioning=config.recognizer.geo_conditioning,
        axis_name=AXIS,
    )
    policy = PolicyNetwork(
        num_blocks=recognizer.num_blocks,
        use_geo=config.policy.use_geo,
        fusion_alpha=config.policy.fusion_alpha,
        width=config.policy.width,
        stem=config.policy.stem,
        axis_name=AXIS,
    )
    return Models(recognizer=recognizer, policy=policy)


def init_variables(models: Models, key: jax.Array, image_size: int) -> dict[str, Any]:
    """Initial {'params', 'batch_stats'} of both networks: {'recognizer': ..., 'policy': ...}.

    Each network's initial values depend only on `key` and its own definition, so a policy
    network initialised next to another recognizer is the same. Runs outside shard_map, on
    copies of the modules without a BN axis.
    """
    return _init_variables(models, key, image_size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(models: Models, key: jax.Array, image_size: int) -> dict[str, Any]:
    rec = models.recognizer.clone(axis_name=None)
    pol = models.policy.clone(axis_name=None)
    k_rec, k_pol = jax.random.split(key)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    policy_images = jnp.zeros((1, image_size // 2, image_size // 2, 3), jnp.float32)
    locations = jnp.zeros((1, 8), jnp.float32)
    v_rec = rec.init(
        k_rec, images, jnp.ones((1, rec.num_blocks)), train=False, **location_kwargs(rec, locations)
    )
    v_pol = pol.init(k_pol, policy_images, locations, train=False)
    return {
        "params": {"recognizer": v_rec["params"], "policy": v_pol["params"]},
        "batch_stats": {"recognizer": v_rec["batch_stats"], "policy": v_pol["batch_stats"]},
    }


def location_kwargs(recognizer, locations) -> dict[str, Any]:
    """The recognizer's location argument: only M²Net+ recognizers take one."""
    return {"locations": locations} if recognizer.geo_conditioning else {}


def select_networks(variables: Mapping[str, Any], networks) -> dict[str, Any]:
    return {c: {n: variables[c][n] for n in networks} for c in ("params", "batch_stats")}


def complete_variables(variables: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the networks it lacks taken from `fresh` (e.g. a new policy network
    next to a pretrained recognizer)."""
    return {c: {**fresh[c], **variables[c]} for c in ("params", "batch_stats")}


def model_signature(config: ml_collections.ConfigDict, num_classes: int, spec) -> dict[str, Any]:
    """The config values that fix a stage's checkpoint shapes (checked when resuming)."""
    sig = {
        "data.image_size": config.data.image_size,
        "num_classes": num_classes,
        **{f"recognizer.{k}": v for k, v in config.recognizer.items()},
    }
    if spec.uses_policy:
        sig.update({f"policy.{k}": config.policy[k] for k in ("use_geo", "width", "stem")})
    return sig


@flax.struct.dataclass
class TrainState:
    """Everything a stage needs to continue exactly where it stopped (with the data iterator).

    `opt_state` covers only the stage's trainable networks: frozen ones are not passed to the
    optimizer at all. `rng` is the stage's base key; step t uses `fold_in(rng, t)`.
    """

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: optax.OptState
    rng: jax.Array


def trainable(tree: Mapping[str, Any], spec: StageSpec) -> dict[str, Any]:
    return {name: tree[name] for name in spec.trains}


def make_optimizer(stage_cfg: ml_collections.ConfigDict, *, steps_per_epoch: int):
    """The stage's optax optimizer: (SGD-Nesterov | Adam) with L2 decay and an LR schedule."""
    total_steps = max(1, stage_cfg.epochs * steps_per_epoch)
    warmup = min(stage_cfg.warmup_epochs * steps_per_epoch, total_steps - 1)
    if stage_cfg.schedule == "cosine" and warmup:
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=stage_cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=total_steps,
        )
    elif stage_cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(stage_cfg.learning_rate, decay_steps=total_steps)
    elif stage_cfg.schedule == "constant":
        lr = optax.constant_schedule(stage_cfg.learning_rate)
    else:
        raise ValueError(f"Unknown schedule {stage_cfg.schedule!r}; use 'cosine' or 'constant'.")
    if stage_cfg.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=stage_cfg.momentum, nesterov=True)
    elif stage_cfg.optimizer == "adam":
        opt = optax.adam(lr)
    else:
        raise ValueError(f"Unknown optimizer {stage_cfg.optimizer!r}; use 'sgd' or 'adam'.")
    # Coupled L2 decay, as PyTorch's `weight_decay` in BlockDrop's reference.
    return optax.chain(optax.add_decayed_weights(stage_cfg.weight_decay), opt)


def create_train_state(
    variables: Mapping[str, Any], spec: StageSpec, tx: optax.GradientTransformation, key
) -> TrainState:
    variables = select_networks(variables, spec.networks)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(trainable(variables["params"], spec)),
        rng=key,
    )


# --------------------------------------------------------------------------------------------
# Losses (per device, inside shard_map).


@flax.struct.dataclass
class Hyper:
    """Per-stage scalars the loss needs (static: they are baked into the compiled step)."""

    theta_s: float = flax.struct.field(pytree_node=False)
    theta_d: float = flax.struct.field(pytree_node=False)
    penalty: float = flax.struct.field(pytree_node=False)
    entropy_weight: float = flax.struct.field(pytree_node=False)
    bound: float = flax.struct.field(pytree_node=False)
    steps_per_epoch: int = flax.struct.field(pytree_node=False)
    curriculum_epochs: int = flax.struct.field(pytree_node=False)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classification_loss(params, batch_stats, batch, key, step, *, models: Models, hp: Hyper):
    """Pretrain: cross-entropy of the full recognizer (all blocks on)."""
    del key, step, hp
    rec = models.recognizer
    policy = jnp.ones((batch["label"].shape[0], rec.num_blocks), jnp.float32)
    logits, updates = rec.apply(
        {"params": params["recognizer"], "batch_stats": batch_stats["recognizer"]},
        batch["image"],
        policy,
        train=True,
        mutable=["batch_stats"],
        **location_kwargs(rec, batch["location"]),
    )
    loss = cross_entropy(logits, batch["label"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_stats = {**batch_stats, "recognizer": updates["batch_stats"]}
    return loss, (new_stats, {"loss": loss, "accuracy": accuracy})


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
    params, batch_stats, batch, key, step, *, models: Models, hp: Hyper, train_recognizer: bool,
    frozen_logits=fast_forward.frozen_logits,
):  # fmt: skip
    """Policy and finetune stages: REINFORCE with a self-critical baseline (Eqns 2, 5, 8).

    With `train_recognizer` (finetune) the recognizer runs in training mode and its
    cross-entropy under the sampled policy is added; otherwise it is frozen, inference-mode,
    and `frozen_logits` computes its greedy and sampled forwards (by default sharing the blocks
    where the two policies agree; `fast_forward.naive_frozen_logits` runs two plain forwards).
    """
    rec, pol = models.recognizer, models.policy
    n = rec.num_blocks
    probs, pol_updates = pol.apply(
        {"params": params["policy"], "batch_stats": batch_stats["policy"]},
        batch["policy_image"],
        batch["location"],
        train=True,
        mutable=["batch_stats"],
    )
    if train_recognizer:
        k = jnp.asarray(n, jnp.int32)
    else:
        epoch = step // hp.steps_per_epoch
        k = pg.curriculum_k(epoch, num_blocks=n, curriculum_epochs=hp.curriculum_epochs)
    mask = pg.curriculum_mask(n, k)
    sampled = pg.apply_curriculum(sample_per_example(key, probs, bound=hp.bound), mask)
    greedy = pg.apply_curriculum(pg.greedy_policy(probs), mask)

    rec_vars = {"params": params["recognizer"], "batch_stats": batch_stats["recognizer"]}
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
    reward = functools.partial(
        pg.reward, theta_s=hp.theta_s, theta_d=hp.theta_d, penalty=hp.penalty
    )
    uniq_s = pg.uniqueness(sampled, axis_name=AXIS)
    uniq_g = pg.uniqueness(greedy, axis_name=AXIS)
    reward_s = reward(correct_s, sampled, uniq_s)
    reward_g = reward(correct_g, greedy, uniq_g)
    advantage = reward_s - reward_g
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
        "reward": jnp.mean(reward_s),
        "advantage": jnp.mean(advantage),
        "blocks": jnp.mean(jnp.sum(greedy, -1)),
        "blocks_sampled": jnp.mean(jnp.sum(sampled, -1)),
        "uniqueness": jnp.mean(uniq_g),
        "curriculum_k": k.astype(jnp.float32),
        **{name: jnp.mean(value) for name, value in aux.items()},
    }
    return loss, (new_stats, scalars)


# --------------------------------------------------------------------------------------------
# The sharded step.


def train_step(state: TrainState, batch, *, spec: StageSpec, loss_fn, tx) -> tuple:
    """One optimizer step on this device's shard; gradients and metrics averaged over 'data'.

    A step whose loss or gradient is not finite changes nothing but the step counter (so the
    state never absorbs a NaN) and reports `nonfinite` = 1; the loop decides what that means.
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
    finite = jnp.isfinite(scalars["loss"]) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    scalars["grad_norm"] = grad_norm
    scalars["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **keep_if_finite(new_params, train_params)},
        batch_stats=keep_if_finite(batch_stats, state.batch_stats),
        opt_state=keep_if_finite(opt_state, state.opt_state),
    )
    return new_state, scalars


def make_train_step(
    spec: StageSpec, models: Models, hp: Hyper, tx, mesh, *,
    frozen_logits=fast_forward.frozen_logits,
) -> Callable:  # fmt: skip
    """`jax.jit(jax.shard_map(train_step))` for a stage: state replicated, batch split.

    `frozen_logits` computes the policy stage's two frozen-recognizer forwards (see
    `policy_loss`); the benchmark passes the naive one to measure what sharing buys.
    """
    if spec.name == "pretrain":
        loss_fn = functools.partial(classification_loss, models=models, hp=hp)
    else:
        loss_fn = functools.partial(
            policy_loss, models=models, hp=hp, train_recognizer="recognizer" in spec.trains,
            frozen_logits=frozen_logits,
        )  # fmt: skip
    step = functools.partial(train_step, spec=spec, loss_fn=loss_fn, tx=tx)
    # check_vma=False: classic data-parallel semantics, per-device gradients pmean-ed explicitly.
    sharded = jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=0)


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


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --------------------------------------------------------------------------------------------
# Checkpoints (m2net_jax.checkpoint holds the Orbax plumbing).


def stage_checkpoint_manager(workdir: str, stage: str, config, num_classes: int, **kwargs):
    return ckpt.manager(
        workdir,
        stage,
        save_interval_steps=config.checkpoint.save_interval_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
        model_signature=model_signature(config, num_classes, STAGE_SPECS[stage]),
        **kwargs,
    )


def abstract_train_state(stage: str, config, models: Models, mesh, *, steps_per_epoch: int):
    """Shapes, dtypes and (replicated) shardings of a stage's TrainState, for restoring."""
    spec = STAGE_SPECS[stage]
    tx = make_optimizer(config.stages[stage], steps_per_epoch=steps_per_epoch)

    def build():
        key = jax.random.PRNGKey(0)
        variables = init_variables(models, key, config.data.image_size)
        return create_train_state(variables, spec, tx, key)

    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        jax.eval_shape(build),
    )


def restore_variables(
    workdir: str, stage: str, config, models: Models, mesh, *, steps_per_epoch: int,
    step: int | None = None,
):  # fmt: skip
    """A stage's {'params', 'batch_stats'} at `step` (default: the newest readable one),
    replicated on `mesh`, for its networks only. Returns (variables, step), or None when the
    stage has no checkpoint."""
    if not os.path.isdir(ckpt.stage_directory(workdir, stage)):
        return None
    abstract = abstract_train_state(stage, config, models, mesh, steps_per_epoch=steps_per_epoch)
    args = lambda _: ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    num_classes = models.recognizer.num_classes
    with stage_checkpoint_manager(workdir, stage, config, num_classes, read_only=True) as mngr:
        if step is not None:
            if step not in mngr.all_steps():
                raise FileNotFoundError(
                    f"No {stage!r} checkpoint at step {step} in {mngr.directory}; "
                    f"there are: {sorted(mngr.all_steps())}."
                )
            restored = (step, mngr.restore(step, args=args(step)))
        else:
            restored = ckpt.restore_latest_readable(mngr, args, stage=stage)
    if restored is None:
        return None
    step, items = restored
    state = items["state"]
    return {"params": state.params, "batch_stats": state.batch_stats}, step


# --------------------------------------------------------------------------------------------
# Faults: preemption and non-finite steps.


class Preempted(Exception):  # noqa: N818  (a condition, not a failure)
    """The job was asked to stop (SIGTERM / preemption notice); its checkpoint is saved."""


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was NaN or infinite and `config.on_nonfinite` is 'stop'."""


class PreemptionWatch:
    """Notices a preemption request: SIGTERM in a single process; JAX's preemption sync point
    (all hosts agree on the step) when there are several, where the distributed runtime itself
    listens for the notice."""

    def __init__(self):
        self._requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: finishing this step, then saving and stopping.")
        self._requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested


# --------------------------------------------------------------------------------------------
# Metrics.


def _collection(names: tuple[str, ...]) -> type[metrics.Collection]:
    return metrics.Collection.create(**{n: metrics.Average.from_output(n) for n in names})


_POLICY_METRICS = (
    "loss",
    "cross_entropy",
    "accuracy",
    "accuracy_sampled",
    "reward",
    "advantage",
    "blocks",
    "blocks_sampled",
    "uniqueness",
    "curriculum_k",
    "entropy",
)


# --------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class StageResult:
    """A finished stage: its variables (replicated on the mesh) and step count."""

    variables: dict[str, Any]
    steps: int


def train_stage(
    stage: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    models: Models,
    init_variables_: Mapping[str, Any],
    mesh,
    writer: metric_writers.MetricWriter,
    on_step: Callable[[int], None] | None = None,
) -> StageResult:
    """Runs (or resumes, or skips if finished) one stage and returns its final variables.

    Args:
      stage: 'pretrain', 'policy' or 'finetune'.
      init_variables_: {'params', 'batch_stats'} holding (at least) the stage's networks, to
        start from when the stage has no checkpoint.
      on_step: called with the step count after every step (and once with the starting step
        before the first); tests use it to interrupt a run at a chosen point.

    Raises:
      Preempted: SIGTERM arrived; a checkpoint of the current step was saved first.
      NonFiniteError: a non-finite step with `config.on_nonfinite='stop'`; the newest
        checkpoint is the last good one.
    """
    spec = STAGE_SPECS[stage]
    stage_cfg = config.stages[stage]
    steps_per_epoch = stage_steps_per_epoch(stage, config, mesh)
    total_steps = stage_cfg.epochs * steps_per_epoch
    tx = make_optimizer(stage_cfg, steps_per_epoch=steps_per_epoch)
    hp = Hyper(
        theta_s=config.reward.theta_s,
        theta_d=config.reward.theta_d,
        penalty=stage_cfg.penalty,
        entropy_weight=stage_cfg.entropy_weight,
        bound=config.sampling.bound,
        steps_per_epoch=steps_per_epoch,
        curriculum_epochs=config.sampling.curriculum_epochs,
    )
    if config.on_nonfinite not in ("stop", "skip"):
        raise ValueError(
            f"config.on_nonfinite must be 'stop' or 'skip', not {config.on_nonfinite!r}."
        )
    train_iter = pipeline.make_train_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        batch_size=stage_cfg.batch_size // jax.process_count(),
        seed=config.seed + STAGES.index(stage),
        worker_count=config.data.worker_count,
        prefetch_buffer_size=config.data.prefetch_buffer_size,
    )
    mngr = stage_checkpoint_manager(workdir, stage, config, models.recognizer.num_classes)
    abstract = abstract_train_state(stage, config, models, mesh, steps_per_epoch=steps_per_epoch)
    restored = ckpt.restore_latest_readable(
        mngr,
        lambda _: ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(train_iter),
        ),
        stage=stage,
    )
    if restored is None:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage))
        state = replicate(create_train_state(init_variables_, spec, tx, key), mesh)
    else:
        logging.info("[%s] Resuming from the checkpoint at step %d.", stage, restored[0])
        state = restored[1]["state"]
    start = int(jax.device_get(state.step))

    if start == 0 and jax.process_index() == 0:
        parameter_overview.log_parameter_overview(trainable(state.params, spec))
    logging.info(
        "[%s] %d epochs x %d steps/epoch = %d steps, global batch %d on %d devices; "
        "starting at step %d.",
        stage, stage_cfg.epochs, steps_per_epoch, total_steps, stage_cfg.batch_size, mesh.size,
        start,
    )  # fmt: skip

    step_fn = make_train_step(spec, models, hp, tx, mesh)
    names = ("loss", "accuracy") if stage == "pretrain" else _POLICY_METRICS
    collection = _collection(names + ("grad_norm", "nonfinite"))
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    running = None
    unchecked = []  # (step, device flag) of steps not yet checked for non-finite values.
    if on_step is not None:
        on_step(start)
    try:
        with PreemptionWatch() as preemption:
            for step in range(start, total_steps):
                batch = shard_batch(next(train_iter), mesh)
                state, scalars = step_fn(state, batch)
                update = collection.single_from_model_output(**scalars)
                running = update if running is None else running.merge(update)
                unchecked.append((step + 1, scalars["nonfinite"]))
                done = step + 1
                report(done)
                preempted = preemption.reached(done)
                is_last = done == total_steps
                if done % config.log.every_steps == 0 or is_last:
                    values = {f"{stage}/{k}": v for k, v in running.compute().items()}
                    values[f"{stage}/epoch"] = done / steps_per_epoch
                    writer.write_scalars(done, values)
                    running = None
                saving = is_last or preempted or mngr.should_save(done)
                if saving or done % config.log.every_steps == 0:
                    _check_finite(unchecked, stage, config.on_nonfinite, mngr)
                    unchecked = []
                if saving:
                    mngr.save(
                        done,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardSave(state),
                            data=grain.checkpoint.CheckpointSave(train_iter),
                        ),
                        force=True,
                    )
                if on_step is not None:
                    on_step(done)
                if preempted:
                    mngr.wait_until_finished()
                    raise Preempted(
                        f"[{stage}] Stopped at step {done} on request (SIGTERM); the checkpoint "
                        f"is saved in {mngr.directory}. Rerun the same command to resume."
                    )
    finally:
        # Also on an exception: a save in flight completes, so no finished work is lost.
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return StageResult(variables=variables, steps=total_steps)


def _check_finite(unchecked, stage: str, policy: str, mngr) -> None:
    """Host check of the steps' non-finite flags (one transfer per check, not per step)."""
    if not unchecked:
        return
    flags = jax.device_get([flag for _, flag in unchecked])
    bad = [step for (step, _), flag in zip(unchecked, flags, strict=True) if flag > 0]
    if not bad:
        return
    if policy == "skip":
        logging.warning("[%s] Skipped %d non-finite step(s): %s.", stage, len(bad), bad[:10])
        return
    raise NonFiniteError(
        f"[{stage}] Non-finite loss or gradient at step {bad[0]} (and {len(bad) - 1} later "
        f"step(s) before the check); stopped. The last good checkpoint is step "
        f"{mngr.latest_step()} in {mngr.directory}. Lower the learning rate, or set "
        "--config.on_nonfinite=skip to skip such steps."
    )


def stage_steps_per_epoch(stage: str, config, mesh) -> int:
    """Optimizer steps per epoch of a stage: the train split over the global batch (floor)."""
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    global_batch = config.stages[stage].batch_size
    check_batch(global_batch, mesh, f"config.stages.{stage}.batch_size")
    steps = info.num_examples["train"] // global_batch
    if steps == 0:
        raise ValueError(
            f"config.stages.{stage}.batch_size={global_batch} exceeds the "
            f"{info.num_examples['train']} training examples of {config.data.dataset}."
        )
    return steps


def check_batch(global_batch: int, mesh, key: str) -> None:
    """A clear error unless the global batch splits evenly over devices and processes."""
    n_dev, n_proc = mesh.size, jax.process_count()
    if global_batch % n_dev or global_batch % n_proc:
        raise ValueError(
            f"{key}={global_batch} must be divisible by the device count ({n_dev}) and the "
            f"process count ({n_proc}); set it to a multiple of {n_dev}."
        )


def prepare_dataset(config: ml_collections.ConfigDict) -> pipeline.DatasetSpec:
    """Makes sure the config's dataset is built (geo_twins builds itself) on every process.

    Process 0 builds first; the others then find it on a shared disk, or build their own
    identical copy (geo_twins is deterministic) on a local one.
    """
    build = functools.partial(
        pipeline.ensure_built,
        config.data.dataset,
        data_dir=config.data.data_dir,
        build_if_missing=config.data.build_if_missing,
    )
    if jax.process_count() == 1:
        return build()
    if jax.process_index() == 0:
        build()
    multihost_utils.sync_global_devices("m2net_jax dataset ready on process 0")
    return build()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Runs the configured stages in order, evaluates each on the test split, writes
    `workdir/results.json` and returns the results.

    Each stage resumes from its own latest checkpoint, or starts from the previous stage's final
    variables (a policy network it lacks is freshly initialised). `on_step(stage, step)` is
    called as in `train_stage`.
    """
    from m2net_jax import evaluate  # evaluate imports train; import here to keep one direction.

    stages = parse_stages(config.stages.run)
    info = prepare_dataset(config)
    mesh = make_mesh()
    models = create_models(config, info.num_classes)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    hparams = _flatten(config.to_dict())
    writer.write_hparams({k: str(v) if v is None else v for k, v in hparams.items()})

    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), len(STAGES))
    fresh = replicate(init_variables(models, init_key, config.data.image_size), mesh)
    variables = _starting_variables(stages[0], config, workdir, models, mesh, fresh)
    results = {}
    try:
        for stage in stages:
            t0 = time.time()
            result = train_stage(
                stage, config, workdir, models=models,
                init_variables_=complete_variables(variables, fresh), mesh=mesh, writer=writer,
                on_step=None if on_step is None else functools.partial(on_step, stage),
            )  # fmt: skip
            variables = result.variables
            logging.info("[%s] Trained in %.1f s; evaluating.", stage, time.time() - t0)
            results[stage] = evaluate.evaluate_variables(
                variables, config, models=models, mesh=mesh, stage=stage
            )
            writer.write_scalars(
                result.steps, {f"{stage}/test_{k}": v for k, v in results[stage].items()}
            )
            evaluate.write_results(workdir, {stage: results[stage]})
    finally:
        writer.close()
    logging.info("Results:\n%s", evaluate.format_table(evaluate.read_results(workdir)))
    return results


def _starting_variables(first_stage: str, config, workdir, models: Models, mesh, fresh):
    """Variables the first selected stage starts from (unless it resumes its own checkpoint)."""
    index = STAGES.index(first_stage)
    if index == 0 or os.path.isdir(ckpt.stage_directory(workdir, first_stage)):
        # Fresh pretraining; or a resumed stage, whose checkpoint replaces these on restore.
        return fresh
    previous = STAGES[index - 1]
    restored = restore_variables(
        workdir, previous, config, models, mesh,
        steps_per_epoch=stage_steps_per_epoch(previous, config, mesh),
    )  # fmt: skip
    if restored is None:
        raise FileNotFoundError(
            f"Stage {first_stage!r} starts from stage {previous!r}, but {workdir} has no "
            f"{previous!r} checkpoint. Run it first: --config.stages.run={previous},{first_stage}"
        )
    return restored[0]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
