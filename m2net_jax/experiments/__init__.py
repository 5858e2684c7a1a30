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

`--suite=mechanism` is the mechanism study instead: Baseline, BlockDrop, M²Net, Remove-U and
M²Net+ on geo_twins with the default twin cue and with identical twins, every policy system with
several seeds (sharing one pretraining per dataset), reported as means with 95 % intervals over
seeds and five hypotheses judged by them (`mechanism_report`).

Systems run one after another and the command is resumable: a system whose `results.json` holds
its last stage is skipped (its recorded config must match), an interrupted one resumes from its
checkpoints. Work is shared where it is the same computation: BlockDrop, M²Net, Remove-U and the
sweep start from a copy of the suite's baseline pretrain checkpoint, and each compatibility
system from its backbone's — the recognizer, data, seed and pretrain schedule are identical, so
pretraining again would repeat the same steps. At the end `WORKDIR/report.md` gathers the tables
and the PNG plots (`fig*.png`), and the same report can be rewritten from finished runs with
`--report_only`; `--report_dir=DIR` writes the report and plots elsewhere (the committed
copy: `docs/geo_twins`).

Modules: `suites` (systems and suites as data), `twins` (Fig. 5's photos and paths), `figures`
(the plots), `report` (report.md and the claims), `mechanism_report` (the mechanism study's
sections), `runner` (running a suite), `__main__` (the command line). The names below are the
package's API, for notebooks and tests.
"""

from m2net_jax.experiments.report import accuracy_difference_std, write_report
from m2net_jax.experiments.runner import run_suite, run_system
from m2net_jax.experiments.suites import (
    BASELINE_DEPTHS,
    COMPACT_BACKBONES,
    COMPATIBILITY_BACKBONES,
    POLICY_SYSTEMS,
    SUITES,
    Suite,
    System,
    load_config,
    suite_base_config,
    suite_systems,
    system_config,
)
from m2net_jax.experiments.twins import greedy_paths, twin_examples

__all__ = [
    "BASELINE_DEPTHS",
    "COMPACT_BACKBONES",
    "COMPATIBILITY_BACKBONES",
    "POLICY_SYSTEMS",
    "SUITES",
    "Suite",
    "System",
    "accuracy_difference_std",
    "greedy_paths",
    "load_config",
    "suite_base_config",
    "run_suite",
    "run_system",
    "suite_systems",
    "system_config",
    "twin_examples",
    "write_report",
]
