"""Benchmarks of M²Net's speed: training steps, evaluation, batch-1 latency, uniqueness, input.

  python -m m2net_jax.bench --suite=quick --json=/tmp/bench_quick.json   # 2-core CPU, < 10 min
  python -m m2net_jax.bench --suite=full --json=/tmp/bench_full.json     # an accelerator

M²Net's claim is computation saved per photo (§4.2, Fig. 9): the FLOPs a policy keeps. These
measurements check that the savings are real in wall-clock time, and that training is not slower
than it must be. Everything that is compared is measured side by side in one run, interleaved
(A, B, A, B, ...), and reported as medians, so that a shared or throttling machine skews both
sides alike; ratios are more trustworthy than absolute numbers.

Parts (`--parts`, default all):

- train: images/s of one optimizer step per stage (the jitted, sharded steps of `train.py`);
  the policy stage's step with two plain frozen forwards ("naive") and with
  `fast_forward.frozen_logits` ("shared"), at several curriculum stages k, with their losses.
- frozen: the policy stage's frozen-recognizer work alone (no policy network, no backward):
  two masked forwards vs `fast_forward.frozen_logits`, per curriculum k, with the logits'
  largest difference.
- eval: images/s of evaluation's predict step, and of the masked vs the block-skipping batched
  forward under diverse per-photo policies and under one policy shared by the batch.
- latency: batch-1 latency of the full ResNet vs M²Net with a fixed policy that keeps about
  half of the blocks (every other block: Pr = ⌈N/2⌉/N), with the FLOPs-predicted speedup.
- uniqueness: Eqn 2 at M up to 65,536, N = 21: `policy_gradient.uniqueness` (O(M·N)) vs the
  pairwise definition (an M×M Hamming matrix), time and XLA's memory estimate.
- convs: forward + backward time of the compact backbones' convolutions (§4.4) as
  `models.layers` computes them (grouped as dense convs on channel slices, depthwise as k²
  shifted products, HetConv as a grouped 3×3 plus a grouped 1×1) vs `nn.Conv` with
  `feature_group_count`, and vs the dense conv each replaces, at the suite's stage-1 sizes.
- pipeline: images/s of the grain training pipeline vs what the training steps consume.

Weights are random (kernels He-normal, BN statistics at identity): speed does not depend on
them, and with random policy-network weights the policies are mixed, as in mid-training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from m2net_jax import fast_forward, geo
from m2net_jax import flops as flops_lib
from m2net_jax import policy_gradient as pg
from m2net_jax.models import PolicyNetwork, Recognizer

PARTS = ("train", "frozen", "eval", "latency", "uniqueness", "convs", "pipeline")


@dataclasses.dataclass(frozen=True)
class Suite:
    """Sizes of one benchmark suite.

    Attributes:
      depth, width, stem, image_size, num_classes: the recognizer (ResNet-`depth`).
      policy_width: the policy network's ResNet-10 width (its stem is `stem` too).
      train_batch: global batch of the training steps (a multiple of the device count).
      eval_batch: batch of the evaluation forwards.
      reps: timed repetitions of each training step / evaluation forward.
      latency_reps: timed repetitions of each batch-1 forward.
      curriculum: the policy stage's k values (decided blocks) at which the train steps are
        timed; 0 stands for N.
      frozen_curriculum: the same for the frozen recognizer's forwards alone.
      bf16: also time the frozen forwards in bfloat16 (with how often the prediction changes).
      uniqueness_sizes: M values for Eqn 2; the pairwise definition runs up to `pairwise_max`.
      uniqueness_blocks: N for Eqn 2 (21: ResNet-65).
      dataset: the TFDS dataset of the input-pipeline part.
      pipeline_batches: batches timed there.
    """

    depth: int
    width: int
    stem: str
    image_size: int
    num_classes: int
    policy_width: int
    train_batch: int
    eval_batch: int
    reps: int
    latency_reps: int
    curriculum: tuple[int, ...]
    frozen_curriculum: tuple[int, ...]
    bf16: bool
    uniqueness_sizes: tuple[int, ...]
    pairwise_max: int
    uniqueness_blocks: int
    dataset: str
    pipeline_batches: int


SUITES = {
    # Seconds: the machinery on a tiny model (tests run it).
    "smoke": Suite(
        depth=29, width=8, stem="small", image_size=32, num_classes=8, policy_width=8,
        train_batch=8, eval_batch=8, reps=2, latency_reps=3, curriculum=(1, 0),
        frozen_curriculum=(1, 0), bf16=False,
        uniqueness_sizes=(256, 1024), pairwise_max=1024, uniqueness_blocks=21,
        dataset="geo_twins/smoke", pipeline_batches=2,
    ),
    # A 2-core CPU in under 10 minutes: the architecture of m2net_jax/configs/r47.py:geo_twins
    # (ResNet-47, width 64, 32 px, small stems) at a CPU-sized batch.
    "quick": Suite(
        depth=47, width=64, stem="small", image_size=32, num_classes=32, policy_width=64,
        train_batch=16, eval_batch=32, reps=5, latency_reps=30, curriculum=(1, 0),
        frozen_curriculum=(1, 8, 0), bf16=False,
        uniqueness_sizes=(1024, 4096, 8192, 16384, 65536), pairwise_max=8192,
        uniqueness_blocks=21, dataset="geo_twins", pipeline_batches=20,
    ),
    # An accelerator: the paper's ResNet-47 at 224 px (policy at 112 px, ImageNet stems).
    "full": Suite(
        depth=47, width=64, stem="imagenet", image_size=224, num_classes=420, policy_width=64,
        train_batch=128, eval_batch=256, reps=20, latency_reps=200, curriculum=(1, 8, 0),
        frozen_curriculum=(1, 8, 0), bf16=True,
        uniqueness_sizes=(1024, 4096, 8192, 16384, 65536), pairwise_max=8192,
        uniqueness_blocks=21, dataset="geo_twins/224px", pipeline_batches=20,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Timing.


def _interleaved(calls: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds of each call, `reps` times, interleaved: a, b, c, a, b, c, ...

    Each call must block until its result is ready. One untimed call of each warms up first
    (compilation, caches).
    """
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def _median(values) -> float:
    return float(statistics.median(values))


def _block(fn):
    return lambda *args: jax.block_until_ready(fn(*args))


# ----------------------------------------------------------------------------------------------
# Models and random inputs.


def models_for(suite: Suite, *, axis_name: str | None = None) -> tuple[Recognizer, PolicyNetwork]:
    """The suite's recognizer and policy network."""
    rec = Recognizer(
        depth=suite.depth,
        num_classes=suite.num_classes,
        width=suite.width,
        stem=suite.stem,
        axis_name=axis_name,
    )
    pol = PolicyNetwork(
        num_blocks=rec.num_blocks, width=suite.policy_width, stem=suite.stem, axis_name=axis_name
    )
    return rec, pol


def random_variables(
    module, *args, seed: int = 0, kernel_gain: float = 2.0, random_bn: bool = False,
    bias_std: float = 0.1,
):  # fmt: skip
    """Random variables of `module` without compiling its init (which costs tens of seconds for
    a ResNet on 2 cores; drawing `jax.eval_shape`'s shapes with numpy costs none).

    Kernels N(0, kernel_gain / fan_in) (2: He-normal); BN at the identity (mean 0, variance 1,
    scale 1), or with `random_bn` scales and variances in [0.5, 1.5] and means N(0, bias_std);
    biases N(0, bias_std).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, (kernel_gain / fan_in) ** 0.5, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            if random_bn:
                return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
            return np.ones(leaf.shape, np.float32)
        if name == "mean" and not random_bn:
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0.0, bias_std, leaf.shape).astype(np.float32)  # bias (and mean)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def both_variables(suite: Suite, rec: Recognizer, pol: PolicyNetwork, seed: int = 0):
    """{'params', 'batch_stats'}, each {'recognizer', 'policy'}, as `train.py` holds them."""
    s = suite.image_size
    v_rec = random_variables(
        rec.clone(axis_name=None),
        jnp.zeros((1, s, s, 3)),
        jnp.ones((1, rec.num_blocks)),
        seed=seed,
    )
    v_pol = random_variables(
        pol.clone(axis_name=None),
        jnp.zeros((1, s // 2, s // 2, 3)),
        jnp.zeros((1, 8)),
        seed=seed + 1,
    )
    variables = {c: {"recognizer": v_rec[c], "policy": v_pol[c]} for c in ("params", "batch_stats")}
    # On the device once: numpy arguments would be copied to it at every call (on a GPU that
    # copy alone takes longer than a batch-1 forward).
    return jax.device_put(variables)


def random_batch(suite: Suite, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch shaped like the input pipeline's: photos, policy photos, locations, labels."""
    rng = np.random.default_rng(seed)
    s = suite.image_size
    lat = rng.uniform(-60, 60, batch)
    lon = rng.uniform(-180, 180, batch)
    return {
        "image": rng.random((batch, s, s, 3), np.float32),
        "policy_image": rng.random((batch, s // 2, s // 2, 3), np.float32),
        "location": geo.encode_location(lat, lon),
        "label": rng.integers(0, suite.num_classes, batch).astype(np.int32),
    }


def half_policy(num_blocks: int) -> np.ndarray:
    """The latency benchmark's fixed policy: every other block, ⌈N/2⌉ of N kept (Pr ≈ 0.53)."""
    return (np.arange(num_blocks) % 2 == 0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Training steps.


class _StepRunner:
    """Calls a compiled train step on its own (donated) state and one fixed sharded batch."""

    def __init__(self, step_fn, state, batch):
        self.step_fn, self.state, self.batch = step_fn, state, batch
        self.scalars = None

    def __call__(self):
        self.state, self.scalars = self.step_fn(self.state, self.batch)
        jax.block_until_ready(self.scalars)


class TrainBench:
    """The suite's models, random variables and batch, and the stages' compiled train steps.

    The policy stage's curriculum is chosen through the step counter (k = 1 + step //
    steps_per_epoch with a huge steps_per_epoch, so k stays put while a benchmark runs).
    """

    STEPS_PER_EPOCH = 1_000_000

    def __init__(self, suite: Suite, mesh=None):
        import optax

        from m2net_jax import state as state_lib
        from m2net_jax import steps

        self.state_lib, self.steps = state_lib, steps
        self.suite = suite
        self.mesh = steps.make_mesh() if mesh is None else mesh
        rec, pol = models_for(suite, axis_name=state_lib.AXIS)
        self.models = state_lib.Networks(recognizer=rec, policy=pol)
        self.num_blocks = rec.num_blocks
        # Host copies: every state made from them gets its own device buffers, which its step
        # donates.
        self.variables = jax.device_get(both_variables(suite, rec, pol))
        self.batch = steps.shard_batch(random_batch(suite, suite.train_batch), self.mesh)
        # The optimizers and penalties of m2net_jax/configs/base.py (the optimizer is a small part
        # of a step).
        self.stage_setup = {
            "pretrain": (optax.sgd(0.1, momentum=0.9, nesterov=True), 0.0),
            "policy": (optax.adam(1e-3), 5.0),
            "finetune": (optax.adam(1e-4), 10.0),
        }

    def state_at(self, stage: str, k: int):
        """A fresh replicated TrainState of `stage` whose step puts the curriculum at k."""
        spec = self.state_lib.STAGE_SPECS[stage]
        tx = self.stage_setup[stage][0]
        key = jax.random.PRNGKey(0)
        state = self.state_lib.create_train_state(self.variables, spec, tx, key)
        state = state.replace(step=jnp.asarray((k - 1) * self.STEPS_PER_EPOCH, jnp.int32))
        return self.steps.replicate(state, self.mesh)

    def _compiled(self, stage: str, models, **kwargs):
        tx, penalty = self.stage_setup[stage]
        hp = self.steps.LossHyperparams(
            theta_s=1.0, theta_d=0.5, penalty=penalty, entropy_weight=0.1, bound=0.8,
            steps_per_epoch=self.STEPS_PER_EPOCH, curriculum_epochs=1,
        )  # fmt: skip
        spec = self.state_lib.STAGE_SPECS[stage]
        step = self.steps.make_train_step(spec, models, hp, tx, self.mesh, **kwargs)
        return step.lower(self.state_at(stage, self.num_blocks), self.batch).compile()

    def step(self, stage: str):
        """The compiled step of 'pretrain' or 'finetune'."""
        return self._compiled(stage, self.models)

    def policy_steps(self) -> dict[str, Any]:
        """The policy stage's compiled step with two plain frozen forwards ('naive') and with
        `fast_forward.frozen_logits` ('shared')."""
        return {
            "naive": self._compiled(
                "policy", self.models, frozen_logits=fast_forward.naive_frozen_logits
            ),
            "shared": self._compiled(
                "policy", self.models, frozen_logits=fast_forward.frozen_logits
            ),
        }


def bench_train(suite: Suite) -> dict[str, Any]:
    """Images/s of each stage's train step; the policy step naive vs shared, per curriculum k."""
    tb = TrainBench(suite)
    n = tb.num_blocks
    runners, compile_s = {}, {}
    for stage in ("pretrain", "finetune"):
        start = time.perf_counter()
        step_fn = tb.step(stage)
        compile_s[stage] = time.perf_counter() - start
        runners[stage] = _StepRunner(step_fn, tb.state_at(stage, n), tb.batch)
    start = time.perf_counter()
    policy_steps = tb.policy_steps()
    compile_s["policy_naive+shared"] = time.perf_counter() - start
    ks = sorted({n if k == 0 else min(k, n) for k in suite.curriculum})
    for variant, step_fn in policy_steps.items():
        for k in ks:
            runners[f"policy_{variant}_k{k}"] = _StepRunner(
                step_fn, tb.state_at("policy", k), tb.batch
            )
    times = _interleaved(runners, suite.reps)
    steps = {
        name: {"step_s": _median(t), "images_per_s": suite.train_batch / _median(t)}
        for name, t in times.items()
    }
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
    return {
        "batch": suite.train_batch,
        "devices": tb.mesh.size,
        "steps": steps,
        "compile_s": compile_s,
        "policy_shared_vs_naive": policy,
    }


def _stage_policies(suite: Suite, n: int, k: int, batch: int, seed: int = 0):
    """Greedy and sampled policies as the policy stage draws them, curriculum k applied: keep
    probabilities s spread over [0.1, 0.9] (a policy in mid-training), bound 0.8."""
    rng = np.random.default_rng(seed)
    probs = jnp.asarray(rng.uniform(0.1, 0.9, (batch, n)), jnp.float32)
    mask = pg.curriculum_mask(n, k)
    greedy = pg.apply_curriculum(pg.greedy_policy(probs), mask)
    sampled = pg.apply_curriculum(pg.sample_policy(jax.random.PRNGKey(seed), probs), mask)
    return greedy, sampled


def bench_frozen(suite: Suite) -> dict[str, Any]:
    """The frozen recognizer's two eval-mode forwards of a policy step: naive vs shared."""
    rec, pol = models_for(suite)
    variables = both_variables(suite, rec, pol)
    rec_vars = {c: variables[c]["recognizer"] for c in variables}
    images = jax.device_put(random_batch(suite, suite.train_batch, seed=3)["image"])
    n = rec.num_blocks
    naive = jax.jit(lambda v, x, g, s: fast_forward.naive_frozen_logits(rec, v, x, g, s))
    shared = jax.jit(lambda v, x, g, s: fast_forward.frozen_logits(rec, v, x, g, s))
    ks = sorted({n if k == 0 else min(k, n) for k in suite.frozen_curriculum})
    calls, policies, results = {}, {}, {}
    for k in ks:
        greedy, sampled = policies[k] = _stage_policies(suite, n, k, suite.train_batch, seed=k)
        args = (rec_vars, images, greedy, sampled)
        calls[f"naive_k{k}"] = functools.partial(_block(naive), *args)
        calls[f"shared_k{k}"] = functools.partial(_block(shared), *args)
    functions = {"naive": naive, "shared": shared}
    if suite.bf16:
        rec16 = rec.clone(dtype=jnp.bfloat16)
        functions["naive_bf16"] = jax.jit(
            lambda v, x, g, s: fast_forward.naive_frozen_logits(rec16, v, x, g, s)
        )
        calls["naive_bf16"] = functools.partial(
            _block(functions["naive_bf16"]), rec_vars, images, *policies[n]
        )
    compile_s = {}
    for name, fn in functions.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(rec_vars, images, *policies[ks[0]]))
        compile_s[name] = time.perf_counter() - start
    times = _interleaved(calls, suite.reps)
    for k in ks:
        greedy, sampled = policies[k]
        a = naive(rec_vars, images, greedy, sampled)
        b = shared(rec_vars, images, greedy, sampled)
        agree = np.asarray(jnp.all(greedy == sampled, axis=0))
        results[f"k{k}"] = {
            "k": k,
            "shared_prefix": int(np.cumprod(agree).sum()),
            "naive_s": _median(times[f"naive_k{k}"]),
            "shared_s": _median(times[f"shared_k{k}"]),
            "speedup": _median(times[f"naive_k{k}"]) / _median(times[f"shared_k{k}"]),
            "max_logit_difference": float(
                max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in zip(a, b, strict=True))
            ),
            "max_abs_logit": float(max(np.abs(np.asarray(x)).max() for x in a)),
        }
    result = {"batch": suite.train_batch, "first_call_s": compile_s, "by_k": results}
    if suite.bf16:
        f32 = naive(rec_vars, images, *policies[n])
        b16 = functions["naive_bf16"](rec_vars, images, *policies[n])
        changed = [
            np.mean(np.argmax(a, -1) != np.argmax(b, -1)) for a, b in zip(f32, b16, strict=True)
        ]
        result["bf16_k_n"] = {
            "naive_s": _median(times["naive_bf16"]),
            "speedup_over_f32": _median(times[f"naive_k{n}"]) / _median(times["naive_bf16"]),
            "predictions_changed": float(np.mean(changed)),
        }
    return result


# ----------------------------------------------------------------------------------------------
# Evaluation.


def bench_eval(suite: Suite) -> dict[str, Any]:
    """Images/s of evaluation's predict step, and masked vs skipping batched forwards."""
    from m2net_jax import state as state_lib
    from m2net_jax import steps

    mesh = steps.make_mesh()
    rec, pol = models_for(suite, axis_name=state_lib.AXIS)
    models = state_lib.Networks(recognizer=rec, policy=pol)
    variables = steps.replicate(both_variables(suite, rec, pol), mesh)
    host_batch = random_batch(suite, suite.eval_batch, seed=1)
    batch = steps.shard_batch(host_batch, mesh)
    predict = steps.make_predict_step(models, mesh, use_policy=True)

    plain = rec.clone(axis_name=None)
    device = jax.devices()[0]
    rec_vars = jax.device_put({c: variables[c]["recognizer"] for c in variables}, device)
    images = jax.device_put(host_batch["image"], device)
    n = plain.num_blocks
    rng = np.random.default_rng(0)
    diverse = (rng.random((suite.eval_batch, n)) < half_policy(n).mean()).astype(np.float32)
    uniform = np.broadcast_to(half_policy(n), (suite.eval_batch, n)).copy()
    diverse, uniform = jax.device_put((diverse, uniform), device)
    masked = jax.jit(lambda v, x, p: plain.apply(v, x, p))
    skipping = jax.jit(lambda v, x, p: fast_forward.skipping_logits(plain, v, x, p))
    calls = {
        "predict_step": lambda: jax.block_until_ready(predict(variables, batch)),
        "masked_diverse": lambda: jax.block_until_ready(masked(rec_vars, images, diverse)),
        "skipping_diverse": lambda: jax.block_until_ready(skipping(rec_vars, images, diverse)),
        "masked_uniform": lambda: jax.block_until_ready(masked(rec_vars, images, uniform)),
        "skipping_uniform": lambda: jax.block_until_ready(skipping(rec_vars, images, uniform)),
    }
    times = _interleaved(calls, max(2, suite.reps // 2))
    result = {
        name: {"batch_s": _median(t), "images_per_s": suite.eval_batch / _median(t)}
        for name, t in times.items()
    }
    return {
        "batch": suite.eval_batch,
        "pr": float(half_policy(n).mean()),
        "blocks_no_photo_uses_diverse": int((diverse.sum(0) == 0).sum()),
        **result,
    }


# ----------------------------------------------------------------------------------------------
# Batch-1 latency.


def bench_latency(suite: Suite) -> dict[str, Any]:
    """Batch-1 latency: full ResNet vs M²Net with a fixed half policy, with predicted speedups."""
    rec, pol = models_for(suite)
    variables = both_variables(suite, rec, pol)
    rec_vars = {c: variables[c]["recognizer"] for c in variables}
    pol_vars = {c: variables[c]["policy"] for c in variables}
    n = rec.num_blocks
    batch = random_batch(suite, 1, seed=2)
    image, policy_image, location = (
        jax.device_put(batch[k]) for k in ("image", "policy_image", "location")
    )
    fixed_host = half_policy(n)[None]
    fixed, ones = jax.device_put((fixed_host, np.ones((1, n), np.float32)))

    full = jax.jit(lambda v, x: rec.apply(v, x, jnp.ones((1, n), jnp.float32)))
    masked = jax.jit(lambda v, x, p: rec.apply(v, x, p))
    skipping = jax.jit(lambda v, x, p: fast_forward.skipping_logits(rec, v, x, p))
    policy_net = jax.jit(lambda v, x, loc: pol.apply(v, x, loc))

    @jax.jit
    def m2net(v_pol, v_rec, x, x_half, loc, p):
        # The policy network runs; its output is combined with the fixed policy through a
        # comparison XLA cannot fold (s ≥ 0 always), so it is neither skipped nor used.
        s = pol.apply(v_pol, x_half, loc)
        policy = jnp.where(s >= 0.0, p, 0.0)
        return fast_forward.skipping_logits(rec, v_rec, x, policy)

    calls = {
        "full_resnet": lambda: jax.block_until_ready(full(rec_vars, image)),
        "skipping_all_blocks": lambda: jax.block_until_ready(skipping(rec_vars, image, ones)),
        "masked_half": lambda: jax.block_until_ready(masked(rec_vars, image, fixed)),
        "skipping_half": lambda: jax.block_until_ready(skipping(rec_vars, image, fixed)),
        "policy_network": lambda: jax.block_until_ready(
            policy_net(pol_vars, policy_image, location)
        ),
        "m2net_half": lambda: jax.block_until_ready(
            m2net(pol_vars, rec_vars, image, policy_image, location, fixed)
        ),
        # Every block dropped: what every photo pays (stem, downsamples, classifier).
        "skipping_no_blocks": lambda: jax.block_until_ready(skipping(rec_vars, image, 0 * ones)),
    }
    if suite.bf16:
        rec16 = rec.clone(dtype=jnp.bfloat16)
        full16 = jax.jit(lambda v, x: rec16.apply(v, x, jnp.ones((1, n), jnp.float32)))
        skipping16 = jax.jit(lambda v, x, p: fast_forward.skipping_logits(rec16, v, x, p))
        calls["full_resnet_bf16"] = lambda: jax.block_until_ready(full16(rec_vars, image))
        calls["skipping_half_bf16"] = lambda: jax.block_until_ready(
            skipping16(rec_vars, image, fixed)
        )
    times = _interleaved(calls, suite.latency_reps)
    # The fastest of many runs: a shared machine only ever adds time to a run.
    latency_ms = {name: 1e3 * min(t) for name, t in times.items()}
    median_ms = {name: 1e3 * _median(t) for name, t in times.items()}

    parts = rec.flops(suite.image_size)
    policy_flops = flops_lib.policy_network_flops(
        num_blocks=n, image_size=suite.image_size // 2, width=pol.width, stem=pol.stem
    )
    half_flops = float(flops_lib.flops_per_image(fixed_host[0], parts))
    predicted_rec = parts.full / half_flops
    predicted_m2net = parts.full / (half_flops + policy_flops)
    measured_rec = latency_ms["full_resnet"] / latency_ms["skipping_half"]
    measured_m2net = latency_ms["full_resnet"] / latency_ms["m2net_half"]
    return {
        "policy": fixed_host[0].astype(int).tolist(),
        "pr": float(fixed_host.mean()),
        "latency_ms": latency_ms,
        "median_latency_ms": median_ms,
        "gflops": {
            "full_resnet": parts.full / 1e9,
            "recognizer_half": half_flops / 1e9,
            "policy_network": policy_flops / 1e9,
        },
        "recognizer_speedup": {
            "measured": measured_rec,
            "predicted": predicted_rec,
            "fraction_of_predicted": measured_rec / predicted_rec,
        },
        "m2net_speedup": {
            "measured": measured_m2net,
            "predicted": predicted_m2net,
            "fraction_of_predicted": measured_m2net / predicted_m2net,
        },
    }


# ----------------------------------------------------------------------------------------------
# Uniqueness (Eqn 2).


def pairwise_uniqueness(policies: jax.Array) -> jax.Array:
    """Eqn 2 by its definition: the M×M normalised Hamming matrix, averaged over rows."""
    p = policies.astype(jnp.float32)
    hamming = p @ (1.0 - p).T + (1.0 - p) @ p.T  # (M, M): blocks where i runs and j not, or j, i.
    return jnp.mean(hamming, axis=1) / p.shape[1]


def _memory_bytes(compiled) -> int | None:
    """XLA's estimate of the memory a compiled function needs beyond its inputs."""
    try:
        analysis = compiled.memory_analysis()
    except NotImplementedError:  # Some backends do not implement the analysis.
        return None
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def bench_uniqueness(suite: Suite) -> dict[str, Any]:
    """Eqn 2 at growing M: O(M·N) counts vs the pairwise M×M matrix, time and memory."""
    n = suite.uniqueness_blocks
    rng = np.random.default_rng(0)
    rows = []
    for m in suite.uniqueness_sizes:
        policies = jax.device_put((rng.random((m, n)) < 0.5).astype(np.float32))
        methods = {"counts": pg.uniqueness}
        if m <= suite.pairwise_max:
            methods["pairwise"] = pairwise_uniqueness
        compiled = {name: jax.jit(fn).lower(policies).compile() for name, fn in methods.items()}
        calls = {name: functools.partial(_block(c), policies) for name, c in compiled.items()}
        times = _interleaved(calls, max(3, suite.reps))
        # What each formulation must hold besides its input: the definition's M×M Hamming
        # matrix, or the N counts and the M results. XLA may avoid materialising the matrix by
        # fusing it into the reduction (XLA:CPU does, and then runs it as a slow loop), so its
        # own estimate is reported next to it.
        row = {"M": m, "N": n, "counts_bytes": 4 * (n + m), "pairwise_bytes": 4 * (m * m + m)}
        for name, c in compiled.items():
            row[f"{name}_ms"] = 1e3 * _median(times[name])
            row[f"{name}_xla_bytes"] = _memory_bytes(c)
        if "pairwise" in compiled:
            diff = np.abs(np.asarray(compiled["counts"](policies) - compiled["pairwise"](policies)))
            row["max_difference"] = float(diff.max())
        rows.append(row)
    return {"rows": rows, "pairwise_max": suite.pairwise_max}


# ----------------------------------------------------------------------------------------------
# The compact backbones' convolutions.


def bench_convs(suite: Suite) -> dict[str, Any]:
    """Forward + backward seconds of each compact conv: as computed here, with XLA's grouped
    convolution (`feature_group_count`), and the dense conv it stands in for.

    Sizes: the stage-1 bottleneck of the suite's recognizer — its reducing 1×1 (4·width →
    width channels) and its 3×3 (width → width) on image_size² maps, a training batch.
    """
    import flax.linen as nn

    from m2net_jax.models import layers

    w, hw, batch = suite.width, suite.image_size, suite.train_batch
    wide = jnp.ones((batch, hw, hw, 4 * w), jnp.float32)
    narrow = jnp.ones((batch, hw, hw, w), jnp.float32)
    cases = {
        "grouped 1x1, G=4": (
            wide,
            {
                "ours": layers.GroupedConv(w, (1, 1), groups=4),
                "feature_group_count": nn.Conv(w, (1, 1), feature_group_count=4, use_bias=False),
                "dense": nn.Conv(w, (1, 1), use_bias=False),
            },
        ),
        "depthwise 3x3": (
            narrow,
            {
                "ours": layers.DepthwiseConv((3, 3)),
                "feature_group_count": nn.Conv(w, (3, 3), feature_group_count=w, use_bias=False),
                "dense": nn.Conv(w, (3, 3), use_bias=False),
            },
        ),
        "HetConv 3x3, P=4": (
            narrow,
            {
                "ours": layers.HetConv(w, (3, 3), parts=4),
                "dense": nn.Conv(w, (3, 3), use_bias=False),
            },
        ),
    }
    rows = {}
    for case, (x, modules) in cases.items():
        calls = {}
        for name, module in modules.items():
            params = module.init(jax.random.key(0), x)

            def loss(params, x, module=module):
                return jnp.mean(jnp.square(module.apply(params, x)))

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            calls[name] = functools.partial(_block(step), params, x)
        times = _interleaved(calls, max(3, suite.reps))
        ms = {name: 1e3 * _median(t) for name, t in times.items()}
        rows[case] = {
            "ms": ms,
            "dense_over_ours": ms["dense"] / ms["ours"],
            "feature_group_count_over_ours": (
                ms["feature_group_count"] / ms["ours"] if "feature_group_count" in ms else None
            ),
        }
    return {"batch": batch, "image_size": hw, "width": w, "cases": rows}


# ----------------------------------------------------------------------------------------------
# Input pipeline.


def bench_pipeline(suite: Suite, *, data_dir: str | None, consumption: float | None):
    """Images/s the grain training pipeline delivers in this process, vs the model's use."""
    from m2net_jax.data import pipeline

    pipeline.ensure_built(suite.dataset, data_dir=data_dir, build_if_missing=True)
    it = pipeline.make_train_iterator(
        suite.dataset,
        data_dir=data_dir,
        image_size=suite.image_size,
        batch_size=suite.train_batch,
        seed=0,
    )
    for _ in range(2):  # Warm-up: opening files, the first shuffle, thread start.
        next(it)
    start = time.perf_counter()
    for _ in range(suite.pipeline_batches):
        next(it)
    seconds = time.perf_counter() - start
    rate = suite.pipeline_batches * suite.train_batch / seconds
    return {
        "dataset": suite.dataset,
        "batch": suite.train_batch,
        "worker_count": 0,
        "images_per_s": rate,
        "model_images_per_s": consumption,
        "headroom": None if not consumption else rate / consumption,
    }


# ----------------------------------------------------------------------------------------------
# The run, the table, the entry point.


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
    }


def run(suite_name: str, *, parts=PARTS, data_dir: str | None = None) -> dict[str, Any]:
    """Runs a suite's parts and returns the results (what `--json` writes)."""
    if suite_name not in SUITES:
        raise ValueError(f"Unknown suite {suite_name!r}; choose one of {sorted(SUITES)}.")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"Unknown parts {sorted(unknown)}; choose from {PARTS}.")
    suite = SUITES[suite_name]
    results: dict[str, Any] = {
        "suite": suite_name,
        "sizes": dataclasses.asdict(suite),
        "device": device_info(),
    }
    start = time.perf_counter()
    benches = {
        "train": lambda: bench_train(suite),
        "frozen": lambda: bench_frozen(suite),
        "eval": lambda: bench_eval(suite),
        "latency": lambda: bench_latency(suite),
        "uniqueness": lambda: bench_uniqueness(suite),
        "convs": lambda: bench_convs(suite),
    }
    for part in PARTS:
        if part not in parts:
            continue
        logging.info("bench: %s ...", part)
        t0 = time.perf_counter()
        if part == "pipeline":
            steps = results.get("train", {}).get("steps", {})
            rates = [s["images_per_s"] for s in steps.values()]
            results[part] = bench_pipeline(
                suite, data_dir=data_dir, consumption=max(rates) if rates else None
            )
        else:
            results[part] = benches[part]()
        results[part]["seconds"] = time.perf_counter() - t0
    results["seconds"] = time.perf_counter() - start
    return results


def _fmt(value, digits=1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def format_table(results: Mapping[str, Any]) -> str:
    """The results as plain-text tables, one per part."""
    d = results["device"]
    sizes = results["sizes"]
    lines = [
        f"suite {results['suite']} on {d['device_count']} × {d['device_kind']} "
        f"({d['platform']}, {d['cpu_count']} CPUs, jax {d['jax']}); ResNet-{sizes['depth']} "
        f"width {sizes['width']}, {sizes['image_size']} px",
    ]
    if "train" in results:
        r = results["train"]
        lines += ["", f"train steps (global batch {r['batch']} on {r['devices']} devices):"]
        lines.append(f"  {'step':<24} {'s/step':>8} {'images/s':>9}")
        for name, s in r["steps"].items():
            lines.append(f"  {name:<24} {s['step_s']:>8.3f} {s['images_per_s']:>9.1f}")
        compiles = ", ".join(f"{name} {s:.1f}" for name, s in r["compile_s"].items())
        lines.append(f"  first call (trace + compile + run), s: {compiles}")
        lines.append("  policy step, shared vs naive (make_train_step(frozen_logits=...)):")
        for p in r["policy_shared_vs_naive"].values():
            same = (
                "identical"
                if p["max_metric_difference"] == 0
                else (f"max metric diff {p['max_metric_difference']:.2g}")
            )
            lines.append(
                f"    k={p['k']:<3} speedup {p['speedup']:.2f}x  loss {p['loss_shared']:.6f} vs "
                f"{p['loss_naive']:.6f} ({same})"
            )
    if "frozen" in results:
        r = results["frozen"]
        lines += ["", f"frozen recognizer of the policy step, two forwards (batch {r['batch']}):"]
        for p in r["by_k"].values():
            lines.append(
                f"  k={p['k']:<3} shared prefix {p['shared_prefix']:>2} blocks: naive "
                f"{p['naive_s']:.3f} s, shared {p['shared_s']:.3f} s, speedup "
                f"{p['speedup']:.2f}x, max |logit diff| {p['max_logit_difference']:.1e} "
                f"(of |logits| ≤ {p['max_abs_logit']:.0f})"
            )
        if "bf16_k_n" in r:
            b = r["bf16_k_n"]
            lines.append(
                f"  bfloat16 (naive, k=N): {b['naive_s']:.3f} s, {b['speedup_over_f32']:.2f}x "
                f"float32; {100 * b['predictions_changed']:.1f}% of predictions change"
            )
    if "eval" in results:
        r = results["eval"]
        lines += ["", f"evaluation (batch {r['batch']}; half policy Pr={r['pr']:.2f}):"]
        for name in ("predict_step", "masked_diverse", "skipping_diverse", "masked_uniform",
                     "skipping_uniform"):  # fmt: skip
            lines.append(f"  {name:<24} {r[name]['images_per_s']:>9.1f} images/s")
    if "latency" in results:
        r = results["latency"]
        lines += ["", f"batch-1 latency (policy {''.join(map(str, r['policy']))}, "
                  f"Pr={r['pr']:.2f}):"]  # fmt: skip
        lines.append(f"  {'':<24} {'fastest':>8} {'median':>8}")
        for name, ms in r["latency_ms"].items():
            lines.append(f"  {name:<24} {ms:>8.2f} {r['median_latency_ms'][name]:>8.2f} ms")
        g = r["gflops"]
        lines.append(
            f"  GFLOPs: full {g['full_resnet']:.3f}, recognizer under the policy "
            f"{g['recognizer_half']:.3f}, policy network {g['policy_network']:.3f}"
        )
        for key, label in (("recognizer_speedup", "recognizer"), ("m2net_speedup", "M²Net")):
            s = r[key]
            lines.append(
                f"  speedup over the full ResNet, {label:<10}: measured {s['measured']:.2f}x, "
                f"FLOPs-predicted {s['predicted']:.2f}x ({100 * s['fraction_of_predicted']:.0f}%)"
            )
    if "uniqueness" in results:
        r = results["uniqueness"]
        lines += ["", "uniqueness (Eqn 2; MB: what each must hold besides its input):"]
        lines.append(
            f"  {'M':>6} {'N':>3} {'counts ms':>10} {'counts MB':>10} {'pairwise ms':>12} "
            f"{'pairwise MB':>12}"
        )
        for row in r["rows"]:
            mb = lambda b: b / 2**20
            lines.append(
                f"  {row['M']:>6} {row['N']:>3} {_fmt(row['counts_ms'], 3):>10} "
                f"{_fmt(mb(row['counts_bytes']), 3):>10} {_fmt(row.get('pairwise_ms'), 1):>12} "
                f"{_fmt(mb(row['pairwise_bytes']), 1):>12}"
            )
    if "convs" in results:
        r = results["convs"]
        lines += [
            "",
            f"compact convs, forward + backward (batch {r['batch']}, {r['image_size']} px, "
            f"width {r['width']}), ms:",
            f"  {'':<20} {'ours':>8} {'grouped XLA':>12} {'dense':>8}",
        ]
        for case, row in r["cases"].items():
            ms = row["ms"]
            lines.append(
                f"  {case:<20} {ms['ours']:>8.2f} {_fmt(ms.get('feature_group_count'), 2):>12} "
                f"{ms['dense']:>8.2f}"
            )
    if "pipeline" in results:
        r = results["pipeline"]
        headroom = "" if r["headroom"] is None else f" ({r['headroom']:.1f}x the fastest step)"
        lines += [
            "",
            f"input pipeline ({r['dataset']}, batch {r['batch']}, in-process): "
            f"{r['images_per_s']:.0f} images/s{headroom}",
        ]
    lines.append(f"\ntotal {results['seconds']:.0f} s")
    return "\n".join(lines)


_SUITE = flags.DEFINE_enum("suite", "quick", sorted(SUITES), "Which sizes to run.")
_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Which parts to run, of {PARTS}.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of the pipeline part.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results = run(_SUITE.value, parts=tuple(_PARTS.value), data_dir=_DATA_DIR.value)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)
    print(format_table(results))


if __name__ == "__main__":
    app.run(main)
