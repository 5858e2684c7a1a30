"""The suite's report: `report.md` with Table 3, Figs. 7, 9, 10, 11 and 5 (§4.2–4.4) from the
finished systems' `results.json`, and the paper's claims checked on them with noise margins.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from m2net_jax import policy_gradient as pg
from m2net_jax import results as results_lib
from m2net_jax.experiments import figures
from m2net_jax.experiments.mechanism_report import mechanism_sections
from m2net_jax.experiments.suites import (
    COMPACT_BACKBONES,
    POLICY_SYSTEMS,
    Suite,
    System,
    system_config,
)
from m2net_jax.experiments.twins import greedy_paths, twin_examples


def system_seconds(workdir: str, system: System) -> float | None:
    """The training and evaluation seconds recorded in the system's `timing.json`, or None."""
    path = os.path.join(workdir, system.name, "timing.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file).get("seconds")


def final_results(workdir: str, system: System) -> dict[str, Any] | None:
    """The results of the system's last stage, or None when it has not finished."""
    return results_lib.read_results(os.path.join(workdir, system.name)).get(system.final_stage)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What every section of the report reads.

    Attributes:
      results: system name → its final stage's results, None while it is unfinished.
      configs: system name → its full config.
      scale, unit: FLOPs are reported divided by `scale`, in `unit` (e.g. 1e6, 'MFLOPs').
    """

    suite: Suite
    systems: Sequence[System]
    workdir: str
    report_dir: str
    results: Mapping[str, dict[str, Any] | None]
    configs: Mapping[str, ml_collections.ConfigDict]
    scale: float
    unit: str

    def finished(self, systems: Sequence[System]) -> list[System]:
        return [system for system in systems if self.results[system.name] is not None]


def write_report(
    suite: Suite,
    systems: Sequence[System],
    workdir: str,
    *,
    base_config,
    config_name: str,
    report_dir: str | None = None,
) -> str:
    """Writes report.md and the figures from the finished systems' results.json.

    They go to `report_dir` (default `workdir`); the plots are named in the report relative to it.
    """
    report_dir = report_dir or workdir
    os.makedirs(report_dir, exist_ok=True)
    results_by_name = {system.name: final_results(workdir, system) for system in systems}
    done = [system for system in systems if results_by_name[system.name] is not None]
    scale, unit = _flops_unit([results_by_name[system.name]["full_flops"] for system in done])
    inputs = _Inputs(
        suite=suite,
        systems=systems,
        workdir=workdir,
        report_dir=report_dir,
        results=results_by_name,
        configs={system.name: system_config(suite, system, base_config) for system in systems},
        scale=scale,
        unit=unit,
    )
    lines = _preamble(inputs, base_config, config_name)
    if suite.kind == "mechanism":
        lines += mechanism_sections(systems, results_by_name, report_dir)
    else:
        lines += _table3_section(inputs)
        lines += _sweep_section(inputs)
        lines += _compatibility_section(inputs)
        lines += ["## Fig. 5: paths chosen for look-alike landmarks", ""]
        lines += _figure5_section(inputs)
        lines += ["", "## Claims of the paper on this suite", ""]
        lines += _claims(systems, results_by_name, inputs.configs)
    total = sum(filter(None, (system_seconds(workdir, system) for system in systems)))
    lines += ["", f"Total training and evaluation time: {total / 60:.1f} minutes.", ""]
    path = os.path.join(report_dir, "report.md")
    with open(path, "w") as file:
        file.write("\n".join(lines))
    logging.info("Wrote %s", path)
    return path


def _flops_unit(values) -> tuple[float, str]:
    top = max([value for value in values if value] or [1.0])
    return (1e9, "GFLOPs") if top >= 1e9 else (1e6, "MFLOPs")


def _policy_text(config) -> str:
    return "image + location" if config.policy.use_geo else "image"


def _recognizer_text(config) -> str:
    text = f"R{config.recognizer.depth}"
    if config.recognizer.conv_type != "standard":
        text += (
            f" {COMPACT_BACKBONES.get(config.recognizer.conv_type, config.recognizer.conv_type)}"
        )
    if config.recognizer.geo_conditioning:
        text += " + location"
    return text


def _markdown_table(header, rows) -> list[str]:
    rows = [row for row in rows if row is not None]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return out


def _preamble(inputs: _Inputs, base_config, config_name: str) -> list[str]:
    """Title, how the report was made, what the columns mean, and which systems are missing."""
    suite, workdir, unit = inputs.suite, inputs.workdir, inputs.unit
    command = f"python -m m2net_jax.experiments --suite={suite.name} --workdir={workdir}"
    if inputs.report_dir != workdir:
        command += f" --report_dir={inputs.report_dir}"
    lines = [
        f"# M²Net comparisons: suite `{suite.name}`",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} "
        f"({jax.device_count()} × {jax.devices()[0].device_kind}, on a host with "
        f"{os.cpu_count()} CPU cores). "
        f"Base config {config_name}: {suite.description}",
        "",
        _conventions(suite, base_config, unit),
        "",
    ]
    if suite.trained is not None:
        lines += [
            f"**Reduced suite:** only {', '.join(suite.trained)} train; every other system "
            "runs 0 epochs and is evaluated where it starts.",
            "",
        ]
    missing = [system.name for system in inputs.systems if inputs.results[system.name] is None]
    if missing:
        lines += [f"Not finished (no results yet): {', '.join(missing)}.", ""]
    return lines


def _conventions(suite: Suite, base_config, unit: str) -> str:
    """What the report's columns mean."""
    paper = suite.kind != "mechanism"
    dataset = f"Dataset `{base_config.data.dataset}`" if paper else "Datasets: the two below"
    text = (
        f"{dataset} at {base_config.data.image_size} px; accuracy is top-1 on the test split with "
        "the greedy policy. FLOPs per photo include the policy network (as the evaluation counts "
        f"them), in {unit}. Pr = mean fraction of blocks run (Eqn 7); diversity = distinct "
        "policies over the test split."
    )
    if paper:
        text += (
            " Minutes: the system's own training and evaluation (a shared pretraining counts "
            "once, for the system that ran it)."
        )
    return text


def _table_header(unit: str) -> list[str]:
    return [
        "System",
        "Recognizer",
        "Policy input",
        "Reward",
        "λ (finetune)",
        "Accuracy",
        "Pr",
        "Blocks",
        "Diversity",
        f"{unit} / photo",
        f"{unit}, all blocks",
        "Minutes",
    ]


def _system_cells(inputs: _Inputs, system: System) -> list[str] | None:
    """One system's row of Table 3 or the sweep table; None when it has not finished."""
    result, config = inputs.results[system.name], inputs.configs[system.name]
    if result is None:
        return None
    scale = inputs.scale
    policy = "—" if system.final_stage == "pretrain" else _policy_text(config)
    reward = "—" if policy == "—" else f"θ_d={config.reward.theta_d:g}"
    penalty = "—" if policy == "—" else f"{config.stages.finetune.penalty:g}"
    seconds = system_seconds(inputs.workdir, system)
    return [
        system.label,
        _recognizer_text(config),
        policy,
        reward,
        penalty,
        f"{100 * result['accuracy']:.2f}%",
        f"{result['pr']:.3f}",
        f"{result['blocks_mean']:.2f} ± {result['blocks_std']:.2f}",
        f"{result['diversity']:d}",
        f"{result['flops_mean'] / scale:.3f} ± {result['flops_std'] / scale:.3f}",
        f"{result['full_flops'] / scale:.3f}",
        "—" if seconds is None else f"{seconds / 60:.1f}",
    ]


def _table3_section(inputs: _Inputs) -> list[str]:
    """Table 3 (every system but the sweep) and Fig. 9."""
    main = inputs.finished([system for system in inputs.systems if system.group != "sweep"])
    lines = ["## Table 3: accuracy of every system", ""]
    lines += _markdown_table(
        _table_header(inputs.unit), [_system_cells(inputs, system) for system in main]
    )
    lines += ["", "![Fig. 9](fig9_accuracy_vs_flops.png)", ""]
    figures.plot_accuracy_vs_flops(
        main,
        inputs.results,
        inputs.scale,
        inputs.unit,
        os.path.join(inputs.report_dir, "fig9_accuracy_vs_flops.png"),
    )
    return lines


def _sweep_section(inputs: _Inputs) -> list[str]:
    """The policy systems across penalties λ: their table, Figs. 7 and 10."""
    scales = ", ".join(f"{penalty_scale:g}" for penalty_scale in inputs.suite.penalty_scales)
    lines = [
        "## Figs. 7 and 10: diversity and accuracy against Pr across penalties",
        "",
        "M²Net, Remove-MLP (BlockDrop) and Remove-U, each at the suite's penalties (×1) and at "
        f"λ × {scales} (policy and finetune stages).",
        "",
    ]
    sweep = [system for system in inputs.systems if system.group in ("sweep", "policy")]
    sweep_rows = sorted(
        inputs.finished(sweep),
        key=lambda system: (list(POLICY_SYSTEMS).index(system.kind), system.penalty_scale),
    )
    lines += _markdown_table(
        _table_header(inputs.unit), [_system_cells(inputs, system) for system in sweep_rows]
    )
    lines += ["", "![Fig. 7](fig7_diversity_vs_pr.png) ![Fig. 10](fig10_accuracy_vs_pr.png)", ""]
    figures.plot_sweep(sweep_rows, inputs.results, inputs.configs, inputs.report_dir)
    return lines


def _compatibility_section(inputs: _Inputs) -> list[str]:
    """Fig. 11: each compact backbone alone and with M²Net's policy."""
    scale, unit = inputs.scale, inputs.unit
    lines = ["## Fig. 11: compatibility — M²Net on compact backbones", ""]
    header = [
        "Backbone",
        "Accuracy before",
        "Accuracy after",
        f"{unit} before",
        f"{unit} after",
        "FLOPs change",
    ]
    rows, pairs = [], []
    for system in inputs.systems:
        if system.group != "compatibility":
            continue
        before, after = inputs.results[system.backbone], inputs.results[system.name]
        if before is None or after is None:
            continue
        pairs.append((COMPACT_BACKBONES[system.backbone], before, after))
        rows.append(
            [
                COMPACT_BACKBONES[system.backbone],
                f"{100 * before['accuracy']:.2f}%",
                f"{100 * after['accuracy']:.2f}%",
                f"{before['flops_mean'] / scale:.3f}",
                f"{after['flops_mean'] / scale:.3f} ± {after['flops_std'] / scale:.3f}",
                f"{100 * (after['flops_mean'] / before['flops_mean'] - 1):+.1f}%",
            ]
        )
    lines += _markdown_table(header, rows)
    lines += ["", "![Fig. 11](fig11_compatibility.png)", ""]
    figures.plot_compatibility(
        pairs, scale, unit, os.path.join(inputs.report_dir, "fig11_compatibility.png")
    )
    return lines


def _figure5_section(inputs: _Inputs) -> list[str]:
    """Fig. 5: the paths M²Net and BlockDrop choose for look-alike landmarks."""
    path = os.path.join(inputs.report_dir, "fig5_twin_paths.png")
    m2net = next(system for system in inputs.systems if system.name == "m2net")
    blockdrop = next(system for system in inputs.systems if system.name == "blockdrop")
    config = inputs.configs[m2net.name]
    examples = twin_examples(config, per_class=inputs.suite.twins_per_class)
    panels = []
    if examples is not None:
        for system, key, title in (
            (m2net, "same_city", f"(a) M²Net: one city ({examples['city']}), different landmarks"),
            (m2net, "twins", f"(b) M²Net: look-alike {examples['archetype']}s, different cities"),
            (blockdrop, "twins", "(c) BlockDrop (no location): the same look-alikes"),
        ):
            paths = None
            if inputs.results[system.name] is not None:
                paths = greedy_paths(
                    os.path.join(inputs.workdir, system.name),
                    inputs.configs[system.name],
                    examples[key],
                )
            panels.append((title, examples[key], paths))
    figures.plot_paths(panels, path)
    if examples is None:
        return [f"`{config.data.dataset}` has no archetype/city features; no Fig. 5 picture."]
    lines = []
    for title, batch, paths in panels:
        distinct = "no trained policy" if paths is None else f"{pg.policy_diversity(paths)}"
        lines.append(f"- {title}: {len(batch['names'])} photos, distinct paths: {distinct}.")
    return [*lines, "", "![Fig. 5](fig5_twin_paths.png)"]


def accuracy_difference_std(first: Mapping[str, Any], second: Mapping[str, Any]) -> float:
    """Standard deviation, in points, of the difference of two test accuracies from their
    binomial sampling noise: √(p_a(1 − p_a)/n_a + p_b(1 − p_b)/n_b) · 100, where p and n are
    the `accuracy` and `num_examples` of the results `first` (a) and `second` (b).

    The two systems' test photos are the same, so this overstates the noise of a paired
    comparison somewhat; it is the scale below which a difference means nothing.
    """
    variance = sum(
        result["accuracy"] * (1 - result["accuracy"]) / result["num_examples"]
        for result in (first, second)
    )
    return 100 * float(np.sqrt(variance))


def _claims(systems, results, configs) -> list[str]:
    """The paper's claims, checked on this suite's numbers (a statement per claim).

    `results`: system name → its final results (None if unfinished); `configs`: name → config.
    """
    lines = []

    def accuracy_points(name):
        return 100 * results[name]["accuracy"]

    if results.get("m2net") and results.get("blockdrop"):
        delta = accuracy_points("m2net") - accuracy_points("blockdrop")
        noise = 2 * accuracy_difference_std(results["m2net"], results["blockdrop"])
        if abs(delta) < noise:
            verdict = f"not shown: the difference is within noise (2σ = {noise:.2f} points)"
        else:
            verdict = "holds" if delta > 0 else "does not hold"
        lines.append(
            f"- M²Net more accurate than BlockDrop (Table 3): {accuracy_points('m2net'):.2f}% vs "
            f"{accuracy_points('blockdrop'):.2f}% ({delta:+.2f} points) — {verdict}."
        )
    if results.get("m2net") and results.get("remove_u") and results.get("blockdrop"):
        diversity = {
            name: results[name]["diversity"] for name in ("m2net", "remove_u", "blockdrop")
        }
        ordered = diversity["m2net"] > diversity["remove_u"] > diversity["blockdrop"]
        verdict = "holds" if ordered else "does not hold"
        lines.append(
            f"- Diversity M²Net > Remove-U > Remove-MLP (Fig. 7): {diversity['m2net']} / "
            f"{diversity['remove_u']} / {diversity['blockdrop']} — {verdict}."
        )
    depth = configs["m2net"].recognizer.depth
    baseline = f"baseline_r{depth}"
    if results.get("m2net") and results.get(baseline):
        change = 100 * (results["m2net"]["flops_mean"] / results[baseline]["flops_mean"] - 1)
        delta = accuracy_points("m2net") - accuracy_points(baseline)
        noise = 2 * accuracy_difference_std(results["m2net"], results[baseline])
        lines.append(
            f"- M²Net against its ResNet-{depth}: FLOPs per photo {change:+.1f}% (policy network "
            f"included), accuracy {delta:+.2f} points (2σ noise {noise:.2f}; paper, "
            "ResNet-47 on Landmark-420: 36% faster, +4.8 points)."
        )
    for system in systems:
        if (
            system.group == "compatibility"
            and results.get(system.name)
            and results.get(system.backbone)
        ):
            before, after = results[system.backbone], results[system.name]
            lines.append(
                f"- M²Net on {COMPACT_BACKBONES[system.backbone]} (Fig. 11): accuracy "
                f"{100 * (after['accuracy'] - before['accuracy']):+.2f} points "
                f"(2σ noise {2 * accuracy_difference_std(after, before):.2f}), FLOPs "
                f"{100 * (after['flops_mean'] / before['flops_mean'] - 1):+.1f}%."
            )
    if results.get("m2net_plus") and results.get("m2net"):
        lines.append(
            f"- M²Net+ (location also in the recognizer; not in the paper): "
            f"{accuracy_points('m2net_plus'):.2f}% vs M²Net {accuracy_points('m2net'):.2f}% (2σ "
            f"noise {2 * accuracy_difference_std(results['m2net_plus'], results['m2net']):.2f} "
            "points)."
        )
    return lines or ["Not enough finished systems to check the claims."]
