"""Benchmark of Eqn 2 (uniqueness) at M up to 65,536, N = 21.

`policy_gradient.uniqueness` (O(M·N): per-block counts) vs the pairwise definition (an M×M
Hamming matrix), time and XLA's memory estimate.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2net_jax import policy_gradient as pg
from m2net_jax.bench import timing
from m2net_jax.bench.suites import Suite


def pairwise_uniqueness(policies: jax.Array) -> jax.Array:
    """Eqn 2 by its definition: the M×M normalised Hamming matrix, averaged over rows."""
    p = policies.astype(jnp.float32)
    hamming = p @ (1.0 - p).T + (1.0 - p) @ p.T  # (M, M): blocks where i runs and j not, or j, i.
    return jnp.mean(hamming, axis=1) / p.shape[1]


def memory_bytes(compiled) -> int | None:
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
        calls = {
            name: functools.partial(timing.blocking(c), policies) for name, c in compiled.items()
        }
        times = timing.interleaved(calls, max(3, suite.reps))
        # What each formulation must hold besides its input: the definition's M×M Hamming
        # matrix, or the N counts and the M results. XLA may avoid materialising the matrix by
        # fusing it into the reduction (XLA:CPU does, and then runs it as a slow loop), so its
        # own estimate is reported next to it.
        row = {"M": m, "N": n, "counts_bytes": 4 * (n + m), "pairwise_bytes": 4 * (m * m + m)}
        for name, c in compiled.items():
            row[f"{name}_ms"] = 1e3 * timing.median(times[name])
            row[f"{name}_xla_bytes"] = memory_bytes(c)
        if "pairwise" in compiled:
            diff = np.abs(np.asarray(compiled["counts"](policies) - compiled["pairwise"](policies)))
            row["max_difference"] = float(diff.max())
        rows.append(row)
    return {"rows": rows, "pairwise_max": suite.pairwise_max}
