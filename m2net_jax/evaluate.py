"""Evaluation of M²Net: accuracy, block usage, policy diversity and FLOPs (paper §4, Eqn 7).

Evaluation uses the greedy ("maximally probable", Eqn 8) policy. Every test example is counted
exactly once (the eval iterator pads the last batch and marks padding in `mask`). Evaluation is
handed a predict function (by default `steps.make_predict_step`) and the variables to evaluate;
it knows nothing of how they were trained. Results go to `workdir/results.json` (`results`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from m2net_jax import checkpoint, mechanism, results, steps
from m2net_jax import flops as flops_lib
from m2net_jax import policy_gradient as pg
from m2net_jax.data import pipeline
from m2net_jax.state import STAGE_SPECS, Networks, parse_stages


def gather_predictions(
    predict_fn: Callable, variables: Mapping[str, Any], batches: Iterable, mesh
) -> dict[str, np.ndarray]:
    """Runs `predict_fn(variables, batch)` over host batches; the outputs of every real example.

    Returns (E,)-leading numpy arrays for the E examples of the split (padding dropped, every
    process's rows gathered): the predict function's outputs plus `label`.
    """
    gathered: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        out = dict(predict_fn(variables, steps.shard_batch(batch, mesh)))
        # Padding rows are dropped by the global mask, gathered like the outputs.
        out = multihost_utils.process_allgather(out, tiled=True)
        host = multihost_utils.process_allgather(
            {"mask": batch["mask"], "label": batch["label"]}, tiled=True
        )
        mask = np.asarray(host["mask"])
        out["label"] = host["label"]
        for name, value in out.items():
            gathered.setdefault(name, []).append(np.asarray(value)[mask])
    return {name: np.concatenate(parts) for name, parts in gathered.items()}


def evaluate_variables(
    variables: Mapping[str, Any],
    config,
    *,
    networks: Networks,
    mesh,
    stage: str,
    step: int | None = None,
    predict_fn: Callable | None = None,
) -> dict[str, float]:
    """Evaluates `variables` on the config's eval split with the stage's policy.

    Args:
      variables: {'params', 'batch_stats'} of (at least) the stage's networks.
      step: the stage's step the variables are from. A policy-stage step whose curriculum k was
        below N is evaluated as trained: the blocks before the last k run (`decided_blocks`).
        None: the policy decides every block.
      predict_fn: (variables, batch) -> {'correct', 'policy', ...}; default: the jitted
        `steps.predict_step` of `networks` on `mesh` (then `step` is not read).

    Returns:
      A dict with `results.RESULT_KEYS` (plus FLOPs split into recognizer and policy network,
      and, on a dataset of twin landmarks, `mechanism.METRIC_KEYS`).
    """
    use_policy = STAGE_SPECS[stage].uses_policy
    global_batch = config.eval.batch_size
    steps.check_batch(global_batch, mesh, "config.eval.batch_size")
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    if predict_fn is None:
        decided = None
        if step is not None:
            n, train_size = networks.recognizer.num_blocks, info.num_examples["train"]
            decided = decided_blocks(
                config, stage, step, num_blocks=n, num_train_examples=train_size
            )
        predict_fn = steps.make_predict_step(
            networks, mesh, use_policy=use_policy, decided_blocks=decided
        )
    batches = pipeline.make_eval_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        split=config.eval.split,
        image_size=config.data.image_size,
        batch_size=global_batch // jax.process_count(),
        cache_in_memory_mb=config.data.cache_in_memory_mb,
    )
    outputs = gather_predictions(predict_fn, variables, batches, mesh)
    policies = outputs["policy"].astype(np.float32)
    metrics = summarize(
        outputs["correct"],
        policies,
        image_size=config.data.image_size,
        networks=networks,
        use_policy=use_policy,
    )
    if "prediction" in outputs:  # Twin landmarks (geo_twins): does the path tell them apart?
        metrics.update(
            mechanism.mechanism_metrics(
                outputs["prediction"], outputs["label"], policies, info.class_names
            )
        )
    return metrics


def decided_blocks(
    config, stage: str, step: int, *, num_blocks: int, num_train_examples: int
) -> int | None:
    """The curriculum's k at the last of `step` steps of `stage`, where it is below N.

    Only the policy stage has a curriculum (pretrain runs every block, finetune lets the policy
    decide all N): there, the blocks before the last k were forced on during training, and the
    evaluation of that step forces them on too. None when the policy decides every block.
    """
    if stage != "policy":
        return None
    steps_per_epoch = num_train_examples // config.stages.policy.batch_size
    steps_per_k = pg.curriculum_steps(config.sampling.curriculum_epochs, steps_per_epoch)
    k = int(pg.curriculum_k(max(step - 1, 0), num_blocks=num_blocks, steps_per_k=steps_per_k))
    return k if k < num_blocks else None


def summarize(correct, policies, *, image_size: int, networks: Networks, use_policy: bool):
    """Metrics of a whole evaluation from per-example correctness (E,) and policies (E, N)."""
    rec = networks.recognizer
    n = rec.num_blocks
    blocks = policies.sum(-1)
    rec_flops = rec.flops(image_size)
    per_image = flops_lib.flops_per_image(policies, rec_flops)
    policy_flops = 0.0
    if use_policy:
        policy_flops = float(
            flops_lib.policy_network_flops(
                num_blocks=n,
                image_size=image_size // 2,
                use_geo=networks.policy.use_geo,
                width=networks.policy.width,
                stem=networks.policy.stem,
            )
        )
    total = per_image + policy_flops
    return {
        "accuracy": float(correct.mean()),
        "pr": float(blocks.mean() / n),
        "blocks_mean": float(blocks.mean()),
        "blocks_std": float(blocks.std()),
        "diversity": int(pg.policy_diversity(policies)),
        "flops_mean": float(total.mean()),
        "flops_std": float(total.std()),
        "recognizer_flops_mean": float(per_image.mean()),
        "policy_flops": policy_flops,
        "full_flops": float(rec_flops.full),
        "num_examples": int(correct.shape[0]),
    }


def evaluate_workdir(config, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval`: evaluates each selected stage's checkpoint in `workdir`.

    Uses `config.eval.step` (-1: the latest checkpoint of each stage). Stages without a
    checkpoint are skipped with a log line; if none has one, that is an error.
    """
    mesh = steps.make_mesh()
    evaluated = {}
    for stage in parse_stages(config.stages.run):
        step = None if config.eval.step < 0 else config.eval.step
        restored = checkpoint.restore_variables(workdir, stage, config, mesh=mesh, step=step)
        if restored is None:
            logging.info("No %r checkpoint in %s; skipping it.", stage, workdir)
            continue
        logging.info("[%s] Evaluating the checkpoint at step %d.", stage, restored.step)
        evaluated[stage] = evaluate_variables(
            restored.variables,
            config,
            networks=restored.networks,
            mesh=mesh,
            stage=stage,
            step=restored.step,
        )
        evaluated[stage]["step"] = restored.step
    if not evaluated:
        raise FileNotFoundError(
            f"No checkpoints to evaluate in {checkpoint.checkpoints_directory(workdir)}; train "
            "first with --config.mode=train."
        )
    results.write_results(workdir, evaluated)
    return evaluated
