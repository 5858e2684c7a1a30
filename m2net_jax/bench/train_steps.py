"""Benchmarks of the training steps: images/s of one optimizer step per stage.

The steps are the jitted, sharded ones of `m2net_jax.steps`, with the optimizers and loss
hyperparameters that `configs/base.py` gives each stage. The policy stage's step runs with two
plain frozen forwards ("naive") and with `fast_forward.frozen_logits` ("shared"), at several
curriculum stages k, with their losses.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from m2net_jax import fast_forward, state
from m2net_jax import policy_gradient as pg
from m2net_jax import steps as steps_lib
from m2net_jax.bench import timing
from m2net_jax.bench.inputs import both_variables, random_batch
from m2net_jax.bench.suites import Suite, suite_config


class StepRunner:
    """Calls a compiled train step on its own (donated) state and one fixed sharded batch."""

    def __init__(self, step_fn, train_state, batch):
        self.step_fn, self.state, self.batch = step_fn, train_state, batch
        self.scalars = None

    def __call__(self):
        self.state, self.scalars = self.step_fn(self.state, self.batch)
        jax.block_until_ready(self.scalars)


class TrainBench:
    """The suite's networks, random variables and batch, and the stages' compiled train steps.

    Networks, optimizers and penalties come from `suite_config(suite)` (`configs/base.py` at the
    suite's sizes). The policy stage's curriculum is chosen through the step counter (k = 1 +
    step // `policy_gradient.curriculum_steps` with a huge steps_per_epoch, so k stays put while
    a benchmark runs).
    """

    STEPS_PER_EPOCH = 1_000_000

    def __init__(self, suite: Suite, mesh=None):
        self.suite = suite
        self.config = suite_config(suite)
        self.mesh = steps_lib.make_mesh() if mesh is None else mesh
        self.models = state.create_networks(self.config, suite.num_classes)
        self.num_blocks = self.models.recognizer.num_blocks
        # Host copies: every state made from them gets its own device buffers, which its step
        # donates.
        self.variables = jax.device_get(
            both_variables(suite, self.models.recognizer, self.models.policy)
        )
        self.batch = steps_lib.shard_batch(random_batch(suite, suite.train_batch), self.mesh)
        # The optimizer is a small part of a step; its schedule's length does not matter here.
        self.optimizers = {
            stage: state.make_optimizer(
                self.config.stages[stage], steps_per_epoch=self.STEPS_PER_EPOCH
            )
            for stage in state.STAGES
        }

    def state_at(self, stage: str, k: int):
        """A fresh replicated TrainState of `stage` whose step puts the curriculum at k."""
        spec = state.STAGE_SPECS[stage]
        key = jax.random.PRNGKey(0)
        train_state = state.create_train_state(self.variables, spec, self.optimizers[stage], key)
        steps_per_k = pg.curriculum_steps(
            self.config.sampling.curriculum_epochs, self.STEPS_PER_EPOCH
        )
        step = (k - 1) * steps_per_k
        train_state = train_state.replace(step=jnp.asarray(step, jnp.int32))
        return steps_lib.replicate(train_state, self.mesh)

    def _compiled(self, stage: str, **kwargs):
        hp = steps_lib.loss_hyperparams(self.config, stage, steps_per_epoch=self.STEPS_PER_EPOCH)
        spec = state.STAGE_SPECS[stage]
        tx = self.optimizers[stage]
        step = steps_lib.make_train_step(spec, self.models, hp, tx, self.mesh, **kwargs)
        return step.lower(self.state_at(stage, self.num_blocks), self.batch).compile()

    def step(self, stage: str):
        """The compiled step of 'pretrain' or 'finetune'."""
        return self._compiled(stage)

    def policy_step(self, variant: str):
        """The policy stage's compiled step with two plain frozen forwards ('naive') or with
        `fast_forward.frozen_logits` ('shared')."""
        frozen = {"naive": fast_forward.naive_frozen_logits, "shared": fast_forward.frozen_logits}
        return self._compiled("policy", frozen_logits=frozen[variant])

    def policy_steps(self) -> dict[str, Any]:
        """`policy_step` of both variants, by name."""
        return {variant: self.policy_step(variant) for variant in ("naive", "shared")}


_CACHE_HITS = []  # One entry per persistent-compilation-cache hit in this process.


def _count_cache_hits(event: str, **kwargs) -> None:
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS.append(event)


@functools.cache
def _listen_for_cache_hits() -> None:
    """Registers `_count_cache_hits` with jax.monitoring, once per process."""
    jax.monitoring.register_event_listener(_count_cache_hits)


def compile_cold_and_warm(compile_fn) -> tuple[Any, dict[str, float]]:
    """Compiles twice: as a fresh process does, then again after `jax.clear_caches()`.

    The second compile is what a rerun, a resumed job or an evaluation pays when JAX's
    persistent compilation cache is on (`m2net_jax.steps.configure_compilation_cache`; the
    bench's `__main__` points it at an empty directory): `warm_cache_hits` > 0 says the program
    came from there. Returns the first compiled program and {cold_s, warm_s, warm_cache_hits}.
    """
    _listen_for_cache_hits()
    start = time.perf_counter()
    compiled = compile_fn()
    cold = time.perf_counter() - start
    jax.clear_caches()
    hits = len(_CACHE_HITS)
    start = time.perf_counter()
    compile_fn()
    warm = time.perf_counter() - start
    return compiled, {"cold_s": cold, "warm_s": warm, "warm_cache_hits": len(_CACHE_HITS) - hits}


def bench_train(suite: Suite) -> dict[str, Any]:
    """Images/s of each stage's train step; the policy step naive vs shared, per curriculum k."""
    tb = TrainBench(suite)
    n = tb.num_blocks
    runners, compile_s = {}, {}
    for stage in ("pretrain", "finetune"):
        step_fn, compile_s[stage] = compile_cold_and_warm(functools.partial(tb.step, stage))
        runners[stage] = StepRunner(step_fn, tb.state_at(stage, n), tb.batch)
    policy_steps = {}
    for variant in ("naive", "shared"):
        compile_fn = functools.partial(tb.policy_step, variant)
        policy_steps[variant], compile_s[f"policy_{variant}"] = compile_cold_and_warm(compile_fn)
    ks = sorted({n if k == 0 else min(k, n) for k in suite.curriculum})
    for variant, step_fn in policy_steps.items():
        for k in ks:
            runners[f"policy_{variant}_k{k}"] = StepRunner(
                step_fn, tb.state_at("policy", k), tb.batch
            )
    times = timing.interleaved(runners, suite.reps)
    steps = {
        name: {"step_s": timing.median(t), "images_per_s": suite.train_batch / timing.median(t)}
        for name, t in times.items()
    }
    return {
        "batch": suite.train_batch,
        "devices": tb.mesh.size,
        "steps": steps,
        "compile_s": compile_s,
        "policy_shared_vs_naive": _shared_vs_naive(runners, steps, ks),
    }


def _shared_vs_naive(runners, steps, ks) -> dict[str, Any]:
    """Per k: the shared policy step's speedup over the naive one, and their metrics' agreement."""
    policy = {}
    for k in ks:
        naive, shared = runners[f"policy_naive_k{k}"], runners[f"policy_shared_k{k}"]
        a, b = jax.device_get((naive.scalars, shared.scalars))
        # Both ran the same number of steps from the same state on the same batch (the same k
        # and sampling keys), so every metric of their last steps should agree.
        diffs = [abs(float(a[key]) - float(b[key])) for key in a if key in b]
        policy[f"k{k}"] = {
            "k": k,
            "speedup": steps[f"policy_naive_k{k}"]["step_s"]
            / steps[f"policy_shared_k{k}"]["step_s"],
            "loss_naive": float(a["loss"]),
            "loss_shared": float(b["loss"]),
            "max_metric_difference": max(diffs),
        }
    return policy
