"""Benchmark of the compact backbones' convolutions (§4.4).

Forward + backward time of each conv as `models.layers` computes it (grouped as dense convs on
channel slices, depthwise as k² shifted products, HetConv as a grouped 3×3 plus a grouped 1×1)
vs `nn.Conv` with `feature_group_count`, and vs the dense conv each replaces, at the suite's
stage-1 sizes.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2net_jax.bench import timing
from m2net_jax.bench.suites import Suite
from m2net_jax.models import layers


def conv_cases(suite: Suite) -> dict[str, tuple[jax.Array, dict[str, nn.Module]]]:
    """Each compact conv's input and its implementations: ours, XLA's grouped conv, dense.

    Sizes: the stage-1 bottleneck of the suite's recognizer — its reducing 1×1 (4·width →
    width channels) and its 3×3 (width → width) on image_size² maps, a training batch.
    """
    w, hw, batch = suite.width, suite.image_size, suite.train_batch
    wide = jnp.ones((batch, hw, hw, 4 * w), jnp.float32)
    narrow = jnp.ones((batch, hw, hw, w), jnp.float32)
    return {
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


def bench_convs(suite: Suite) -> dict[str, Any]:
    """Forward + backward seconds of each compact conv: as computed here, with XLA's grouped
    convolution (`feature_group_count`), and the dense conv it stands in for."""
    rows = {}
    for case, (x, modules) in conv_cases(suite).items():
        calls = {}
        for name, module in modules.items():
            params = module.init(jax.random.key(0), x)

            def loss(params, x, module=module):
                return jnp.mean(jnp.square(module.apply(params, x)))

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            calls[name] = functools.partial(timing.blocking(step), params, x)
        times = timing.interleaved(calls, max(3, suite.reps))
        ms = {name: 1e3 * timing.median(t) for name, t in times.items()}
        rows[case] = {
            "ms": ms,
            "dense_over_ours": ms["dense"] / ms["ours"],
            "feature_group_count_over_ours": (
                ms["feature_group_count"] / ms["ours"] if "feature_group_count" in ms else None
            ),
        }
    return {
        "batch": suite.train_batch,
        "image_size": suite.image_size,
        "width": suite.width,
        "cases": rows,
    }
