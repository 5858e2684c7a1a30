"""Benchmark of the input pipeline: images/s of the grain training pipeline vs what the
training steps consume.

The data stack (grain, TFDS) is imported only when this part runs, so the other parts run on a
machine without it.
"""

from __future__ import annotations

import time
from typing import Any

from m2net_jax.bench.suites import Suite


def bench_pipeline(
    suite: Suite, *, data_dir: str | None, consumption: float | None
) -> dict[str, Any]:
    """Images/s the grain training pipeline delivers, vs the model's use (`consumption`: the
    fastest train step's images/s, if measured).

    One row per source and worker count: the split read and decoded from disk by 0 (in this
    process), then each of `suite.pipeline_workers` worker processes, and served decoded from
    memory (`data.cache_in_memory_mb`, in this process). Worker start-up is left out: the first
    batches are not timed.
    """
    from m2net_jax.data import pipeline

    pipeline.ensure_built(suite.dataset, data_dir=data_dir, build_if_missing=True)
    cases = [("disk", w) for w in (0, *suite.pipeline_workers)] + [("memory", 0)]
    rows = []
    for source, workers in cases:
        it = pipeline.make_train_iterator(
            suite.dataset,
            data_dir=data_dir,
            image_size=suite.image_size,
            batch_size=suite.train_batch,
            seed=0,
            worker_count=workers,
            cache_in_memory_mb=1024 if source == "memory" else 0,
        )
        for _ in range(2 + workers):  # Warm-up: files, the first shuffle, workers' start.
            next(it)
        start = time.perf_counter()
        for _ in range(suite.pipeline_batches):
            next(it)
        seconds = time.perf_counter() - start
        rate = suite.pipeline_batches * suite.train_batch / seconds
        rows.append({"source": source, "worker_count": workers, "images_per_s": rate})
        del it  # Stops its worker processes before the next case starts its own.
    best = max(row["images_per_s"] for row in rows)
    return {
        "dataset": suite.dataset,
        "batch": suite.train_batch,
        "rows": rows,
        "model_images_per_s": consumption,
        "headroom": None if not consumption else best / consumption,
    }
