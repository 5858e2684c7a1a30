"""Runs a suite's parts and gathers their results (what `--json` writes)."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

import jax
from absl import logging

from m2net_jax.bench.convs import bench_convs
from m2net_jax.bench.forward import bench_eval, bench_frozen, bench_latency
from m2net_jax.bench.pipeline import bench_pipeline
from m2net_jax.bench.suites import SUITES
from m2net_jax.bench.train_steps import bench_train
from m2net_jax.bench.uniqueness import bench_uniqueness

PARTS = ("train", "frozen", "eval", "latency", "uniqueness", "convs", "pipeline")


def device_info() -> dict[str, Any]:
    """The platform, device kind and count, CPU count, processor and JAX version."""
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
        "train": bench_train,
        "frozen": bench_frozen,
        "eval": bench_eval,
        "latency": bench_latency,
        "uniqueness": bench_uniqueness,
        "convs": bench_convs,
    }
    for part in PARTS:
        if part not in parts:
            continue
        logging.info("bench: %s ...", part)
        t0 = time.perf_counter()
        if part == "pipeline":
            # Measured against the fastest train step, if the train part ran first.
            steps = results.get("train", {}).get("steps", {})
            rates = [s["images_per_s"] for s in steps.values()]
            results[part] = bench_pipeline(
                suite, data_dir=data_dir, consumption=max(rates) if rates else None
            )
        else:
            results[part] = benches[part](suite)
        results[part]["seconds"] = time.perf_counter() - t0
    results["seconds"] = time.perf_counter() - start
    return results
