"""The paper's comparisons as one command: Table 3, Figs. 5, 7, 9, 10, 11 (§4.2–4.4), and M²Net+.

  python -m m2net_jax.experiments --suite=geo_twins --workdir=/tmp/m2net_suite

A *suite* is a base config and the systems trained from it; a *system* is a name and the config
overrides that make it, trained and evaluated by `train.train_and_evaluate` in its own workdir
`WORKDIR/<system>/`:

  Baseline R29/R47/R65   the ResNet, every block run (pretrain stage only).
  MobileNet, ShuffleNet(G2/G4), HetConv(P2/P4)
                         the suite's ResNet with a compact backbone's convs (`models.CONV_TYPES`),
                         every block run (pretrain stage only): the static methods of Table 3.
  BlockDrop              `policy.use_geo=False, reward.theta_d=0` — the paper's Remove-MLP.
  M²Net                  the suite's config as it is.
  Remove-U               `reward.theta_d=0` (the location kept).
  M²Net + <backbone>     M²Net's policy on the MobileNet, ShuffleNet(G4), HetConv(P4)
                         recognizers (§4.4, Fig. 11).
  M²Net+                 beyond the paper: the location also conditions the recognizer
                         (`recognizer.geo_conditioning`).
  penalty sweep          M²Net, Remove-MLP and Remove-U at other penalties λ (both policy
                         stages' λ scaled), for diversity and accuracy against Pr (Figs. 7, 10).

Systems run one after another and the command is resumable: a system whose `results.json` holds
its last stage is skipped (its recorded config must match), an interrupted one resumes from its
checkpoints. Work is shared where it is the same computation: BlockDrop, M²Net, Remove-U and the
sweep start from a copy of the suite's baseline pretrain checkpoint, and each compatibility
system from its backbone's — the recognizer, data, seed and pretrain schedule are identical, so
pretraining again would repeat the same steps. At the end `WORKDIR/report.md` gathers the tables
and the PNG plots (`fig*.png`), and the same report can be rewritten from finished runs with
`--report_only`; `--report_dir=DIR` writes the report and plots elsewhere (the committed
copy: `docs/geo_twins`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.figure import Figure

from m2net_jax import checkpoint, configs, results, train
from m2net_jax import policy_gradient as pg
from m2net_jax.state import STAGES, network_variables

# Backbones of the static methods of Table 3 and those M²Net is put on in Fig. 11 (§4.4).
COMPACT_BACKBONES = {
    "mobilenet": "MobileNet",
    "shufflenet_g2": "ShuffleNet(G2)",
    "shufflenet_g4": "ShuffleNet(G4)",
    "hetconv_p2": "HetConv(P2)",
    "hetconv_p4": "HetConv(P4)",
}
COMPATIBILITY_BACKBONES = ("mobilenet", "shufflenet_g4", "hetconv_p4")
BASELINE_DEPTHS = (29, 47, 65)
# The policy-network systems of the ablations (Figs. 7, 10): label in the tables, name in the
# ablation plots (the paper's), config overrides, the paper's colour.
POLICY_SYSTEMS = {
    "m2net": ("M²Net", "M²Net", {}, "tab:blue"),
    "blockdrop": (
        "BlockDrop (Remove-MLP)",
        "Remove-MLP",
        {"policy.use_geo": False, "reward.theta_d": 0.0},
        "tab:orange",
    ),
    "remove_u": ("Remove-U", "Remove-U", {"reward.theta_d": 0.0}, "tab:green"),
}


# ----------------------------------------------------------------------------------------------
# Systems and suites.


@dataclasses.dataclass(frozen=True)
class System:
    """One row of the comparison: a config (the suite's base + `overrides`) and what it runs.

    Attributes:
      name: directory under the suite's workdir and key in the report.
      label: how the paper's tables and plots name it.
      group: 'baseline', 'compact', 'policy', 'compatibility', 'plus' or 'sweep'.
      overrides: dotted config keys → values, e.g. {'policy.use_geo': False}.
      stages: the stages the system consists of; the last one is the one reported.
      shares_pretrain: a system whose finished pretrain checkpoint this one starts from.
      backbone: for 'compatibility': the compact system whose recognizer it puts M²Net on.
      kind, penalty_scale: for the penalty sweep (Figs. 7, 10): which policy system it is a
        variant of and its λ as a multiple of the suite's.
    """

    name: str
    label: str
    group: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stages: tuple[str, ...] = STAGES
    shares_pretrain: str | None = None
    backbone: str | None = None
    kind: str | None = None
    penalty_scale: float = 1.0

    @property
    def final_stage(self) -> str:
        return self.stages[-1]


@dataclasses.dataclass(frozen=True)
class Suite:
    """A base config and the systems built from it.

    Attributes:
      name: the `--suite` value.
      config: the base config file, ``path[:argument]`` as `main.py --config` takes it.
      description: one line for the report.
      penalty_scales: λ multiples swept for Figs. 7 and 10 (the main systems are 1).
      trained: None (every system trains) or the systems that train; every other system runs
        its own stages with 0 epochs, i.e. it is evaluated where it starts. Only for `smoke`,
        which exercises every system and code path in minutes, not for numbers.
      twins_per_class: test photos per class in the Fig. 5 picture.
      overrides: dotted config keys → values applied to `config` (not to a config given in its
        place), e.g. the schedule that fits the suite in its time budget.
    """

    name: str
    config: str
    description: str
    penalty_scales: tuple[float, ...] = (0.5, 2.0)
    trained: tuple[str, ...] | None = None
    twins_per_class: int = 2
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


SUITES = {
    "smoke": Suite(
        name="smoke",
        config="m2net_jax/configs/r29.py:smoke",
        description=(
            "plumbing check on the tiny geo_twins/smoke build (width 8, 1 epoch); only the "
            "baseline and M²Net train, the other systems are evaluated untrained. Its numbers "
            "mean nothing."
        ),
        penalty_scales=(0.5,),
        trained=("baseline_r29", "m2net"),
        twins_per_class=1,
    ),
    "geo_twins": Suite(
        name="geo_twins",
        config="m2net_jax/configs/quickstart.py",
        description=(
            "every system on the embedded geo_twins set (32 px, 32 classes), ResNet-29 of "
            "width 16, the quickstart config with a shorter schedule; about 1.5 hours on a 2-core "
            "CPU (BUILD_NOTES.md)."
        ),
        penalty_scales=(0.5, 2.0),
        overrides={
            "stages.pretrain.epochs": 5,
            "stages.policy.epochs": 4,
            "stages.finetune.epochs": 2,
        },
    ),
    "landmark420": Suite(
        name="landmark420",
        config="m2net_jax/configs/r47.py:landmark420",
        description="the paper's Landmark-420 setup (ResNet-47, 224 px); days on one GPU.",
        penalty_scales=(0.25, 0.5, 2.0),
    ),
    "landmark732": Suite(
        name="landmark732",
        config="m2net_jax/configs/r47.py:landmark732",
        description="the paper's Landmark-732 setup (ResNet-47, 224 px); days on one GPU.",
        penalty_scales=(0.25, 0.5, 2.0),
    ),
}


def suite_systems(suite: Suite, base_config: ml_collections.ConfigDict) -> list[System]:
    """The suite's systems, in an order where every shared checkpoint exists before its use."""
    depth = base_config.recognizer.depth
    main_baseline = f"baseline_r{depth}"
    systems = [
        System(
            f"baseline_r{d}",
            f"Baseline R{d}",
            "baseline",
            {"recognizer.depth": d},
            stages=("pretrain",),
        )
        for d in BASELINE_DEPTHS
    ]
    systems += [
        System(
            conv_type, label, "compact", {"recognizer.conv_type": conv_type}, stages=("pretrain",)
        )
        for conv_type, label in COMPACT_BACKBONES.items()
    ]
    systems += [
        System(name, label, "policy", overrides, shares_pretrain=main_baseline, kind=name)
        for name, (label, _, overrides, _) in POLICY_SYSTEMS.items()
    ]
    systems += [
        System(
            f"m2net_{conv_type}",
            f"M²Net + {COMPACT_BACKBONES[conv_type]}",
            "compatibility",
            {"recognizer.conv_type": conv_type},
            shares_pretrain=conv_type,
            backbone=conv_type,
        )
        for conv_type in COMPATIBILITY_BACKBONES
    ]
    systems.append(
        System(
            "m2net_plus",
            "M²Net+ (geo-conditioned recognizer)",
            "plus",
            {"recognizer.geo_conditioning": True},
        )
    )
    for kind, (_, name, overrides, _) in POLICY_SYSTEMS.items():
        for scale in suite.penalty_scales:
            penalties = {
                f"stages.{stage}.penalty": scale * base_config.stages[stage].penalty
                for stage in ("policy", "finetune")
            }
            systems.append(
                System(
                    f"{kind}_penalty_x{scale:g}",
                    f"{name} λ×{scale:g}",
                    "sweep",
                    {**overrides, **penalties},
                    shares_pretrain=main_baseline,
                    kind=kind,
                    penalty_scale=scale,
                )
            )
    names = [s.name for s in systems]
    if suite.trained is not None and set(suite.trained) - set(names):
        raise ValueError(f"Suite {suite.name!r} trains unknown systems {suite.trained}.")
    return systems


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads a config file given as ``path[:argument]``, locked, found as `main.py --config`
    finds it (`m2net_jax.configs.resolve`)."""
    return configs.load(spec)


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value  # A locked ConfigDict rejects an unknown key.


def system_config(
    suite: Suite, system: System, base_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The full config of `system`: the suite's base, its overrides, the stages it runs."""
    config = base_config.copy_and_resolve_references()
    for key, value in system.overrides.items():
        try:
            _set(config, key, value)
        except (KeyError, AttributeError) as error:
            raise KeyError(
                f"System {system.name!r} overrides {key!r}, which the config lacks: {error}"
            ) from error
    config.stages.run = ",".join(system.stages)
    if suite.trained is not None and system.name not in suite.trained:
        for stage in system.stages:
            config.stages[stage].epochs = 0
    return config


def _pretrain_source(suite, system, systems_by_name, base_config):
    """The config of the system `system` shares its pretraining with, checked to be the same
    computation, and whose pretrain schedule `system` adopts."""
    source = systems_by_name[system.shares_pretrain]
    source_config = system_config(suite, source, base_config)
    config = system_config(suite, system, base_config)
    for key in ("data", "recognizer", "seed"):
        mine, theirs = config[key], source_config[key]
        if isinstance(mine, ml_collections.ConfigDict):
            mine, theirs = mine.to_dict(), theirs.to_dict()
        if mine != theirs:
            raise ValueError(
                f"System {system.name!r} shares the pretraining of {source.name!r}, but their "
                f"`{key}` configs differ: {mine} vs {theirs}."
            )
    return source, source_config


# ----------------------------------------------------------------------------------------------
# Running.


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
    with open(marker, "w") as f:
        json.dump({"source": os.path.abspath(source_dir)}, f)
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
        source, source_config = _pretrain_source(suite, system, systems_by_name, base_config)
        config.stages.pretrain = source_config.stages.pretrain
    # A system directory belongs to one config: resuming or reusing it under another would mix
    # runs (a changed penalty, say, does not change any checkpoint's shapes).
    recorded_path = os.path.join(system_dir, "config.json")
    if os.path.exists(recorded_path):
        if _read_json(recorded_path) != _comparable(config):
            raise ValueError(
                f"{system_dir} was run with another config than suite {suite.name!r} now gives "
                f"system {system.name!r}. Delete that directory to rerun it."
            )
        finished = results.read_results(system_dir)
        if system.final_stage in finished:
            logging.info("[%s] Finished before; skipping.", system.name)
            return finished
    os.makedirs(system_dir, exist_ok=True)
    with open(recorded_path, "w") as f:
        json.dump(_comparable(config), f, indent=1)
    stages = system.stages
    if source is not None and _share_pretrain(os.path.join(workdir, source.name), system_dir):
        stages = tuple(s for s in stages if s != "pretrain")
    config.stages.run = ",".join(stages)
    logging.info("[%s] Running stages %s.", system.name, config.stages.run)
    start = time.time()
    train.train_and_evaluate(config, system_dir)
    elapsed = time.time() - start
    timing_path = os.path.join(system_dir, "timing.json")
    previous = _read_json(timing_path).get("seconds", 0.0)  # An interrupted earlier attempt.
    with open(timing_path, "w") as f:
        json.dump({"seconds": previous + elapsed, "stages": list(stages)}, f)
    return results.read_results(system_dir)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
        base_config = load_config(suite.config)
        for key, value in suite.overrides.items():
            _set(base_config, key, value)
        config_name = f"`{suite.config}`" + "".join(
            f", `{k}={v}`" for k, v in suite.overrides.items()
        )
    base_config = base_config.copy_and_resolve_references()
    if data_dir is not None:
        base_config.data.data_dir = data_dir
    systems = suite_systems(suite, base_config)
    by_name = {s.name: s for s in systems}
    selected = _with_sources(only, by_name) if only else [s.name for s in systems]
    os.makedirs(workdir, exist_ok=True)
    if not report_only:
        for system in systems:
            if system.name in selected:
                run_system(suite, system, workdir, base_config=base_config, systems_by_name=by_name)
    return write_report(
        suite, systems, workdir, base_config=base_config, config_name=config_name,
        report_dir=report_dir,
    )  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# Fig. 5: the paths M²Net and BlockDrop choose for look-alike landmarks.


def twin_examples(config: ml_collections.ConfigDict, *, per_class: int = 2) -> dict | None:
    """Test photos for a Fig. 5-style picture, from a dataset with `archetype`/`city` features.

    Picks the archetype of class 0 and (a) one photo set per archetype standing in the city of
    its first twin — one place, different landmarks — and (b) one per city that archetype stands
    in — look-alike landmarks in different places.

    Returns:
      None when the dataset has no such features (the GLDv2 subsets); else a dict with
      'same_city' and 'twins', each a batch dict as the eval pipeline makes it (image,
      policy_image, location, label) plus 'names' (E,) "archetype@city", and 'archetype',
      'city'.
    """
    import tensorflow_datasets as tfds

    from m2net_jax.data import pipeline

    builder = tfds.builder(config.data.dataset, data_dir=config.data.data_dir)
    features = builder.info.features
    if "archetype" not in features or "city" not in features:
        return None
    archetype_names = features["archetype"].names
    source = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
    # One pass over the split's metadata; photos in generation order (image_id), not file order.
    rows = []
    for index in range(len(source)):
        record = source[index]
        city = record["city"].decode() if isinstance(record["city"], bytes) else record["city"]
        rows.append((record["image_id"], index, int(record["archetype"]), city, record["label"]))
    by_class: dict[tuple[int, str], list[int]] = {}
    for _, index, archetype, city, _ in sorted(rows):
        by_class.setdefault((archetype, city), []).append(index)
    archetype = next(a for _, _, a, _, label in rows if label == 0)
    twins = sorted(c for a, c in by_class if a == archetype)
    city = twins[0]
    same_city = sorted(a for a, c in by_class if c == city)

    transforms = (
        pipeline.DecodeImage(),
        pipeline.ResizeCentreCrop(size=config.data.image_size),
        pipeline.AddPolicyImage(),
        pipeline.ToModelInputs(),
    )

    def batch(keys):
        elements, names = [], []
        for a, c in keys:
            for index in by_class[(a, c)][:per_class]:
                element = {**source[index], "index": index}
                for transform in transforms:
                    element = transform.map(element)
                elements.append(element)
                names.append(f"{archetype_names[a]}@{c}")
        stacked = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
        return {**stacked, "names": names}

    return {
        "same_city": batch([(a, city) for a in same_city]),
        "twins": batch([(archetype, c) for c in twins]),
        "archetype": archetype_names[archetype],
        "city": city,
    }


def greedy_paths(system_dir: str, config: ml_collections.ConfigDict, batch) -> np.ndarray | None:
    """The greedy policies (E, N) bool that a finished system's policy network picks for `batch`.

    Uses the system's finetune checkpoint (else its policy checkpoint); None when it has neither
    (its policy stages ran 0 epochs).
    """
    for stage in ("finetune", "policy"):
        restored = checkpoint.restore_variables(system_dir, stage, config)
        if restored is not None:
            break
    else:
        return None
    variables = jax.device_get(restored.variables)
    policy = restored.networks.policy.clone(axis_name=None)
    probs = policy.apply(
        network_variables(variables, "policy"),
        batch["policy_image"],
        batch["location"],
        train=False,
    )
    return np.asarray(pg.greedy_policy(probs)) > 0.5


# ----------------------------------------------------------------------------------------------
# The report.


def _flops_unit(values) -> tuple[float, str]:
    top = max([v for v in values if v] or [1.0])
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


def _row_result(system: System, workdir: str) -> dict[str, Any] | None:
    return results.read_results(os.path.join(workdir, system.name)).get(system.final_stage)


def _seconds(system: System, workdir: str) -> float | None:
    return _read_json(os.path.join(workdir, system.name, "timing.json")).get("seconds")


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
    command = f"python -m m2net_jax.experiments --suite={suite.name} --workdir={workdir}"
    if report_dir != workdir:
        command += f" --report_dir={report_dir}"
    results = {s.name: _row_result(s, workdir) for s in systems}
    configs = {s.name: system_config(suite, s, base_config) for s in systems}
    done = [s for s in systems if results[s.name] is not None]
    scale, unit = _flops_unit([results[s.name]["full_flops"] for s in done])
    lines = [
        f"# M²Net comparisons: suite `{suite.name}`",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} "
        f"({jax.device_count()} × {jax.devices()[0].device_kind}). "
        f"Base config {config_name}: {suite.description}",
        "",
        f"Dataset `{base_config.data.dataset}` at {base_config.data.image_size} px; accuracy is "
        "top-1 on its test split with the greedy policy. FLOPs per photo include the policy "
        f'network (DESIGN.md "Metrics"), in {unit}. Pr = mean fraction of blocks run (Eqn 7); '
        "diversity = distinct policies over the test split. Minutes: the system's own "
        "training and evaluation (a shared pretraining counts once, for the system that ran it).",
        "",
    ]
    if suite.trained is not None:
        lines += [
            f"**Reduced suite:** only {', '.join(suite.trained)} train; every other system "
            "runs 0 epochs and is evaluated where it starts.",
            "",
        ]
    missing = [s.name for s in systems if results[s.name] is None]
    if missing:
        lines += [f"Not finished (no results yet): {', '.join(missing)}.", ""]

    def cells(system):
        r, c = results[system.name], configs[system.name]
        if r is None:
            return None
        policy = "—" if system.final_stage == "pretrain" else _policy_text(c)
        reward = "—" if policy == "—" else f"θ_d={c.reward.theta_d:g}"
        penalty = "—" if policy == "—" else f"{c.stages.finetune.penalty:g}"
        seconds = _seconds(system, workdir)
        return [
            system.label,
            _recognizer_text(c),
            policy,
            reward,
            penalty,
            f"{100 * r['accuracy']:.2f}%",
            f"{r['pr']:.3f}",
            f"{r['blocks_mean']:.2f} ± {r['blocks_std']:.2f}",
            f"{r['diversity']:d}",
            f"{r['flops_mean'] / scale:.3f} ± {r['flops_std'] / scale:.3f}",
            f"{r['full_flops'] / scale:.3f}",
            "—" if seconds is None else f"{seconds / 60:.1f}",
        ]

    header = [
        "System", "Recognizer", "Policy input", "Reward", "λ (finetune)", "Accuracy", "Pr",
        "Blocks", "Diversity", f"{unit} / photo", f"{unit}, all blocks", "Minutes",
    ]  # fmt: skip
    main = [s for s in systems if s.group != "sweep"]
    sweep = [s for s in systems if s.group == "sweep" or (s.group == "policy")]
    lines += ["## Table 3: accuracy of every system", ""]
    lines += _markdown_table(header, [cells(s) for s in main if results[s.name] is not None])
    lines += ["", "![Fig. 9](fig9_accuracy_vs_flops.png)", ""]
    _plot_accuracy_vs_flops(
        [s for s in main if results[s.name] is not None], results, scale, unit,
        os.path.join(report_dir, "fig9_accuracy_vs_flops.png"),
    )  # fmt: skip

    lines += [
        "## Figs. 7 and 10: diversity and accuracy against Pr across penalties",
        "",
        "M²Net, Remove-MLP (BlockDrop) and Remove-U, each at the suite's penalties (×1) and at "
        f"λ × {', '.join(f'{x:g}' for x in suite.penalty_scales)} (policy and finetune stages).",
        "",
    ]
    sweep_rows = sorted(
        (s for s in sweep if results[s.name] is not None),
        key=lambda s: (list(POLICY_SYSTEMS).index(s.kind), s.penalty_scale),
    )
    lines += _markdown_table(header, [cells(s) for s in sweep_rows])
    lines += ["", "![Fig. 7](fig7_diversity_vs_pr.png) ![Fig. 10](fig10_accuracy_vs_pr.png)", ""]
    _plot_sweep(sweep_rows, results, configs, report_dir)

    lines += ["## Fig. 11: compatibility — M²Net on compact backbones", ""]
    compat_header = [
        "Backbone", "Accuracy before", "Accuracy after", f"{unit} before", f"{unit} after",
        "FLOPs change",
    ]  # fmt: skip
    compat_rows, compat_pairs = [], []
    for system in systems:
        if system.group != "compatibility":
            continue
        before, after = results[system.backbone], results[system.name]
        if before is None or after is None:
            continue
        compat_pairs.append((COMPACT_BACKBONES[system.backbone], before, after))
        compat_rows.append(
            [
                COMPACT_BACKBONES[system.backbone],
                f"{100 * before['accuracy']:.2f}%",
                f"{100 * after['accuracy']:.2f}%",
                f"{before['flops_mean'] / scale:.3f}",
                f"{after['flops_mean'] / scale:.3f} ± {after['flops_std'] / scale:.3f}",
                f"{100 * (after['flops_mean'] / before['flops_mean'] - 1):+.1f}%",
            ]
        )
    lines += _markdown_table(compat_header, compat_rows)
    lines += ["", "![Fig. 11](fig11_compatibility.png)", ""]
    _plot_compatibility(
        compat_pairs, scale, unit, os.path.join(report_dir, "fig11_compatibility.png")
    )

    lines += ["## Fig. 5: paths chosen for look-alike landmarks", ""]
    lines += _figure5(suite, systems, workdir, configs, results, report_dir)
    lines += ["", "## Claims of the paper on this suite", ""]
    lines += _claims(systems, results, configs)
    total = sum(filter(None, (_seconds(s, workdir) for s in systems)))
    lines += ["", f"Total training and evaluation time: {total / 60:.1f} minutes.", ""]
    path = os.path.join(report_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    logging.info("Wrote %s", path)
    return path


def _markdown_table(header, rows) -> list[str]:
    rows = [r for r in rows if r is not None]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


_GROUP_MARKERS = {
    "baseline": ("s", "tab:gray"),
    "compact": ("^", "tab:purple"),
    "policy": ("o", None),
    "compatibility": ("D", "tab:brown"),
    "plus": ("*", "tab:cyan"),
}


def _plot_accuracy_vs_flops(systems, results, scale, unit, path) -> None:
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for system in systems:
        r = results[system.name]
        marker, colour = _GROUP_MARKERS[system.group]
        colour = colour or POLICY_SYSTEMS[system.kind][3]
        ax.errorbar(
            r["flops_mean"] / scale, 100 * r["accuracy"], xerr=r["flops_std"] / scale,
            fmt=marker, color=colour, capsize=3, markersize=7,
        )  # fmt: skip
        ax.annotate(
            system.label.split(" (")[0], (r["flops_mean"] / scale, 100 * r["accuracy"]),
            textcoords="offset points", xytext=(4, 4), fontsize=7,
        )  # fmt: skip
    ax.set_xlabel(f"{unit} per photo (mean ± std over the test split)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fig. 9: accuracy against computation")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _plot_sweep(rows, results, configs, report_dir) -> None:
    for key, ylabel, title, filename in (
        ("diversity", "policy diversity (distinct policies)", "Fig. 7: policy diversity",
         "fig7_diversity_vs_pr.png"),
        ("accuracy", "test accuracy (%)", "Fig. 10: accuracy against Pr",
         "fig10_accuracy_vs_pr.png"),
    ):  # fmt: skip
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for kind, (_, name, _, colour) in POLICY_SYSTEMS.items():
            points = sorted(
                ((results[s.name]["pr"], results[s.name][key], s) for s in rows if s.kind == kind),
                key=lambda point: point[0],
            )
            if not points:
                continue
            pr = [p for p, _, _ in points]
            values = [v * (100 if key == "accuracy" else 1) for _, v, _ in points]
            ax.plot(pr, values, "o-", color=colour, label=name)
            for p, v, s in zip(pr, values, [s for _, _, s in points], strict=True):
                penalty = configs[s.name].stages.finetune.penalty
                ax.annotate(f"λ={penalty:g}", (p, v), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)  # fmt: skip
        ax.set_xlabel("Pr (fraction of blocks run)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(os.path.join(report_dir, filename), dpi=120)


def _plot_compatibility(pairs, scale, unit, path) -> None:
    fig = Figure(figsize=(9, 4), layout="constrained")
    acc, cost = fig.subplots(1, 2)
    x = np.arange(len(pairs))
    names = [name for name, _, _ in pairs]
    for ax, key, factor, ylabel in (
        (acc, "accuracy", 100.0, "test accuracy (%)"),
        (cost, "flops_mean", 1.0 / scale, f"{unit} per photo"),
    ):
        before = [b[key] * factor for _, b, _ in pairs]
        after = [a[key] * factor for _, _, a in pairs]
        ax.bar(x - 0.2, before, 0.4, label="backbone alone", color="tab:gray")
        ax.bar(x + 0.2, after, 0.4, label="with M²Net", color="tab:orange")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 11: M²Net on compact backbones")
    fig.savefig(path, dpi=120)


def _figure5(suite, systems, workdir, configs, results, report_dir) -> list[str]:
    path = os.path.join(report_dir, "fig5_twin_paths.png")
    m2net = next(s for s in systems if s.name == "m2net")
    blockdrop = next(s for s in systems if s.name == "blockdrop")
    config = configs[m2net.name]
    examples = twin_examples(config, per_class=suite.twins_per_class)
    panels = []
    if examples is not None:
        for system, key, title in (
            (m2net, "same_city", f"(a) M²Net: one city ({examples['city']}), different landmarks"),
            (m2net, "twins", f"(b) M²Net: look-alike {examples['archetype']}s, different cities"),
            (blockdrop, "twins", "(c) BlockDrop (no location): the same look-alikes"),
        ):
            paths = None
            if results[system.name] is not None:
                paths = greedy_paths(
                    os.path.join(workdir, system.name), configs[system.name], examples[key]
                )
            panels.append((title, examples[key], paths))
    _plot_paths(panels, path)
    if examples is None:
        return [f"`{config.data.dataset}` has no archetype/city features; no Fig. 5 picture."]
    lines = []
    for title, batch, paths in panels:
        distinct = "no trained policy" if paths is None else f"{pg.policy_diversity(paths)}"
        lines.append(f"- {title}: {len(batch['names'])} photos, distinct paths: {distinct}.")
    return [*lines, "", "![Fig. 5](fig5_twin_paths.png)"]


def _plot_paths(panels, path) -> None:
    """One column per panel: the photos (left) and the blocks their policy runs (dark = run)."""
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 0.5 + 0.45 * _max_rows(panels)),
                 layout="constrained")  # fmt: skip
    if not panels:
        fig.text(0.5, 0.5, "No archetype/city features in this dataset.", ha="center")
    grid = fig.add_gridspec(1, 2 * max(1, len(panels)), width_ratios=[1, 4] * max(1, len(panels)))
    for i, (title, batch, paths) in enumerate(panels):
        photos, blocks = fig.add_subplot(grid[0, 2 * i]), fig.add_subplot(grid[0, 2 * i + 1])
        rows = len(batch["names"])
        photos.imshow(np.concatenate(list(batch["image"]), axis=0), extent=(0, 1, rows - 0.5, -0.5),
                      aspect="auto")  # fmt: skip
        photos.set_xticks([])
        photos.set_yticks(range(rows), batch["names"], fontsize=7)
        if paths is None:
            blocks.text(0.5, 0.5, "no trained policy\n(0 policy epochs)", ha="center",
                        va="center", transform=blocks.transAxes)  # fmt: skip
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


def accuracy_difference_std(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Standard deviation, in points, of the difference of two test accuracies from their
    binomial sampling noise: √(p_a(1 − p_a)/n_a + p_b(1 − p_b)/n_b) · 100.

    The two systems' test photos are the same, so this overstates the noise of a paired
    comparison somewhat; it is the scale below which a difference means nothing.
    """
    variance = sum(r["accuracy"] * (1 - r["accuracy"]) / r["num_examples"] for r in (a, b))
    return 100 * float(np.sqrt(variance))


def _claims(systems, results, configs) -> list[str]:
    """The paper's claims, checked on this suite's numbers (a statement per claim)."""
    r = results
    lines = []

    def acc(name):
        return 100 * r[name]["accuracy"]

    if r.get("m2net") and r.get("blockdrop"):
        delta = acc("m2net") - acc("blockdrop")
        noise = 2 * accuracy_difference_std(r["m2net"], r["blockdrop"])
        if abs(delta) < noise:
            verdict = f"not shown: the difference is within noise (2σ = {noise:.2f} points)"
        else:
            verdict = "holds" if delta > 0 else "does not hold"
        lines.append(
            f"- M²Net more accurate than BlockDrop (Table 3): {acc('m2net'):.2f}% vs "
            f"{acc('blockdrop'):.2f}% ({delta:+.2f} points) — {verdict}."
        )
    if r.get("m2net") and r.get("remove_u") and r.get("blockdrop"):
        d = {k: r[k]["diversity"] for k in ("m2net", "remove_u", "blockdrop")}
        verdict = "holds" if d["m2net"] > d["remove_u"] > d["blockdrop"] else "does not hold"
        lines.append(
            f"- Diversity M²Net > Remove-U > Remove-MLP (Fig. 7): {d['m2net']} / {d['remove_u']}"
            f" / {d['blockdrop']} — {verdict}."
        )
    depth = configs["m2net"].recognizer.depth
    baseline = f"baseline_r{depth}"
    if r.get("m2net") and r.get(baseline):
        change = 100 * (r["m2net"]["flops_mean"] / r[baseline]["flops_mean"] - 1)
        delta = acc("m2net") - acc(baseline)
        lines.append(
            f"- M²Net against its ResNet-{depth}: FLOPs per photo {change:+.1f}% (policy network "
            f"included), accuracy {delta:+.2f} points "
            f"(2σ noise {2 * accuracy_difference_std(r['m2net'], r[baseline]):.2f}; paper, "
            "ResNet-47 on Landmark-420: 36% faster, +4.8 points)."
        )
    for system in systems:
        if system.group == "compatibility" and r.get(system.name) and r.get(system.backbone):
            before, after = r[system.backbone], r[system.name]
            lines.append(
                f"- M²Net on {COMPACT_BACKBONES[system.backbone]} (Fig. 11): accuracy "
                f"{100 * (after['accuracy'] - before['accuracy']):+.2f} points "
                f"(2σ noise {2 * accuracy_difference_std(after, before):.2f}), FLOPs "
                f"{100 * (after['flops_mean'] / before['flops_mean'] - 1):+.1f}%."
            )
    if r.get("m2net_plus") and r.get("m2net"):
        lines.append(
            f"- M²Net+ (location also in the recognizer; not in the paper): "
            f"{acc('m2net_plus'):.2f}% vs M²Net {acc('m2net'):.2f}% (2σ noise "
            f"{2 * accuracy_difference_std(r['m2net_plus'], r['m2net']):.2f} points)."
        )
    return lines or ["Not enough finished systems to check the claims."]


# ----------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF only reads data here.
    # Systems of a suite share many programs (evaluation, the sweep's models), and a resumed
    # suite all of them: keep XLA's compilations next to the results.
    jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
    base_config = load_config(FLAGS.config) if FLAGS.config else None
    path = run_suite(
        FLAGS.suite,
        FLAGS.workdir,
        base_config=base_config,
        data_dir=FLAGS.data_dir,
        only=FLAGS.systems,
        report_only=FLAGS.report_only,
        report_dir=FLAGS.report_dir,
    )
    print(f"Report: {path}")


def cli():
    """The `m2net-experiments` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    flags.DEFINE_enum("suite", None, sorted(SUITES), "Which comparison suite to run.")
    flags.DEFINE_string("workdir", None, "Directory of the suite: one workdir per system, report.")
    flags.DEFINE_string("config", None, "Replace the suite's base config file (path[:arg]).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (config.data.data_dir).")
    flags.DEFINE_list("systems", None, "Run only these systems (and those they share with).")
    flags.DEFINE_bool("report_only", False, "Run nothing; rewrite the report from results.")
    flags.DEFINE_string("report_dir", None, "Where report.md and the plots go (default: workdir).")
    flags.mark_flags_as_required(["suite", "workdir"])
    # absl's --help lists the flags of the running script, sys.argv[0]: here the console
    # script's shim, not this module.
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


if __name__ == "__main__":
    cli()
