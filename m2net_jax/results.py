"""A workdir's results: `results.json` (one object per evaluated stage) and its printed table.

`{"pretrain": {...}, "policy": {...}, "finetune": {...}}`, each with `RESULT_KEYS` (accuracy,
Pr of Eqn 7, blocks used, policy diversity, FLOPs per image) and, on datasets with twin
landmarks, the mechanism metrics. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax

from m2net_jax.state import STAGES

RESULT_KEYS = (
    "accuracy",
    "pr",
    "blocks_mean",
    "blocks_std",
    "diversity",
    "flops_mean",
    "flops_std",
    "full_flops",
    "num_examples",
)


def results_path(workdir: str) -> str:
    return os.path.join(workdir, "results.json")


def read_results(workdir: str) -> dict[str, Any]:
    """The workdir's results by stage ({} when nothing was evaluated yet)."""
    path = results_path(workdir)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
    """Merges `results` (stage -> metrics) into workdir/results.json (process 0 only)."""
    if jax.process_index() != 0:
        return
    merged = {**read_results(workdir), **results}
    ordered = {s: merged[s] for s in STAGES if s in merged}
    os.makedirs(workdir, exist_ok=True)
    tmp = results_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ordered, f, indent=2)
    os.replace(tmp, results_path(workdir))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table of results: one row per stage (with the twin accuracy and the
    path-city mutual information in bits on datasets of twin landmarks)."""
    header = (
        f"{'stage':<10} {'accuracy':>8} {'Pr':>6} {'blocks':>13} {'diversity':>9} "
        f"{'GFLOPs/image':>17} {'full ResNet':>11} {'examples':>8}"
    )
    twins = any(r.get("twin_accuracy") is not None for r in results.values())
    if twins:
        header += f" {'twin acc':>8} {'path-city MI':>12}"
    lines = [header, "-" * len(header)]
    for stage, r in results.items():
        blocks = f"{r['blocks_mean']:.2f} ± {r['blocks_std']:.2f}"
        gflops = f"{r['flops_mean'] / 1e9:.4f} ± {r['flops_std'] / 1e9:.4f}"
        lines.append(
            f"{stage:<10} {r['accuracy']:>8.4f} {r['pr']:>6.3f} {blocks:>13} "
            f"{r['diversity']:>9d} {gflops:>17} {r['full_flops'] / 1e9:>11.4f} "
            f"{r['num_examples']:>8d}"
        )
        if twins:
            lines[-1] += f" {_number(r.get('twin_accuracy'), 8, 4)} "
            lines[-1] += f"{_number(r.get('path_city_mi_bits'), 12, 3)}"
    return "\n".join(lines)


def _number(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
