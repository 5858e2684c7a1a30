"""The benchmark's results as plain-text tables, one per part (what `python -m
m2net_jax.bench` prints)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt(value, digits=1) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def format_table(results: Mapping[str, Any]) -> str:
    """The results as plain-text tables, one per part."""
    d = results["device"]
    sizes = results["sizes"]
    lines = [
        f"suite {results['suite']} on {d['device_count']} × {d['device_kind']} "
        f"({d['platform']}, {d['cpu_count']} CPUs, jax {d['jax']}); ResNet-{sizes['depth']} "
        f"width {sizes['width']}, {sizes['image_size']} px",
    ]
    for part, lines_of in _PART_LINES.items():
        if part in results:
            lines += ["", *lines_of(results[part])]
    lines.append(f"\ntotal {results['seconds']:.0f} s")
    return "\n".join(lines)


def _train_lines(r) -> list[str]:
    lines = [f"train steps (global batch {r['batch']} on {r['devices']} devices):"]
    lines.append(f"  {'step':<24} {'s/step':>8} {'images/s':>9}")
    for name, s in r["steps"].items():
        lines.append(f"  {name:<24} {s['step_s']:>8.3f} {s['images_per_s']:>9.1f}")
    compiles = ", ".join(
        f"{name} {c['cold_s']:.1f} / {c['warm_s']:.1f}"
        + ("" if c["warm_cache_hits"] else " (cache off)")
        for name, c in r["compile_s"].items()
    )
    lines.append(f"  compile, s (cold / warm from the persistent cache): {compiles}")
    lines.append("  policy step, shared vs naive (make_train_step(frozen_logits=...)):")
    for p in r["policy_shared_vs_naive"].values():
        same = (
            "identical"
            if p["max_metric_difference"] == 0
            else (f"max metric diff {p['max_metric_difference']:.2g}")
        )
        lines.append(
            f"    k={p['k']:<3} speedup {p['speedup']:.2f}x  loss {p['loss_shared']:.6f} vs "
            f"{p['loss_naive']:.6f} ({same})"
        )
    return lines


def _frozen_lines(r) -> list[str]:
    lines = [f"frozen recognizer of the policy step, two forwards (batch {r['batch']}):"]
    for p in r["by_k"].values():
        lines.append(
            f"  k={p['k']:<3} shared prefix {p['shared_prefix']:>2} blocks: naive "
            f"{p['naive_s']:.3f} s, shared {p['shared_s']:.3f} s, speedup "
            f"{p['speedup']:.2f}x, max |logit diff| {p['max_logit_difference']:.1e} "
            f"(of |logits| ≤ {p['max_abs_logit']:.0f})"
        )
    if "bf16_k_n" in r:
        b = r["bf16_k_n"]
        lines.append(
            f"  bfloat16 (naive, k=N): {b['naive_s']:.3f} s, {b['speedup_over_f32']:.2f}x "
            f"float32; {100 * b['predictions_changed']:.1f}% of predictions change"
        )
    return lines


def _eval_lines(r) -> list[str]:
    lines = [f"evaluation (batch {r['batch']}; half policy Pr={r['pr']:.2f}):"]
    for name in (
        "predict_step",
        "masked_diverse",
        "skipping_diverse",
        "masked_uniform",
        "skipping_uniform",
    ):
        lines.append(f"  {name:<24} {r[name]['images_per_s']:>9.1f} images/s")
    return lines


def _latency_lines(r) -> list[str]:
    lines = [f"batch-1 latency (policy {''.join(map(str, r['policy']))}, Pr={r['pr']:.2f}):"]
    lines.append(f"  {'':<24} {'fastest':>8} {'median':>8}")
    for name, ms in r["latency_ms"].items():
        lines.append(f"  {name:<24} {ms:>8.2f} {r['median_latency_ms'][name]:>8.2f} ms")
    g = r["gflops"]
    lines.append(
        f"  GFLOPs: full {g['full_resnet']:.3f}, recognizer under the policy "
        f"{g['recognizer_half']:.3f}, policy network {g['policy_network']:.3f}"
    )
    for key, label in (("recognizer_speedup", "recognizer"), ("m2net_speedup", "M²Net")):
        s = r[key]
        lines.append(
            f"  speedup over the full ResNet, {label:<10}: measured {s['measured']:.2f}x, "
            f"FLOPs-predicted {s['predicted']:.2f}x ({100 * s['fraction_of_predicted']:.0f}%)"
        )
    return lines


def _uniqueness_lines(r) -> list[str]:
    lines = ["uniqueness (Eqn 2; MB: what each must hold besides its input):"]
    lines.append(
        f"  {'M':>6} {'N':>3} {'counts ms':>10} {'counts MB':>10} {'pairwise ms':>12} "
        f"{'pairwise MB':>12}"
    )
    for row in r["rows"]:
        mb = lambda b: b / 2**20
        lines.append(
            f"  {row['M']:>6} {row['N']:>3} {_fmt(row['counts_ms'], 3):>10} "
            f"{_fmt(mb(row['counts_bytes']), 3):>10} {_fmt(row.get('pairwise_ms'), 1):>12} "
            f"{_fmt(mb(row['pairwise_bytes']), 1):>12}"
        )
    return lines


def _convs_lines(r) -> list[str]:
    lines = [
        f"compact convs, forward + backward (batch {r['batch']}, {r['image_size']} px, "
        f"width {r['width']}), ms:",
        f"  {'':<20} {'ours':>8} {'grouped XLA':>12} {'dense':>8}",
    ]
    for case, row in r["cases"].items():
        ms = row["ms"]
        lines.append(
            f"  {case:<20} {ms['ours']:>8.2f} {_fmt(ms.get('feature_group_count'), 2):>12} "
            f"{ms['dense']:>8.2f}"
        )
    return lines


def _pipeline_lines(r) -> list[str]:
    lines = [f"input pipeline ({r['dataset']}, batch {r['batch']}), images/s:"]
    for row in r["rows"]:
        n = row["worker_count"]
        where = "in-process" if n == 0 else f"{n} worker" + ("s" if n > 1 else "")
        lines.append(f"  {row['source']:<7} {where:<12} {row['images_per_s']:>9.0f}")
    if r["headroom"] is not None:
        lines.append(
            f"  fastest train step: {r['model_images_per_s']:.1f} images/s "
            f"(best pipeline row {r['headroom']:.1f}x that)"
        )
    return lines


# In the order the parts run (`runner.PARTS`).
_PART_LINES = {
    "train": _train_lines,
    "frozen": _frozen_lines,
    "eval": _eval_lines,
    "latency": _latency_lines,
    "uniqueness": _uniqueness_lines,
    "convs": _convs_lines,
    "pipeline": _pipeline_lines,
}
