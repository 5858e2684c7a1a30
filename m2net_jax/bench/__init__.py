"""Benchmarks of M²Net's speed: training steps, evaluation, batch-1 latency, uniqueness, input.

  python -m m2net_jax.bench --suite=quick --json=/tmp/bench_quick.json   # 2-core CPU, < 10 min
  python -m m2net_jax.bench --suite=full --json=/tmp/bench_full.json     # an accelerator

M²Net's claim is computation saved per photo (§4.2, Fig. 9): the FLOPs a policy keeps. These
measurements check that the savings are real in wall-clock time, and that training is not slower
than it must be. Everything that is compared is measured side by side in one run, interleaved
(A, B, A, B, ...), and reported as medians, so that a shared or throttling machine skews both
sides alike; ratios are more trustworthy than absolute numbers.

Parts (`--parts`, default all), one module each:

- train (`train_steps.py`): images/s of one optimizer step per stage (the jitted, sharded steps
  of `m2net_jax.steps`, with `configs/base.py`'s optimizers and penalties); the policy stage's
  step with two plain frozen forwards ("naive") and with `fast_forward.frozen_logits`
  ("shared"), at several curriculum stages k, with their losses; and each step's compile time
  cold (an empty persistent compilation cache) and warm (a rerun that finds it there).
- frozen, eval, latency (`forward.py`): the policy stage's frozen recognizer alone, naive vs
  shared; evaluation's predict step and masked vs block-skipping batched forwards; batch-1
  latency of the full ResNet vs M²Net with a fixed half policy, with the FLOPs-predicted speedup.
- uniqueness (`uniqueness.py`): Eqn 2 at M up to 65,536, N = 21: O(M·N) counts vs the pairwise
  definition, time and XLA's memory estimate.
- convs (`convs.py`): forward + backward time of the compact backbones' convolutions (§4.4) vs
  `nn.Conv` with `feature_group_count` and vs the dense conv each replaces.
- pipeline (`pipeline.py`): images/s of the grain training pipeline, from disk in-process and
  with worker processes, and from memory, vs what the training steps consume.

The suites' sizes and the config they stand for are in `suites.py` (networks are
`state.create_networks` of `configs/base.py` at the suite's sizes), random variables and batches
in `inputs.py`, the timer in `timing.py`, the run in `runner.py`, the printed tables in
`table.py`, and the command line in `__main__.py` (importing this package defines no flags).

Weights are random (kernels He-normal, BN statistics at identity): speed does not depend on
them, and with random policy-network weights the policies are mixed, as in mid-training.
"""

from m2net_jax.bench.convs import bench_convs
from m2net_jax.bench.forward import bench_eval, bench_frozen, bench_latency
from m2net_jax.bench.inputs import both_variables, half_policy, random_batch, random_variables
from m2net_jax.bench.pipeline import bench_pipeline
from m2net_jax.bench.runner import PARTS, device_info, run
from m2net_jax.bench.suites import SUITES, Suite, models_for, suite_config
from m2net_jax.bench.table import format_table
from m2net_jax.bench.train_steps import TrainBench, bench_train, compile_cold_and_warm
from m2net_jax.bench.uniqueness import bench_uniqueness, pairwise_uniqueness

__all__ = [
    "PARTS",
    "SUITES",
    "Suite",
    "TrainBench",
    "bench_convs",
    "bench_eval",
    "bench_frozen",
    "bench_latency",
    "bench_pipeline",
    "bench_train",
    "bench_uniqueness",
    "compile_cold_and_warm",
    "both_variables",
    "device_info",
    "format_table",
    "half_policy",
    "models_for",
    "pairwise_uniqueness",
    "random_batch",
    "random_variables",
    "run",
    "suite_config",
]
