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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
    trains: tuple[str, ...]  # Which networks ('recognizer', 'policy') the optimizer updates.
    uses_policy: bool  # Whether blocks are chosen by the policy network (else all run).


STAGE_SPECS = {
    "pretrain": StageSpec("pretrain", trains=("recognizer",), uses_policy=False),
    "policy": StageSpec("policy", trains=("policy",), uses_policy=True),
    "finetune": StageSpec("finetune", trains=("recognizer", "policy"), uses_policy=True),
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
    """Initial {'params', 'batch_stats'}, each {'recognizer': ..., 'policy': ...}.

    Initialisation runs outside shard_map, so it uses copies of the modules without a BN axis.
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
    v_rec = rec.init(k_rec, images, jnp.ones((1, rec.num_blocks)), train=False)
    v_pol = pol.init(k_pol, policy_images, locations, train=False)
    return {
        "params": {"recognizer": v_rec["params"], "policy": v_pol["params"]},
        "batch_stats": {"recognizer": v_rec["batch_stats"], "policy": v_pol["batch_stats"]},
    }


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
    if stage_cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else stage_cfg.learning_rate,
            peak_value=stage_cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=total_steps,
        )
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
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=dict(variables["params"]),
        batch_stats=dict(variables["batch_stats"]),
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
    params, batch_stats, batch, key, step, *, models: Models, hp: Hyper, train_recognizer: bool
):
    """Policy and finetune stages: REINFORCE with a self-critical baseline (Eqns 2, 5, 8).

    With `train_recognizer` (finetune) the recognizer runs in training mode and its
    cross-entropy under the sampled policy is added; otherwise it is frozen, inference-mode.
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
    if train_recognizer:
        # BlockDrop's finetune runs both forwards in training mode; only the sampled one trains.
        logits_s, rec_updates = rec.apply(
            rec_vars, batch["image"], sampled, train=True, mutable=["batch_stats"]
        )
        logits_g, _ = rec.apply(
            rec_vars, batch["image"], greedy, train=True, mutable=["batch_stats"]
        )
        logits_g = lax.stop_gradient(logits_g)
        new_rec_stats = rec_updates["batch_stats"]
    else:
        logits_s = rec.apply(rec_vars, batch["image"], sampled, train=False)
        logits_g = rec.apply(rec_vars, batch["image"], greedy, train=False)
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
    """One optimizer step on this device's shard; gradients and metrics averaged over 'data'."""
    key = jax.random.fold_in(state.rng, state.step)

    def loss_of_trainable(train_params):
        params = {**state.params, **train_params}
        return loss_fn(params, state.batch_stats, batch, key, state.step)

    grads, (batch_stats, scalars) = jax.grad(loss_of_trainable, has_aux=True)(
        trainable(state.params, spec)
    )
    grads = lax.pmean(grads, AXIS)
    scalars = lax.pmean(scalars, AXIS)
    train_params = trainable(state.params, spec)
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    train_params = optax.apply_updates(train_params, updates)
    scalars["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
        step=state.step + 1,
        params={**state.params, **train_params},
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    return new_state, scalars


def make_train_step(spec: StageSpec, models: Models, hp: Hyper, tx, mesh) -> Callable:
    """`jax.jit(jax.shard_map(train_step))` for a stage: state replicated, batch split."""
    if spec.name == "pretrain":
        loss_fn = functools.partial(classification_loss, models=models, hp=hp)
    else:
        loss_fn = functools.partial(
            policy_loss, models=models, hp=hp, train_recognizer="recognizer" in spec.trains
        )
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
    """Host-local numpy batch (this process's share) -> global arrays split over 'data'."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in batch.items()
    }


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --------------------------------------------------------------------------------------------
# Checkpoints: one Orbax manager per stage, holding the train state and the data iterator.


def checkpoint_manager(workdir: str, stage: str, config, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.save_interval_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        enable_async_checkpointing=config.checkpoint.async_save,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints", stage),
        item_names=("state", "data"),
        options=options,
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
    """A stage's {'params', 'batch_stats'} at `step` (default: latest), replicated on `mesh`.

    Returns (variables, step), or None when the stage has no checkpoint.
    """
    path = os.path.join(os.path.abspath(workdir), "checkpoints", stage)
    if not os.path.isdir(path):
        return None
    with checkpoint_manager(workdir, stage, config, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        abstract = abstract_train_state(
            stage, config, models, mesh, steps_per_epoch=steps_per_epoch
        )
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
    state = restored["state"]
    return {"params": state.params, "batch_stats": state.batch_stats}, step


# --------------------------------------------------------------------------------------------
# Metrics.


def _collection(names: tuple[str, ...]) -> type[metrics.Collection]:
    return metrics.Collection.create(**{n: metrics.Average.from_output(n) for n in names})


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
      init_variables_: {'params', 'batch_stats'} to start from when the stage has no checkpoint.
      on_step: called with the step number after each step (tests use it to interrupt).
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
    train_iter = pipeline.make_train_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        batch_size=stage_cfg.batch_size // jax.process_count(),
        seed=config.seed + STAGES.index(stage),
        worker_count=config.data.worker_count,
    )
    mngr = checkpoint_manager(workdir, stage, config)
    latest = mngr.latest_step()
    if latest is None:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage))
        state = replicate(create_train_state(init_variables_, spec, tx, key), mesh)
    else:
        logging.info("[%s] Resuming from checkpoint at step %d.", stage, latest)
        abstract = abstract_train_state(
            stage, config, models, mesh, steps_per_epoch=steps_per_epoch
        )
        restored = mngr.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(train_iter),
            ),
        )
        state = restored["state"]
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
    collection = _collection(names + ("grad_norm",))
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    running = None
    try:
        for step in range(start, total_steps):
            batch = shard_batch(next(train_iter), mesh)
            state, scalars = step_fn(state, batch)
            update = collection.single_from_model_output(**scalars)
            running = update if running is None else running.merge(update)
            done = step + 1
            report(done)
            if done % config.log.every_steps == 0 or done == total_steps:
                values = {f"{stage}/{k}": v for k, v in running.compute().items()}
                values[f"{stage}/epoch"] = done / steps_per_epoch
                writer.write_scalars(done, values)
                running = None
            mngr.save(
                done,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(train_iter),
                ),
                force=done == total_steps,
            )
            if on_step is not None:
                on_step(done)
    finally:
        # Also on an exception: a save in flight completes, so no finished work is lost.
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return StageResult(variables=variables, steps=total_steps)


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


def stage_steps_per_epoch(stage: str, config, mesh) -> int:
    """Optimizer steps per epoch of a stage: the train split over the global batch (floor)."""
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    global_batch = config.stages[stage].batch_size
    _check_batch(global_batch, mesh, f"config.stages.{stage}.batch_size")
    steps = info.num_examples["train"] // global_batch
    if steps == 0:
        raise ValueError(
            f"config.stages.{stage}.batch_size={global_batch} exceeds the "
            f"{info.num_examples['train']} training examples of {config.data.dataset}."
        )
    return steps


def _check_batch(global_batch: int, mesh, key: str) -> None:
    n_dev, n_proc = mesh.size, jax.process_count()
    if global_batch % n_dev or global_batch % n_proc:
        raise ValueError(
            f"{key}={global_batch} must be divisible by the device count ({n_dev}) and the "
            f"process count ({n_proc}); set it to a multiple of {n_dev}."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the configured stages in order (each resuming or starting from the previous one),
    evaluates each on the test split, writes `workdir/results.json` and returns the results."""
    from m2net_jax import evaluate  # evaluate imports train; import here to keep one direction.

    stages = parse_stages(config.stages.run)
    pipeline.ensure_built(
        config.data.dataset,
        data_dir=config.data.data_dir,
        build_if_missing=config.data.build_if_missing,
    )
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    mesh = make_mesh()
    models = create_models(config, info.num_classes)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    writer.write_hparams(
        {k: str(v) if v is None else v for k, v in _flatten(config.to_dict()).items()}
    )

    variables = _starting_variables(stages[0], config, workdir, models, mesh)
    results = {}
    for stage in stages:
        t0 = time.time()
        result = train_stage(
            stage, config, workdir, models=models, init_variables_=variables, mesh=mesh,
            writer=writer,
        )  # fmt: skip
        variables = result.variables
        logging.info("[%s] trained in %.1f s; evaluating.", stage, time.time() - t0)
        results[stage] = evaluate.evaluate_variables(
            variables, config, models=models, mesh=mesh, stage=stage
        )
        writer.write_scalars(
            result.steps, {f"{stage}/test_{k}": v for k, v in results[stage].items()}
        )
        evaluate.write_results(workdir, {stage: results[stage]})
    writer.close()
    logging.info("Results:\n%s", evaluate.format_table(evaluate.read_results(workdir)))
    return results


def _starting_variables(first_stage: str, config, workdir: str, models: Models, mesh):
    """Variables the first selected stage starts from (unless it resumes its own checkpoint)."""
    index = STAGES.index(first_stage)
    own = os.path.join(os.path.abspath(workdir), "checkpoints", first_stage)
    if index == 0 or os.path.isdir(own):
        # Fresh pretraining; or a resumed stage, whose checkpoint replaces these on restore.
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), len(STAGES))
        return replicate(init_variables(models, key, config.data.image_size), mesh)
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
