"""Suites and systems: the paper's comparisons (Table 3, Figs. 7, 9, 10, 11; §4.2–4.4) as data.

A *suite* is a base config and the systems trained from it; a *system* is a name and the config
overrides that make it. `suite_systems` lists a suite's systems in an order where every shared
pretrain checkpoint exists before it is used; `system_config` builds one system's full config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from m2net_jax import configs
from m2net_jax.state import STAGES

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


# The mechanism study (`--suite=mechanism`): each system on both datasets, several seeds.
# Dataset tag → (TFDS name, label): the standard twins, and twins identical in the image, where
# only the location can tell them apart.
MECHANISM_DATASETS = {
    "cue": ("geo_twins/32px", "geo_twins (default cue)"),
    "identical": ("geo_twins/32px_identical", "geo_twins, identical twins (twin_cue=0)"),
}
# The baseline pretrained twice as long: is the study's recognizer on its plateau? (Its accuracy
# should be within `PLATEAU_POINTS` of this one's.)
CONVERGENCE_CHECK = "baseline_cue_x2"
PLATEAU_POINTS = 2.0
# System kind → (label, config overrides, the pretraining it starts from).
MECHANISM_KINDS = {
    "baseline": ("Baseline ResNet", {}, None),
    "blockdrop": ("BlockDrop (Remove-MLP)", POLICY_SYSTEMS["blockdrop"][2], "baseline"),
    "m2net": ("M²Net", {}, "baseline"),
    "remove_u": ("Remove-U", POLICY_SYSTEMS["remove_u"][2], "baseline"),
    "m2net_plus": ("M²Net+", {"recognizer.geo_conditioning": True}, "plus_pretrain"),
}


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
        variant of and its λ as a multiple of the suite's; in the mechanism study, the
        `MECHANISM_KINDS` key.
      dataset: in the mechanism study, the `MECHANISM_DATASETS` tag.
      seed: in the mechanism study, the `seed` of the policy and finetune stages; such systems
        share one pretraining (seed 0's) per dataset, so the seed varies the later stages only.
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
    dataset: str | None = None
    seed: int | None = None

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
      seeds: for the mechanism study (`kind='mechanism'`): the seeds of every policy system.
      kind: 'paper' (the paper's comparisons, `suite_systems`) or 'mechanism' (the mechanism
        study: `mechanism_systems`).
    """

    name: str
    config: str
    description: str
    penalty_scales: tuple[float, ...] = (0.5, 2.0)
    trained: tuple[str, ...] | None = None
    twins_per_class: int = 2
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    kind: str = "paper"


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
            # The 9 blocks all open after 3.2 of the 4 epochs.
            "sampling.curriculum_epochs": 0.4,
        },
    ),
    "mechanism": Suite(
        name="mechanism",
        config="m2net_jax/configs/quickstart.py",
        description=(
            "M²Net's mechanism on geo_twins with twins that differ slightly in the image (the "
            "default cue) and with identical twins: Baseline, BlockDrop (Remove-MLP), M²Net, "
            'Remove-U and M²Net+, 3 seeds each (BUILD_NOTES.md, "The mechanism study").'
        ),
        kind="mechanism",
        seeds=(0, 1, 2),
        # Sized to fit 150 minutes on a 2-core CPU (BUILD_NOTES.md, "The mechanism study"): the
        # quickstart's ResNet-29 at width 8, pretrained with Adam (faster per epoch than SGD).
        overrides={
            "recognizer.width": 8,
            "policy.width": 8,
            "stages.pretrain.epochs": 28,
            "stages.pretrain.optimizer": "adam",
            "stages.pretrain.learning_rate": 3e-3,
            "stages.pretrain.weight_decay": 0.0,
            "stages.policy.epochs": 4,
            "stages.finetune.epochs": 3,
            "sampling.curriculum_epochs": 0.4,  # The 9 blocks all open after 3.2 of 4 epochs.
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
    if suite.kind == "mechanism":
        return mechanism_systems(suite, base_config)
    depth = base_config.recognizer.depth
    main_baseline = f"baseline_r{depth}"
    systems = [
        System(
            f"baseline_r{baseline_depth}",
            f"Baseline R{baseline_depth}",
            "baseline",
            {"recognizer.depth": baseline_depth},
            stages=("pretrain",),
        )
        for baseline_depth in BASELINE_DEPTHS
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
    names = [system.name for system in systems]
    if suite.trained is not None and set(suite.trained) - set(names):
        raise ValueError(f"Suite {suite.name!r} trains unknown systems {suite.trained}.")
    return systems


def mechanism_systems(suite: Suite, base_config: ml_collections.ConfigDict) -> list[System]:
    """The mechanism study's systems, per dataset: the baseline and M²Net+'s own pretraining
    (pretrain stage only, seed 0), then BlockDrop, M²Net, Remove-U and M²Net+ for every seed of
    the suite, starting from the pretraining of their recognizer; last, the convergence check:
    the default-cue baseline pretrained for twice the epochs (`CONVERGENCE_CHECK`)."""
    systems = []
    for tag, (dataset, _) in MECHANISM_DATASETS.items():
        data = {"data.dataset": dataset}
        plus = MECHANISM_KINDS["m2net_plus"][1]
        for kind, label, overrides in (
            ("baseline", "Baseline ResNet", data),
            ("plus_pretrain", "M²Net+ pretraining", {**data, **plus}),
        ):
            systems.append(
                System(
                    f"{kind}_{tag}",
                    label,
                    "baseline" if kind == "baseline" else "plus",
                    overrides,
                    stages=("pretrain",),
                    kind=kind,
                    dataset=tag,
                )
            )
        for seed in suite.seeds:
            for kind, (label, overrides, source) in MECHANISM_KINDS.items():
                if source is None:
                    continue
                systems.append(
                    System(
                        f"{kind}_{tag}_s{seed}",
                        label,
                        "plus" if kind == "m2net_plus" else "policy",
                        {**data, **overrides, "seed": seed},
                        shares_pretrain=f"{source}_{tag}",
                        kind=kind,
                        dataset=tag,
                        seed=seed,
                    )
                )
    epochs = base_config.stages.pretrain.epochs
    systems.append(
        System(
            CONVERGENCE_CHECK,
            f"Baseline ResNet, {2 * epochs} pretraining epochs",
            "baseline",
            {"data.dataset": MECHANISM_DATASETS["cue"][0], "stages.pretrain.epochs": 2 * epochs},
            stages=("pretrain",),
            kind="baseline_x2",
            dataset="cue",
        )
    )
    return systems


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads a config file given as ``path[:argument]``, locked, found as `main.py --config`
    finds it (`m2net_jax.configs.resolve`)."""
    return configs.load(spec)


def suite_base_config(suite: Suite) -> ml_collections.ConfigDict:
    """The suite's base config: its config file with the suite's `overrides` applied."""
    config = load_config(suite.config)
    for key, value in suite.overrides.items():
        set_key(config, key, value)
    return config


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets the dotted `key` (e.g. 'reward.theta_d') of `config` to `value`."""
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
            set_key(config, key, value)
        except (KeyError, AttributeError) as error:
            raise KeyError(
                f"System {system.name!r} overrides {key!r}, which the config lacks: {error}"
            ) from error
    config.stages.run = ",".join(system.stages)
    if suite.trained is not None and system.name not in suite.trained:
        for stage in system.stages:
            config.stages[stage].epochs = 0
    return config


def pretrain_source(
    suite: Suite,
    system: System,
    systems_by_name: Mapping[str, System],
    base_config: ml_collections.ConfigDict,
) -> tuple[System, ml_collections.ConfigDict]:
    """The config of the system `system` shares its pretraining with, checked to be the same
    computation, and whose pretrain schedule `system` adopts."""
    source = systems_by_name[system.shares_pretrain]
    source_config = system_config(suite, source, base_config)
    config = system_config(suite, system, base_config)
    # Seeded systems of the mechanism study share seed 0's pretraining on purpose.
    for key in ("data", "recognizer") + (("seed",) if system.seed is None else ()):
        mine, theirs = config[key], source_config[key]
        if isinstance(mine, ml_collections.ConfigDict):
            mine, theirs = mine.to_dict(), theirs.to_dict()
        if mine != theirs:
            raise ValueError(
                f"System {system.name!r} shares the pretraining of {source.name!r}, but their "
                f"`{key}` configs differ: {mine} vs {theirs}."
            )
    return source, source_config
