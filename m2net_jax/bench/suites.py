"""The benchmark suites' sizes, and the config and networks each one stands for.

A suite's networks, optimizers and penalties are those of `configs/base.py` with the suite's
sizes written over it (as a paper config imports and overrides base), so a changed default
reaches the benchmark too.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from m2net_jax import state
from m2net_jax.configs import base
from m2net_jax.models import PolicyNetwork, Recognizer


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
      pipeline_workers: the grain worker-process counts timed there (besides in-process).
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
    pipeline_workers: tuple[int, ...]


SUITES = {
    # Seconds: the machinery on a tiny model (tests run it).
    "smoke": Suite(
        depth=29,
        width=8,
        stem="small",
        image_size=32,
        num_classes=8,
        policy_width=8,
        train_batch=8,
        eval_batch=8,
        reps=2,
        latency_reps=3,
        curriculum=(1, 0),
        frozen_curriculum=(1, 0),
        bf16=False,
        uniqueness_sizes=(256, 1024),
        pairwise_max=1024,
        uniqueness_blocks=21,
        dataset="geo_twins/smoke",
        pipeline_batches=2,
        pipeline_workers=(1,),
    ),
    # A 2-core CPU in under 10 minutes: the architecture of m2net_jax/configs/r47.py:geo_twins
    # (ResNet-47, width 64, 32 px, small stems) at a CPU-sized batch.
    "quick": Suite(
        depth=47,
        width=64,
        stem="small",
        image_size=32,
        num_classes=32,
        policy_width=64,
        train_batch=16,
        eval_batch=32,
        reps=5,
        latency_reps=30,
        curriculum=(1, 0),
        frozen_curriculum=(1, 8, 0),
        bf16=False,
        uniqueness_sizes=(1024, 4096, 8192, 16384, 65536),
        pairwise_max=8192,
        uniqueness_blocks=21,
        dataset="geo_twins",
        pipeline_batches=20,
        pipeline_workers=(1, 4),
    ),
    # An accelerator: the paper's ResNet-47 at 224 px (policy at 112 px, ImageNet stems).
    "full": Suite(
        depth=47,
        width=64,
        stem="imagenet",
        image_size=224,
        num_classes=420,
        policy_width=64,
        train_batch=128,
        eval_batch=256,
        reps=20,
        latency_reps=200,
        curriculum=(1, 8, 0),
        frozen_curriculum=(1, 8, 0),
        bf16=True,
        uniqueness_sizes=(1024, 4096, 8192, 16384, 65536),
        pairwise_max=8192,
        uniqueness_blocks=21,
        dataset="geo_twins/224px",
        pipeline_batches=20,
        pipeline_workers=(1, 4, 16),
    ),
}


def suite_config(suite: Suite) -> ml_collections.ConfigDict:
    """`configs/base.py` with the suite's sizes: networks, image size, dataset and batches.

    Everything else (optimizers, schedules, penalties λ, entropy weights β, reward, sampling)
    stays as base declares it.
    """
    config = base.get_config()
    config.data.dataset = suite.dataset
    config.data.image_size = suite.image_size
    config.recognizer.update(depth=suite.depth, width=suite.width, stem=suite.stem)
    config.policy.update(width=suite.policy_width, stem=suite.stem)
    for stage in base.STAGES:
        config.stages[stage].batch_size = suite.train_batch
    config.eval.batch_size = suite.eval_batch
    return config


def models_for(suite: Suite, *, axis_name: str | None = None) -> tuple[Recognizer, PolicyNetwork]:
    """The suite's recognizer and policy network (`state.create_networks` of `suite_config`),
    with batch norm synced over `axis_name` (None: not synced, for use outside shard_map)."""
    networks = state.create_networks(suite_config(suite), suite.num_classes)
    return (
        networks.recognizer.clone(axis_name=axis_name),
        networks.policy.clone(axis_name=axis_name),
    )
