"""The report's plots (matplotlib, no display needed): Fig. 9 accuracy against FLOPs, Figs. 7
and 10 diversity and accuracy against Pr across penalties, Fig. 11 M²Net on compact backbones,
and Fig. 5 the paths chosen for look-alike landmarks.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from m2net_jax.experiments.suites import POLICY_SYSTEMS

_GROUP_MARKERS = {
    "baseline": ("s", "tab:gray"),
    "compact": ("^", "tab:purple"),
    "policy": ("o", None),
    "compatibility": ("D", "tab:brown"),
    "plus": ("*", "tab:cyan"),
}


def plot_accuracy_vs_flops(systems, results, scale, unit, path) -> None:
    """Fig. 9: each finished system's test accuracy against its FLOPs per photo (± std).

    `results`: system name → its final stage's results; `scale`, `unit`: e.g. 1e6, 'MFLOPs'.
    """
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for system in systems:
        result = results[system.name]
        marker, colour = _GROUP_MARKERS[system.group]
        colour = colour or POLICY_SYSTEMS[system.kind][3]
        flops, accuracy = result["flops_mean"] / scale, 100 * result["accuracy"]
        ax.errorbar(
            flops,
            accuracy,
            xerr=result["flops_std"] / scale,
            fmt=marker,
            color=colour,
            capsize=3,
            markersize=7,
        )
        ax.annotate(
            system.label.split(" (")[0],
            (flops, accuracy),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.set_xlabel(f"{unit} per photo (mean ± std over the test split)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fig. 9: accuracy against computation")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_sweep(rows, results, configs, report_dir) -> None:
    """Figs. 7 and 10: diversity and accuracy against Pr, one line per policy system, a point
    per penalty λ. `rows`: the sweep's finished systems; `configs`: system name → config."""
    for key, ylabel, title, filename in (
        (
            "diversity",
            "policy diversity (distinct policies)",
            "Fig. 7: policy diversity",
            "fig7_diversity_vs_pr.png",
        ),
        (
            "accuracy",
            "test accuracy (%)",
            "Fig. 10: accuracy against Pr",
            "fig10_accuracy_vs_pr.png",
        ),
    ):
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for kind, (_, name, _, colour) in POLICY_SYSTEMS.items():
            points = sorted(
                (
                    (results[system.name]["pr"], results[system.name][key], system)
                    for system in rows
                    if system.kind == kind
                ),
                key=lambda point: point[0],
            )
            if not points:
                continue
            pr = [point_pr for point_pr, _, _ in points]
            factor = 100 if key == "accuracy" else 1
            values = [value * factor for _, value, _ in points]
            ax.plot(pr, values, "o-", color=colour, label=name)
            for point_pr, value, (_, _, system) in zip(pr, values, points, strict=True):
                penalty = configs[system.name].stages.finetune.penalty
                ax.annotate(
                    f"λ={penalty:g}",
                    (point_pr, value),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                )
        ax.set_xlabel("Pr (fraction of blocks run)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(os.path.join(report_dir, filename), dpi=120)


def plot_compatibility(pairs, scale, unit, path) -> None:
    """Fig. 11: accuracy and FLOPs of each compact backbone alone and with M²Net's policy.

    `pairs`: (backbone label, results alone, results with M²Net) per backbone.
    """
    fig = Figure(figsize=(9, 4), layout="constrained")
    accuracy_axes, cost_axes = fig.subplots(1, 2)
    positions = np.arange(len(pairs))
    names = [name for name, _, _ in pairs]
    for ax, key, factor, ylabel in (
        (accuracy_axes, "accuracy", 100.0, "test accuracy (%)"),
        (cost_axes, "flops_mean", 1.0 / scale, f"{unit} per photo"),
    ):
        before = [alone[key] * factor for _, alone, _ in pairs]
        after = [with_m2net[key] * factor for _, _, with_m2net in pairs]
        ax.bar(positions - 0.2, before, 0.4, label="backbone alone", color="tab:gray")
        ax.bar(positions + 0.2, after, 0.4, label="with M²Net", color="tab:orange")
        ax.set_xticks(positions, names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 11: M²Net on compact backbones")
    fig.savefig(path, dpi=120)


def plot_paths(panels, path) -> None:
    """Fig. 5, one column per panel: the photos (left) and the blocks their policy runs (dark =
    run). `panels`: (title, batch with 'image' and 'names', paths (E, N) bool or None)."""
    fig = Figure(
        figsize=(4.2 * max(1, len(panels)), 0.5 + 0.45 * _max_rows(panels)), layout="constrained"
    )
    if not panels:
        fig.text(0.5, 0.5, "No archetype/city features in this dataset.", ha="center")
    grid = fig.add_gridspec(1, 2 * max(1, len(panels)), width_ratios=[1, 4] * max(1, len(panels)))
    for column, (title, batch, paths) in enumerate(panels):
        photos = fig.add_subplot(grid[0, 2 * column])
        blocks = fig.add_subplot(grid[0, 2 * column + 1])
        rows = len(batch["names"])
        photos.imshow(
            np.concatenate(list(batch["image"]), axis=0),
            extent=(0, 1, rows - 0.5, -0.5),
            aspect="auto",
        )
        photos.set_xticks([])
        photos.set_yticks(range(rows), batch["names"], fontsize=7)
        if paths is None:
            blocks.text(
                0.5,
                0.5,
                "no trained policy\n(0 policy epochs)",
                ha="center",
                va="center",
                transform=blocks.transAxes,
            )
            blocks.set_xticks([])
            blocks.set_yticks([])
        else:
            blocks.imshow(paths, cmap="Greys", vmin=0, vmax=1.6, aspect="auto")
            blocks.set_yticks([])
            blocks.set_xticks(range(paths.shape[1]))
            # White lines between cells, so that single blocks can be counted.
            blocks.set_xticks(np.arange(paths.shape[1] + 1) - 0.5, minor=True)
            blocks.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
            blocks.grid(which="minor", color="white", linewidth=1.5)
            blocks.tick_params(which="minor", length=0)
            blocks.tick_params(labelsize=6)
            blocks.set_xlabel("block")
        blocks.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120)


def _max_rows(panels) -> int:
    return max([len(batch["names"]) for _, batch, _ in panels] or [2])
