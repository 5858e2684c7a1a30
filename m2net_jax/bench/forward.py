"""Benchmarks of the forwards: the policy stage's frozen recognizer, evaluation, batch-1 latency.

- frozen: the policy stage's frozen-recognizer work alone (no policy network, no backward):
  two masked forwards vs `fast_forward.frozen_logits`, per curriculum k, with the logits'
  largest difference.
- eval: images/s of evaluation's predict step, and of the masked vs the block-skipping batched
  forward under diverse per-photo policies and under one policy shared by the batch.
- latency: batch-1 latency of the full ResNet vs M²Net with a fixed policy that keeps about
  half of the blocks (every other block: Pr = ⌈N/2⌉/N), with the FLOPs-predicted speedup
  (§4.2, Fig. 9).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2net_jax import fast_forward, state
from m2net_jax import flops as flops_lib
from m2net_jax import policy_gradient as pg
from m2net_jax import steps as steps_lib
from m2net_jax.bench import timing
from m2net_jax.bench.inputs import both_variables, half_policy, random_batch
from m2net_jax.bench.suites import Suite, models_for


def stage_policies(n: int, k: int, batch: int, seed: int = 0):
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
    rec_vars = state.network_variables(variables, "recognizer")
    images = jax.device_put(random_batch(suite, suite.train_batch, seed=3)["image"])
    n = rec.num_blocks
    naive = jax.jit(lambda v, x, g, s: fast_forward.naive_frozen_logits(rec, v, x, g, s))
    shared = jax.jit(lambda v, x, g, s: fast_forward.frozen_logits(rec, v, x, g, s))
    ks = sorted({n if k == 0 else min(k, n) for k in suite.frozen_curriculum})
    calls, policies, results = {}, {}, {}
    for k in ks:
        greedy, sampled = policies[k] = stage_policies(n, k, suite.train_batch, seed=k)
        args = (rec_vars, images, greedy, sampled)
        calls[f"naive_k{k}"] = functools.partial(timing.blocking(naive), *args)
        calls[f"shared_k{k}"] = functools.partial(timing.blocking(shared), *args)
    functions = {"naive": naive, "shared": shared}
    if suite.bf16:
        rec16 = rec.clone(dtype=jnp.bfloat16)
        functions["naive_bf16"] = jax.jit(
            lambda v, x, g, s: fast_forward.naive_frozen_logits(rec16, v, x, g, s)
        )
        calls["naive_bf16"] = functools.partial(
            timing.blocking(functions["naive_bf16"]), rec_vars, images, *policies[n]
        )
    compile_s = {}
    for name, fn in functions.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(rec_vars, images, *policies[ks[0]]))
        compile_s[name] = time.perf_counter() - start
    times = timing.interleaved(calls, suite.reps)
    median = {name: timing.median(t) for name, t in times.items()}
    for k in ks:
        greedy, sampled = policies[k]
        a = naive(rec_vars, images, greedy, sampled)
        b = shared(rec_vars, images, greedy, sampled)
        agree = np.asarray(jnp.all(greedy == sampled, axis=0))
        results[f"k{k}"] = {
            "k": k,
            "shared_prefix": int(np.cumprod(agree).sum()),
            "naive_s": median[f"naive_k{k}"],
            "shared_s": median[f"shared_k{k}"],
            "speedup": median[f"naive_k{k}"] / median[f"shared_k{k}"],
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
            "naive_s": median["naive_bf16"],
            "speedup_over_f32": median[f"naive_k{n}"] / median["naive_bf16"],
            "predictions_changed": float(np.mean(changed)),
        }
    return result


def bench_eval(suite: Suite) -> dict[str, Any]:
    """Images/s of evaluation's predict step, and masked vs skipping batched forwards."""
    mesh = steps_lib.make_mesh()
    rec, pol = models_for(suite, axis_name=state.AXIS)
    models = state.Networks(recognizer=rec, policy=pol)
    variables = steps_lib.replicate(both_variables(suite, rec, pol), mesh)
    host_batch = random_batch(suite, suite.eval_batch, seed=1)
    batch = steps_lib.shard_batch(host_batch, mesh)
    predict = steps_lib.make_predict_step(models, mesh, use_policy=True)

    plain = rec.clone(axis_name=None)
    device = jax.devices()[0]
    rec_vars = jax.device_put(state.network_variables(variables, "recognizer"), device)
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
    times = timing.interleaved(calls, max(2, suite.reps // 2))
    result = {
        name: {"batch_s": timing.median(t), "images_per_s": suite.eval_batch / timing.median(t)}
        for name, t in times.items()
    }
    return {
        "batch": suite.eval_batch,
        "pr": float(half_policy(n).mean()),
        "blocks_no_photo_uses_diverse": int((diverse.sum(0) == 0).sum()),
        **result,
    }


def bench_latency(suite: Suite) -> dict[str, Any]:
    """Batch-1 latency: full ResNet vs M²Net with a fixed half policy, with predicted speedups."""
    rec, pol = models_for(suite)
    variables = both_variables(suite, rec, pol)
    rec_vars = state.network_variables(variables, "recognizer")
    pol_vars = state.network_variables(variables, "policy")
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
    times = timing.interleaved(calls, suite.latency_reps)
    # The fastest of many runs: a shared machine only ever adds time to a run.
    latency_ms = {name: 1e3 * min(t) for name, t in times.items()}
    median_ms = {name: 1e3 * timing.median(t) for name, t in times.items()}
    return {
        "policy": fixed_host[0].astype(int).tolist(),
        "pr": float(fixed_host.mean()),
        "latency_ms": latency_ms,
        "median_latency_ms": median_ms,
        **_speedups(suite, rec, pol, fixed_host[0], latency_ms),
    }


def _speedups(suite: Suite, rec, pol, policy: np.ndarray, latency_ms) -> dict[str, Any]:
    """GFLOPs of the full ResNet, of the recognizer under `policy` and of the policy network,
    and the measured speedups over the full ResNet next to those the FLOPs predict."""
    parts = rec.flops(suite.image_size)
    policy_flops = flops_lib.policy_network_flops(
        num_blocks=rec.num_blocks, image_size=suite.image_size // 2, width=pol.width, stem=pol.stem
    )
    half_flops = float(flops_lib.flops_per_image(policy, parts))
    predicted_rec = parts.full / half_flops
    predicted_m2net = parts.full / (half_flops + policy_flops)
    measured_rec = latency_ms["full_resnet"] / latency_ms["skipping_half"]
    measured_m2net = latency_ms["full_resnet"] / latency_ms["m2net_half"]
    return {
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
