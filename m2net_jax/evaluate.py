"""Evaluation of M²Net: accuracy, block usage, policy diversity and FLOPs (DESIGN.md "Metrics").

Evaluation uses the greedy ("maximally probable", Eqn 8) policy. Every test example is counted
exactly once (the eval iterator pads the last batch and marks padding in `mask`). Results go to
`workdir/results.json`, one object per stage:
`{"pretrain": {...}, "policy": {...}, "finetune": {...}}`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from m2net_jax import flops as flops_lib
from m2net_jax import policy_gradient as pg
from m2net_jax import train
from m2net_jax.data import pipeline

RESULT_KEYS = (
    "accuracy",
    "pr",
    "blocks_mean",
    "blocks_std",
    "diversity",
    "flops_mean",
    "flops_std",
    "full_flops",
    "num_examples",
)


def predict_step(variables, batch, *, models: train.Models, use_policy: bool):
    """Per device: greedy policies (B, N) and whether each prediction is right (B,)."""
    rec = models.recognizer
    b = batch["label"].shape[0]
    if use_policy:
        probs = models.policy.apply(
            {
                "params": variables["params"]["policy"],
                "batch_stats": variables["batch_stats"]["policy"],
            },
            batch["policy_image"],
            batch["location"],
            train=False,
        )
        policy = pg.greedy_policy(probs)
    else:
        policy = jnp.ones((b, rec.num_blocks), jnp.float32)
    logits = rec.apply(
        {
            "params": variables["params"]["recognizer"],
            "batch_stats": variables["batch_stats"]["recognizer"],
        },
        batch["image"],
        policy,
        train=False,
        **train.location_kwargs(rec, batch["location"]),
    )
    return {"correct": jnp.argmax(logits, -1) == batch["label"], "policy": policy > 0.5}


@functools.lru_cache(maxsize=16)
def make_predict_step(models: train.Models, mesh, *, use_policy: bool):
    """The jitted, data-parallel `predict_step` over `mesh`.

    Cached: equal models on one mesh (every stage's evaluation, systems that differ only in
    their reward) share one compiled program.
    """
    step = functools.partial(predict_step, models=models, use_policy=use_policy)
    return jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(train.AXIS)), out_specs=P(train.AXIS),
            check_vma=False,
        )
    )  # fmt: skip


def evaluate_variables(
    variables: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    *,
    models: train.Models,
    mesh,
    stage: str,
) -> dict[str, float]:
    """Evaluates `variables` on the config's eval split with the stage's policy.

    Returns a dict with RESULT_KEYS (plus FLOPs split into recognizer and policy network).
    """
    use_policy = train.STAGE_SPECS[stage].uses_policy
    global_batch = config.eval.batch_size
    train.check_batch(global_batch, mesh, "config.eval.batch_size")
    step = make_predict_step(models, mesh, use_policy=use_policy)
    it = pipeline.make_eval_iterator(
        config.data.dataset,
        data_dir=config.data.data_dir,
        split=config.eval.split,
        image_size=config.data.image_size,
        batch_size=global_batch // jax.process_count(),
    )
    correct, policies = [], []
    for batch in it:
        out = step(variables, train.shard_batch(batch, mesh))
        # Padding rows are dropped by the global mask, gathered like the outputs.
        mask = batch["mask"]
        out = multihost_utils.process_allgather(out, tiled=True)
        mask = multihost_utils.process_allgather(mask, tiled=True)
        correct.append(np.asarray(out["correct"])[mask])
        policies.append(np.asarray(out["policy"])[mask])
    correct = np.concatenate(correct)
    policies = np.concatenate(policies).astype(np.float32)
    return summarize(correct, policies, config=config, models=models, use_policy=use_policy)


def summarize(correct, policies, *, config, models: train.Models, use_policy: bool):
    """Metrics of a whole evaluation from per-example correctness (E,) and policies (E, N)."""
    rec = models.recognizer
    n = rec.num_blocks
    blocks = policies.sum(-1)
    rec_flops = rec.flops(config.data.image_size)
    per_image = flops_lib.flops_per_image(policies, rec_flops)
    policy_flops = 0.0
    if use_policy:
        policy_flops = float(
            flops_lib.policy_network_flops(
                num_blocks=n,
                image_size=config.data.image_size // 2,
                use_geo=models.policy.use_geo,
                width=models.policy.width,
                stem=models.policy.stem,
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


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`--config.mode=eval`: evaluates each selected stage's checkpoint in `workdir`.

    Uses `config.eval.step` (-1: the latest checkpoint of each stage). Stages without a
    checkpoint are skipped with a log line; if none has one, that is an error.
    """
    info = pipeline.dataset_info(config.data.dataset, data_dir=config.data.data_dir)
    mesh = train.make_mesh()
    models = train.create_models(config, info.num_classes)
    results = {}
    for stage in train.parse_stages(config.stages.run):
        restored = train.restore_variables(
            workdir, stage, config, models, mesh,
            steps_per_epoch=train.stage_steps_per_epoch(stage, config, mesh),
            step=None if config.eval.step < 0 else config.eval.step,
        )  # fmt: skip
        if restored is None:
            logging.info("No %r checkpoint in %s; skipping it.", stage, workdir)
            continue
        variables, step = restored
        logging.info("[%s] Evaluating the checkpoint at step %d.", stage, step)
        results[stage] = evaluate_variables(
            variables, config, models=models, mesh=mesh, stage=stage
        )
        results[stage]["step"] = int(step)
    if not results:
        raise FileNotFoundError(
            f"No checkpoints to evaluate in {os.path.join(workdir, 'checkpoints')}; train first "
            "with --config.mode=train."
        )
    write_results(workdir, results)
    logging.info("Results:\n%s", format_table(read_results(workdir)))
    return results


def results_path(workdir: str) -> str:
    return os.path.join(workdir, "results.json")


def read_results(workdir: str) -> dict[str, Any]:
    path = results_path(workdir)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
    """Merges `results` (stage -> metrics) into workdir/results.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    merged = {**read_results(workdir), **results}
    ordered = {s: merged[s] for s in train.STAGES if s in merged}
    os.makedirs(workdir, exist_ok=True)
    tmp = results_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ordered, f, indent=2)
    os.replace(tmp, results_path(workdir))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table of results: one row per stage."""
    header = (
        f"{'stage':<10} {'accuracy':>8} {'Pr':>6} {'blocks':>13} {'diversity':>9} "
        f"{'GFLOPs/image':>17} {'full ResNet':>11} {'examples':>8}"
    )
    lines = [header, "-" * len(header)]
    for stage, r in results.items():
        blocks = f"{r['blocks_mean']:.2f} ± {r['blocks_std']:.2f}"
        gflops = f"{r['flops_mean'] / 1e9:.4f} ± {r['flops_std'] / 1e9:.4f}"
        lines.append(
            f"{stage:<10} {r['accuracy']:>8.4f} {r['pr']:>6.3f} {blocks:>13} "
            f"{r['diversity']:>9d} {gflops:>17} {r['full_flops'] / 1e9:>11.4f} "
            f"{r['num_examples']:>8d}"
        )
    return "\n".join(lines)
