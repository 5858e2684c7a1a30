"""Timing of the benchmarks: repetitions run interleaved, reported as medians.

Everything that is compared is measured side by side in one run, interleaved (A, B, A, B, ...),
so that a shared or throttling machine skews both sides alike; ratios are more trustworthy than
absolute numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def interleaved(calls: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
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


def median(values) -> float:
    """The median of `values`, as a float (JSON-serialisable)."""
    return float(statistics.median(values))


def blocking(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` that returns only once its result is computed (JAX dispatches asynchronously)."""
    return lambda *args: jax.block_until_ready(fn(*args))
