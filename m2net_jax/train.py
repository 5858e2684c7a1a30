"""Training M²Net: BlockDrop's three stages, one loop, with preemption and exact resume.

1. *pretrain* — the recognizer alone, all blocks on, cross-entropy.
2. *policy* — the recognizer frozen (inference-mode batch norm); the policy network trained with
   REINFORCE (Eqns 5, 6, 8) under a curriculum that decides only the last k blocks.
3. *finetune* — policy and recognizer jointly: policy-gradient loss + cross-entropy of the
   recognizer under the sampled policy.

A stage is data (`state.StageSpec`); one loop, `train_stage`, runs any of them with the step of
`steps.make_train_step`. A stage's checkpoint holds its train state and its data iterator, so a
resumed or preempted job continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics, parameter_overview
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m2net_jax import checkpoint, evaluate, results, stage_config, steps, validation, writers
from m2net_jax import state as state_lib
from m2net_jax.data import pipeline
from m2net_jax.state import STAGE_SPECS, STAGES, Networks

# --------------------------------------------------------------------------------------------
# Faults: preemption and non-finite steps.


class Preempted(Exception):  # noqa: N818  (a condition, not a failure)
    """The job was asked to stop (SIGTERM / preemption notice); its checkpoint is saved."""

    @classmethod
    def at(cls, stage: str, step: int, directory) -> Preempted:
        return cls(
            f"[{stage}] Stopped at step {step} on request (SIGTERM); the checkpoint is saved in "
            f"{directory}. Rerun the same command to resume."
        )


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


# --------------------------------------------------------------------------------------------
# Metrics and progress.

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


def _collection(stage: str, networks: Networks) -> type[metrics.Collection]:
    names = ("loss", "cross_entropy", "accuracy") if stage == "pretrain" else _POLICY_METRICS
    if stage == "pretrain" and networks.image_classifier is not None:
        names += ("image_classifier_accuracy",)
    names += ("grad_norm", "nonfinite")
    return metrics.Collection.create(**{n: metrics.Average.from_output(n) for n in names})


class Progress:
    """One console line per logged step: stage, step/total, loss, accuracy, images/s, ETA."""

    def __init__(self, stage: str, *, start: int, total: int, global_batch: int):
        self.stage, self.total, self.global_batch = stage, total, global_batch
        self._step, self._time = start, time.monotonic()

    def restart(self, step: int) -> None:
        """Counts rates from `step` on (e.g. after the first step, which includes compiling)."""
        self._step, self._time = step, time.monotonic()

    def report(self, step: int, metrics: Mapping[str, Any], steps_per_epoch: int):
        """Logs the line for `step`; returns the metrics with the rates and epoch beside them."""
        values = {k: float(v) for k, v in metrics.items()}
        return {**values, **self(step, values), "epoch": step / steps_per_epoch}

    def __call__(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        """Logs the line for `step`; returns the rate scalars to write beside the metrics."""
        now = time.monotonic()
        steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
        if step == self._step:  # Only the compiled first step so far: no rate yet.
            steps_per_sec = 0.0
        self._step, self._time = step, now
        eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        images_per_sec = steps_per_sec * self.global_batch
        logging.info(
            "[%s] step %d/%d  loss %.4f  accuracy %.3f  %.1f images/s  ETA %s",
            self.stage,
            step,
            self.total,
            values["loss"],
            values["accuracy"],
            images_per_sec,
            _duration(eta),
        )
        return {"steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec}


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# --------------------------------------------------------------------------------------------
# One stage.


@dataclasses.dataclass
class StageResult:
    """A finished stage: its variables (replicated on the mesh) and step count."""

    variables: dict[str, Any]
    steps: int


def stage_steps_per_epoch(stage: str, config, mesh, num_train_examples: int) -> int:
    """Optimizer steps per epoch of a stage: the train split over the global batch (floor)."""
    global_batch = config.stages[stage].batch_size
    steps.check_batch(global_batch, mesh, f"config.stages.{stage}.batch_size")
    steps_per_epoch = num_train_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.stages.{stage}.batch_size={global_batch} exceeds the "
            f"{num_train_examples} training examples of {config.data.dataset}."
        )
    return steps_per_epoch


def _train_iterator(stage: str, config):
    """This process's share of the stage's training batches (a checkpointable grain iterator)."""
    return pipeline.make_train_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
        batch_size=config.stages[stage].batch_size // jax.process_count(),
        seed=config.seed + STAGES.index(stage),
        worker_count=config.data.worker_count,
        prefetch_buffer_size=config.data.prefetch_buffer_size,
        cache_in_memory_mb=config.data.cache_in_memory_mb,
    )


def _restore_or_start(
    stage, config, workdir, mngr, train_iter, *, networks, mesh, tx, start_variables
) -> state_lib.TrainState:
    """The stage's newest readable checkpoint (restoring the iterator too), else step 0."""
    spec = STAGE_SPECS[stage]
    abstract = state_lib.abstract_train_state(stage, config, networks, NamedSharding(mesh, P()))
    restored = checkpoint.restore_latest_readable(
        mngr,
        lambda _: ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(train_iter),
        ),
        stage=stage,
        set_aside=True,  # So that the steps of an unreadable checkpoint can be saved again.
    )
    hyperparameters = stage_config.hyperparameters(config, stage)
    if restored is not None:
        stage_config.check(workdir, stage, hyperparameters)
        logging.info("[%s] Resuming from the checkpoint at step %d.", stage, restored[0])
        return restored[1]["state"]
    stage_config.record(workdir, stage, hyperparameters)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage))
    state = state_lib.create_train_state(start_variables, spec, tx, key)
    if jax.process_index() == 0 and logging.level_debug():
        overview = parameter_overview.get_parameter_overview(
            state_lib.trainable(state.params, spec)
        )
        logging.debug("[%s] Trained parameters:\n%s", stage, overview)
    return steps.replicate(state, mesh)


def _log_start(stage: str, stage_cfg, steps_per_epoch: int, mesh, start: int) -> None:
    logging.info(
        "[%s] %d epochs x %d steps/epoch = %d steps, global batch %d on %d devices; "
        "starting at step %d.",
        stage,
        stage_cfg.epochs,
        steps_per_epoch,
        stage_cfg.epochs * steps_per_epoch,
        stage_cfg.batch_size,
        mesh.size,
        start,
    )


def _finish_saves(mngr) -> None:
    """Waits for an asynchronous save; its write error (a full disk) surfaces here."""
    with checkpoint.disk_errors_as_os_errors(mngr.directory):
        mngr.wait_until_finished()


def _save(mngr, step: int, state, train_iter) -> None:
    """Saves the state and the data iterator together (asynchronously), with their checksums."""
    with checkpoint.disk_errors_as_os_errors(mngr.directory):
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(train_iter),
            ),
            custom_metadata=checkpoint.save_metadata(state),
            force=True,
        )


def train_stage(
    stage: str,
    config,
    workdir: str,
    *,
    networks: Networks,
    start_variables: Mapping[str, Any],
    mesh,
    num_train_examples: int,
    writer=None,
    on_step: Callable[[int], None] | None = None,
) -> StageResult:
    """Runs (or resumes, or skips if finished) one stage and returns its final variables.

    Args:
      stage: 'pretrain', 'policy' or 'finetune'.
      start_variables: {'params', 'batch_stats'} holding (at least) the stage's networks, to
        start from when the stage has no checkpoint.
      num_train_examples: size of the train split (sets the steps per epoch).
      writer: where metrics go (a `writers` writer; default: nowhere).
      on_step: called with the step count after every step (and once with the starting step
        before the first); tests use it to interrupt a run at a chosen point.

    Raises:
      Preempted: SIGTERM arrived; a checkpoint of the current step was saved first.
      NonFiniteError: a non-finite step with `config.on_nonfinite='stop'`; the newest
        checkpoint is the last good one.
    """
    stage_cfg = config.stages[stage]
    writer = writers.NullWriter() if writer is None else writer
    on_step = on_step or (lambda step: None)
    steps_per_epoch = stage_steps_per_epoch(stage, config, mesh, num_train_examples)
    total_steps = stage_cfg.epochs * steps_per_epoch
    tx = state_lib.make_optimizer(stage_cfg, steps_per_epoch=steps_per_epoch)
    train_iter = _train_iterator(stage, config)
    mngr = checkpoint.stage_manager(workdir, stage, config, networks.recognizer.num_classes)
    state = _restore_or_start(
        stage,
        config,
        workdir,
        mngr,
        train_iter,
        networks=networks,
        mesh=mesh,
        tx=tx,
        start_variables=start_variables,
    )
    start = int(jax.device_get(state.step))
    _log_start(stage, stage_cfg, steps_per_epoch, mesh, start)

    hp = steps.loss_hyperparams(config, stage, steps_per_epoch=steps_per_epoch)
    step_fn = steps.make_train_step(STAGE_SPECS[stage], networks, hp, tx, mesh)
    collection = _collection(stage, networks)
    progress = Progress(stage, start=start, total=total_steps, global_batch=stage_cfg.batch_size)
    running, unchecked = None, []  # metrics since the last log; steps not checked for NaN yet
    on_step(start)
    try:
        with PreemptionWatch() as preemption:
            for step in range(start, total_steps):
                batch = steps.shard_batch(next(train_iter), mesh)
                state, scalars = step_fn(state, batch)
                if step == start:  # Rates and ETA count from the compiled first step on.
                    jax.block_until_ready(state.step)
                    progress.restart(step + 1)
                update = collection.single_from_model_output(**scalars)
                running = update if running is None else running.merge(update)
                unchecked.append((step + 1, scalars["nonfinite"]))
                done = step + 1
                preempted = preemption.reached(done)
                is_last = done == total_steps
                if done % config.log.every_steps == 0 or is_last:
                    values = progress.report(done, running.compute(), steps_per_epoch)
                    writer.write_scalars(done, {f"{stage}/{k}": v for k, v in values.items()})
                    running = None
                saving = is_last or preempted or mngr.should_save(done)
                if saving or done % config.log.every_steps == 0:
                    _check_finite(unchecked, stage, config.on_nonfinite, mngr)
                    unchecked = []
                if saving:
                    _save(mngr, done, state, train_iter)
                on_step(done)
                if preempted:
                    _finish_saves(mngr)
                    raise Preempted.at(stage, done, mngr.directory)
    finally:
        # Also on an exception: a save in flight completes, so no finished work is lost.
        _finish_saves(mngr)
        mngr.close()
        writer.flush()
    return StageResult(variables=state.variables, steps=total_steps)


# --------------------------------------------------------------------------------------------
# The whole job.


def prepare_dataset(config) -> pipeline.DatasetSpec:
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
    config,
    workdir: str,
    *,
    writer=None,
    on_step: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Runs the configured stages in order, evaluates each on the test split, writes
    `workdir/results.json` and returns the results.

    Each stage resumes from its own newest checkpoint, or starts from the previous stage's final
    variables (a policy network it lacks is freshly initialised).

    Args:
      writer: where metrics go; default: TensorBoard events in `workdir` from process 0
        (`writers.create_writer`).
      on_step: `on_step(stage, step)` is called as in `train_stage`.
    """
    stages = state_lib.parse_stages(config.stages.run)
    steps.configure_compilation_cache(config.compilation_cache_dir)
    info = prepare_dataset(config)
    validation.check_config(
        config,
        dataset_image_size=info.image_size,
        num_train_examples=info.num_examples["train"],
        device_count=jax.device_count(),
        process_count=jax.process_count(),
    )
    mesh = steps.make_mesh()
    networks = state_lib.create_networks(config, info.num_classes)
    if writer is None:
        writer = writers.create_writer(workdir, write=jax.process_index() == 0)
    writer.write_hparams(
        {k: str(v) if v is None else v for k, v in stage_config.flatten(config).items()}
    )

    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), len(STAGES))
    fresh = state_lib.init_variables(networks, init_key, config.data.image_size)
    fresh = steps.replicate(fresh, mesh)
    variables = _starting_variables(stages[0], config, workdir, mesh, fresh)
    evaluated = {}
    try:
        for stage in stages:
            t0 = time.time()
            result = train_stage(
                stage,
                config,
                workdir,
                networks=networks,
                start_variables=state_lib.complete_variables(variables, fresh),
                mesh=mesh,
                num_train_examples=info.num_examples["train"],
                writer=writer,
                on_step=None if on_step is None else functools.partial(on_step, stage),
            )
            variables = result.variables
            logging.info("[%s] Trained in %.1f s; evaluating.", stage, time.time() - t0)
            evaluated[stage] = evaluate.evaluate_variables(
                variables, config, networks=networks, mesh=mesh, stage=stage, step=result.steps
            )
            writer.write_scalars(
                result.steps, {f"{stage}/test_{k}": v for k, v in evaluated[stage].items()}
            )
            results.write_results(workdir, {stage: evaluated[stage]})
    finally:
        writer.close()
    return evaluated


def _starting_variables(first_stage: str, config, workdir: str, mesh, fresh):
    """Variables the first selected stage starts from, unless it resumes its own checkpoint.

    Whether a stage resumes is only known when its restore is tried (a folder with no step, or
    with only damaged ones, resumes nothing), so a later stage is always handed the previous
    stage's newest readable variables: `train_stage` starts from them whenever it cannot
    resume, and never from random ones. Only when the previous stage has none does a stage that
    has readable variables of its own start from those (its full state normally replaces them).
    """
    index = STAGES.index(first_stage)
    if index == 0:
        return fresh
    previous = STAGES[index - 1]
    try:
        restored = checkpoint.restore_variables(workdir, previous, config, mesh=mesh)
    except checkpoint.NoReadableCheckpointError as error:
        logging.error("%s", error)
        restored = None
    if restored is None and checkpoint.recorded_signature(workdir, first_stage) is not None:
        logging.warning(
            "[%s] %s has no readable %r checkpoint; the stage resumes its own.",
            first_stage,
            workdir,
            previous,
        )
        restored = checkpoint.restore_variables(workdir, first_stage, config, mesh=mesh)
    if restored is None:
        raise checkpoint.MissingCheckpointError(
            f"Stage {first_stage!r} starts from stage {previous!r}, but {workdir} has no readable "
            f"{previous!r} checkpoint. Run it first: --config.stages.run={previous},{first_stage}"
        )
    return restored.variables
