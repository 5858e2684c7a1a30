"""Running a suite: each system trained and evaluated in its own workdir, resumably, with
pretraining shared where it is the same computation, then the report (`report.write_report`).

A system whose `results.json` holds its last stage is skipped (its recorded config must match);
an interrupted one resumes from its checkpoints. BlockDrop, M²Net, Remove-U and the penalty sweep
start from a copy of the suite's baseline pretrain checkpoint, each compatibility system from its
backbone's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from m2net_jax import checkpoint, results, train
from m2net_jax.experiments.report import system_seconds, write_report
from m2net_jax.experiments.suites import (
    SUITES,
    Suite,
    System,
    pretrain_source,
    suite_base_config,
    suite_systems,
    system_config,
)


def _has_checkpoint(workdir: str, stage: str) -> bool:
    directory = checkpoint.stage_directory(workdir, stage)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _share_pretrain(source_dir: str, target_dir: str) -> bool:
    """Copies the finished pretrain checkpoint of `source_dir` into `target_dir`.

    Returns whether `target_dir` now starts from it. False when the source has none (it ran 0
    epochs): the target then pretrains itself, the same way.
    """
    marker = os.path.join(target_dir, "shared_pretrain.json")
    if os.path.exists(marker):
        return True
    if "pretrain" not in results.read_results(source_dir) or not _has_checkpoint(
        source_dir, "pretrain"
    ):
        return False
    destination = checkpoint.stage_directory(target_dir, "pretrain")
    # Copy to a temporary name first, so an interrupted copy never looks like a checkpoint.
    partial = destination + ".copying"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(checkpoint.stage_directory(source_dir, "pretrain"), partial)
    os.replace(partial, destination)
    with open(marker, "w") as file:
        json.dump({"source": os.path.abspath(source_dir)}, file)
    return True


def _comparable(config: ml_collections.ConfigDict) -> dict[str, Any]:
    values = json.loads(config.to_json_best_effort())
    values["data"].pop("data_dir", None)  # Where the data lives does not change the system.
    values["stages"].pop("run", None)  # Shared stages are not re-run.
    return values


def run_system(
    suite: Suite,
    system: System,
    workdir: str,
    *,
    base_config: ml_collections.ConfigDict,
    systems_by_name: Mapping[str, System],
) -> dict[str, Any]:
    """Trains and evaluates one system in `workdir/<name>` (or skips it when it is finished).

    Returns its results.json contents.
    """
    system_dir = os.path.join(workdir, system.name)
    config = system_config(suite, system, base_config)
    source = None
    if system.shares_pretrain is not None:
        source, source_config = pretrain_source(suite, system, systems_by_name, base_config)
        config.stages.pretrain = source_config.stages.pretrain
    # A system directory belongs to one config: resuming or reusing it under another would mix
    # runs (a changed penalty, say, does not change any checkpoint's shapes).
    recorded_path = os.path.join(system_dir, "config.json")
    if os.path.exists(recorded_path):
        with open(recorded_path) as recorded:
            if json.load(recorded) != _comparable(config):
                raise ValueError(
                    f"{system_dir} was run with another config than suite {suite.name!r} now "
                    f"gives system {system.name!r}. Delete that directory to rerun it."
                )
        finished = results.read_results(system_dir)
        if system.final_stage in finished:
            logging.info("[%s] Finished before; skipping.", system.name)
            return finished
    os.makedirs(system_dir, exist_ok=True)
    with open(recorded_path, "w") as file:
        json.dump(_comparable(config), file, indent=1)
    stages = system.stages
    if source is not None and _share_pretrain(os.path.join(workdir, source.name), system_dir):
        stages = tuple(stage for stage in stages if stage != "pretrain")
    config.stages.run = ",".join(stages)
    logging.info("[%s] Running stages %s.", system.name, config.stages.run)
    start = time.time()
    train.train_and_evaluate(config, system_dir)
    elapsed = time.time() - start
    timing_path = os.path.join(system_dir, "timing.json")
    previous = system_seconds(workdir, system) or 0.0  # An interrupted earlier attempt.
    with open(timing_path, "w") as file:
        json.dump({"seconds": previous + elapsed, "stages": list(stages)}, file)
    return results.read_results(system_dir)


def run_suite(
    suite_name: str,
    workdir: str,
    *,
    base_config: ml_collections.ConfigDict | None = None,
    data_dir: str | None = None,
    only: Sequence[str] | None = None,
    report_only: bool = False,
    report_dir: str | None = None,
) -> str:
    """Runs a suite's systems (resuming, skipping finished ones) and writes its report.

    Args:
      suite_name: a key of `SUITES`.
      workdir: the suite's directory: one workdir per system, report.md, plots.
      base_config: replaces the suite's base config file.
      data_dir: TFDS data directory (`config.data.data_dir`).
      only: run just these systems (with the systems they share checkpoints with); the report
        covers whatever has finished.
      report_only: run nothing; rewrite the report from the finished systems.
      report_dir: where report.md and the plots go (default: `workdir`), e.g. `docs/geo_twins`.

    Returns:
      The path of report.md.
    """
    if suite_name not in SUITES:
        raise ValueError(f"Unknown suite {suite_name!r}; choose one of {sorted(SUITES)}.")
    suite = SUITES[suite_name]
    config_name = "the given config"
    if base_config is None:
        base_config = suite_base_config(suite)
        config_name = f"`{suite.config}`" + "".join(
            f", `{key}={value}`" for key, value in suite.overrides.items()
        )
    base_config = base_config.copy_and_resolve_references()
    if data_dir is not None:
        base_config.data.data_dir = data_dir
    systems = suite_systems(suite, base_config)
    by_name = {system.name: system for system in systems}
    selected = _with_sources(only, by_name) if only else [system.name for system in systems]
    os.makedirs(workdir, exist_ok=True)
    if not report_only:
        for system in systems:
            if system.name in selected:
                run_system(suite, system, workdir, base_config=base_config, systems_by_name=by_name)
    return write_report(
        suite,
        systems,
        workdir,
        base_config=base_config,
        config_name=config_name,
        report_dir=report_dir,
    )


def _with_sources(only: Sequence[str], by_name: Mapping[str, System]) -> set[str]:
    unknown = set(only) - set(by_name)
    if unknown:
        raise ValueError(f"Unknown systems {sorted(unknown)}; the suite has {sorted(by_name)}.")
    selected = set()
    for name in only:
        while name is not None and name not in selected:
            selected.add(name)
            name = by_name[name].shares_pretrain
    return selected
