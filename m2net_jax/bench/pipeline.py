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
    """Images/s the grain training pipeline delivers in this process, vs the model's use
    (`consumption`: the fastest train step's images/s, if measured)."""
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
