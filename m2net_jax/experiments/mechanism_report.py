"""The mechanism study's report: `report.md` and one figure, every number a mean over seeds with
its 95 % interval, and hypotheses H1–H5 judged against the intervals of their differences.

Each policy system (BlockDrop, M²Net, Remove-U, M²Net+) runs once per seed on each dataset
(`suites.MECHANISM_DATASETS`); the seeds vary its policy and finetune stages, which start from
one shared pretraining per dataset (the baseline's, or M²Net+'s own). A difference between two
systems is taken seed by seed (same pretraining, same seed), and its interval is Student's t
over the seeds. A verdict is *holds* when the interval lies on the claimed side, *fails* when it
lies on the other side, and *not shown* when it contains the null value — then the interval is
wider than the effect, and only a larger study could tell.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from m2net_jax.experiments.suites import (
    CONVERGENCE_CHECK,
    MECHANISM_DATASETS,
    MECHANISM_KINDS,
    PLATEAU_POINTS,
    System,
)

POLICY_KINDS = ("blockdrop", "m2net", "remove_u", "m2net_plus")
# (results key, column title, scale, format) of the per-system table.
COLUMNS = (
    ("accuracy", "accuracy %", 100, ".1f"),
    ("beyond_ceiling", "beyond image-only ceiling (points)", 100, "+.1f"),
    ("twin_accuracy", "twin accuracy %", 100, ".1f"),
    ("flops_ratio", "FLOPs / ResNet %", 100, ".1f"),
    ("pr", "Pr", 1, ".3f"),
    ("diversity", "diversity", 1, ".1f"),
    ("path_city_mi_bits", "path–city MI (bits)", 1, ".3f"),
    ("lookalike_paths_differ", "look-alike paths differ %", 100, ".1f"),
)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds and its 95 % t interval; `n` seeds (no interval for n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, scale: float = 1.0, fmt: str = ".3f") -> str:
        if self.n == 0:
            return "–"
        mean = format(self.mean * scale, fmt)
        if self.n < 2:
            return f"{mean} (1 run)"
        return f"{mean} [{format(self.low * scale, fmt)}, {format(self.high * scale, fmt)}]"


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % Student-t interval of per-seed values (NaN and None dropped)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    half = float(scipy.stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size))


def verdict(diff: Interval, *, greater_than: float = 0.0) -> str:
    """'holds' when the interval lies above `greater_than`, 'fails' when below, else 'not shown'."""
    if diff.n < 2:
        return "not shown (fewer than 2 seeds)"
    if diff.low > greater_than:
        return "holds"
    if diff.high < greater_than:
        return "fails"
    return "not shown (the interval contains the null value)"


def derived(result: Mapping[str, Any]) -> dict[str, Any]:
    """A system's results plus what the report compares: accuracy beyond its image-only ceiling,
    and its FLOPs per photo (policy network included) as a fraction of its full recognizer's."""
    out = dict(result)
    ceiling = result.get("image_only_ceiling")
    out["beyond_ceiling"] = None if ceiling is None else result["accuracy"] - ceiling
    out["flops_ratio"] = result["flops_mean"] / result["full_flops"]
    return out


class _Study:
    """The finished results by (kind, dataset tag, seed); seed None for the shared pretrainings."""

    def __init__(self, systems: Sequence[System], results: Mapping[str, dict | None]):
        self.seeds = sorted({s.seed for s in systems if s.seed is not None})
        self.by_key: dict[tuple, dict] = {}
        for system in systems:
            if results.get(system.name) is not None:
                self.by_key[(system.kind, system.dataset, system.seed)] = derived(
                    results[system.name]
                )

    def values(self, kind: str, tag: str, metric: str) -> list:
        """`metric` of each seed of a policy system (None where unfinished), or the baseline's
        one value."""
        if kind == "baseline":
            result = self.by_key.get((kind, tag, None))
            return [] if result is None else [result.get(metric)]
        return [self.by_key.get((kind, tag, s), {}).get(metric) for s in self.seeds]

    def paired(self, metric: str, tag: str, first: str, second: str) -> Interval:
        """Interval of first − second over the seeds both finished."""
        diffs = []
        for seed in self.seeds:
            a = self.by_key.get((first, tag, seed), {}).get(metric)
            b = self.by_key.get((second, tag, seed), {}).get(metric)
            if a is not None and b is not None:
                diffs.append(a - b)
        return interval(diffs)


def _both(*verdicts: str) -> str:
    """A claim made of parts holds when every part does and fails when any part fails."""
    if any(v.startswith("fails") for v in verdicts):
        return "fails"
    return "holds" if all(v == "holds" for v in verdicts) else "not shown"


def _not_above(diff: Interval) -> str:
    """'holds' unless the interval lies above 0 (the claim is "does not beat")."""
    v = verdict(diff)
    return v if diff.n < 2 else ("fails" if v == "holds" else "holds")


def _below(diff: Interval, bound: float) -> str:
    """'holds' when the interval lies below `bound`, 'fails' when above, else 'not shown'."""
    return verdict(Interval(-diff.mean, -diff.high, -diff.low, diff.n), greater_than=-bound)


def hypotheses(study: _Study) -> list[tuple[str, str, str]]:
    """(hypothesis, measured interval, verdict) for H1–H5."""
    m2net = interval(study.values("m2net", "identical", "beyond_ceiling"))
    blockdrop = interval(study.values("blockdrop", "identical", "beyond_ceiling"))
    h1 = (
        "H1: on identical twins, M²Net's accuracy beats the image-only ceiling; BlockDrop's "
        "does not",
        f"M²Net − ceiling {m2net.text(100, '+.2f')} points; BlockDrop − ceiling "
        f"{blockdrop.text(100, '+.2f')} points",
        _both(verdict(m2net), _not_above(blockdrop)),
    )
    acc = study.paired("accuracy", "cue", "m2net", "blockdrop")
    flops = study.paired("flops_mean", "cue", "m2net", "blockdrop")
    h2 = (
        "H2: M²Net is more accurate than BlockDrop at equal or fewer FLOPs (default cue)",
        f"accuracy {acc.text(100, '+.2f')} points; FLOPs {flops.text(1e-6, '+.2f')} MFLOPs",
        _both(verdict(acc), _not_above(flops)),
    )
    d1 = study.paired("diversity", "cue", "m2net", "remove_u")
    d2 = study.paired("diversity", "cue", "remove_u", "blockdrop")
    h3 = (
        "H3: diversity M²Net > Remove-U > Remove-MLP (Fig. 7, default cue)",
        f"M²Net − Remove-U {d1.text(1, '+.1f')}; Remove-U − Remove-MLP {d2.text(1, '+.1f')}",
        _both(verdict(d1), verdict(d2)),
    )
    saved = interval(
        [1.0 - r for r in study.values("m2net", "cue", "flops_ratio") if r is not None]
    )
    baseline = study.values("baseline", "cue", "accuracy")
    lost = interval(
        [baseline[0] - a for a in study.values("m2net", "cue", "accuracy") if a is not None]
        if baseline and baseline[0] is not None
        else []
    )
    h4 = (
        "H4: M²Net saves ≥ 30 % of the ResNet's FLOPs within 1 point of its accuracy",
        f"FLOPs saved {saved.text(100, '.1f')} %; accuracy lost {lost.text(100, '+.2f')} points",
        _both(verdict(saved, greater_than=0.3), _below(lost, 0.01)),
    )
    mi = study.paired("path_city_mi_bits", "cue", "m2net", "blockdrop")
    h5 = (
        "H5: path–city mutual information of M²Net > BlockDrop's (default cue)",
        f"difference {mi.text(1, '+.3f')} bits",
        verdict(mi),
    )
    return [h1, h2, h3, h4, h5]


def mechanism_sections(
    systems: Sequence[System], results: Mapping[str, dict | None], report_dir: str
) -> list[str]:
    """The report's tables, figure and hypotheses as markdown lines (the figure written too)."""
    study = _Study(systems, results)
    lines = [
        f"Seeds {study.seeds} vary the policy and finetune stages; each dataset's recognizer is "
        "pretrained once (seed 0) and shared by every seed, so the baseline and M²Net+'s "
        "pretraining are single runs. Cells: mean [95 % t interval over seeds].",
        "",
    ]
    for tag, (dataset, label) in MECHANISM_DATASETS.items():
        lines += [f"## {label} (`{dataset}`)", ""]
        header = ["system", "seeds"] + [title for _, title, _, _ in COLUMNS]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for kind in ("baseline", *POLICY_KINDS):
            cells = [MECHANISM_KINDS[kind][0]]
            stats = [interval(study.values(kind, tag, key)) for key, _, _, _ in COLUMNS]
            cells.append(str(max(s.n for s in stats)))
            cells += [
                s.text(scale, fmt) for s, (_, _, scale, fmt) in zip(stats, COLUMNS, strict=True)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    figure = "mechanism_metrics.png"
    os.makedirs(report_dir, exist_ok=True)
    plot_intervals(study, os.path.join(report_dir, figure))
    lines += [f"![Mean and 95 % interval over seeds per system and dataset]({figure})", ""]
    lines += ["## Hypotheses", "", "| hypothesis | measured | verdict |", "|---|---|---|"]
    lines += [f"| {h} | {m} | {v} |" for h, m, v in hypotheses(study)]
    check = next((s for s in systems if s.name == CONVERGENCE_CHECK), None)
    return lines + [""] + ([] if check is None else convergence_lines(study, check.label))


def convergence_lines(study: _Study, label: str) -> list[str]:
    """Is the baseline on its plateau? Its accuracy against the same recognizer pretrained twice
    as long (one run each; the check passes within `PLATEAU_POINTS`)."""
    [base] = study.values("baseline", "cue", "accuracy") or [None]
    longer = study.by_key.get(("baseline_x2", "cue", None), {}).get("accuracy")
    if base is None or longer is None:
        cue = "Default cue: not finished (needs the baseline and the longer run)."
    else:
        gain = 100 * (longer - base)
        if gain <= PLATEAU_POINTS:
            outcome = f"within {PLATEAU_POINTS:g} points: the baseline is on its plateau"
        else:
            outcome = (
                f"more than {PLATEAU_POINTS:g} points: the baseline is **not** on its plateau, "
                "and the study's comparisons are of under-trained recognizers"
            )
        cue = (
            f"Baseline ResNet on the default cue: {100 * base:.1f} %; {label}: "
            f"{100 * longer:.1f} % ({gain:+.1f} points, {outcome})."
        )
    return ["## Convergence check", "", cue, "", *_identical_bound_lines(study)]


def _identical_bound_lines(study: _Study) -> list[str]:
    """On identical twins no longer run is needed: an image-only system's accuracy is at most
    its image-only ceiling with every archetype right, ceiling ÷ archetype accuracy."""
    result = study.by_key.get(("baseline", "identical", None))
    if not result or not result.get("archetype_accuracy"):
        return []
    bound = result["image_only_ceiling"] / result["archetype_accuracy"]
    gap = 100 * (bound - result["accuracy"])
    within = "within" if gap <= PLATEAU_POINTS else "more than"
    return [
        f"Baseline ResNet on identical twins: {100 * result['accuracy']:.1f} %, where no "
        f"image-only system can exceed {100 * bound:.1f} % (every archetype right, one twin city "
        f"guessed among its archetype's): {gap:.1f} points below, {within} {PLATEAU_POINTS:g} "
        "points of what any longer training could reach.",
        "",
    ]


def plot_intervals(study: _Study, path: str) -> None:
    """Bars of the mean with 95 % interval whiskers: accuracy, accuracy beyond the image-only
    ceiling, path–city MI and diversity, per system, one colour per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [COLUMNS[0], COLUMNS[1], COLUMNS[6], COLUMNS[5]]
    kinds = ("baseline", *POLICY_KINDS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    width = 0.8 / len(MECHANISM_DATASETS)
    for ax, (key, title, scale, _) in zip(axes, metrics, strict=True):
        for d, (tag, (_, label)) in enumerate(MECHANISM_DATASETS.items()):
            stats = [interval(study.values(kind, tag, key)) for kind in kinds]
            x = np.arange(len(kinds)) + (d - (len(MECHANISM_DATASETS) - 1) / 2) * width
            mean = np.array([s.mean for s in stats]) * scale
            err = (
                np.array(
                    [[s.mean - s.low, s.high - s.mean] if s.n >= 2 else [0, 0] for s in stats]
                ).T
                * scale
            )
            ax.bar(x, np.nan_to_num(mean), width, yerr=err, capsize=3, label=label)
        ax.set_xticks(
            np.arange(len(kinds)),
            [MECHANISM_KINDS[k][0].split(" (")[0] for k in kinds],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
