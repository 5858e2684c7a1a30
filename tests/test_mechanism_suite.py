"""The mechanism study (`--suite=mechanism`): its systems, shared pretraining, intervals over
seeds and the hypotheses' verdicts, on hand-made results (no training)."""

import os

import numpy as np
import pytest

from m2net_jax import results
from m2net_jax.experiments import SUITES, mechanism_report, suite_base_config, suite_systems
from m2net_jax.experiments import suites as suites_lib

SUITE = SUITES["mechanism"]


def _systems():
    return suite_systems(SUITE, suite_base_config(SUITE))


def test_every_system_on_both_datasets_with_every_seed_sharing_one_pretraining():
    systems = {s.name: s for s in _systems()}
    for tag, (dataset, _) in suites_lib.MECHANISM_DATASETS.items():
        assert systems[f"baseline_{tag}"].stages == ("pretrain",)
        assert systems[f"plus_pretrain_{tag}"].stages == ("pretrain",)
        for seed in SUITE.seeds:
            for kind in ("blockdrop", "m2net", "remove_u", "m2net_plus"):
                system = systems[f"{kind}_{tag}_s{seed}"]
                assert (system.kind, system.dataset, system.seed) == (kind, tag, seed)
                config = suites_lib.system_config(SUITE, system, suite_base_config(SUITE))
                assert config.seed == seed and config.data.dataset == dataset
                source = "plus_pretrain" if kind == "m2net_plus" else "baseline"
                assert system.shares_pretrain == f"{source}_{tag}"
                assert config.recognizer.geo_conditioning == (kind == "m2net_plus")
                assert config.policy.use_geo == (kind != "blockdrop")
                assert config.reward.theta_d == (0.5 if kind in ("m2net", "m2net_plus") else 0)
    assert len(SUITE.seeds) >= 3


def test_seeded_systems_share_seed_0s_pretraining_but_not_another_datasets():
    base = suite_base_config(SUITE)
    systems = _systems()
    by_name = {s.name: s for s in systems}
    source, _ = suites_lib.pretrain_source(SUITE, by_name["m2net_cue_s2"], by_name, base)
    assert source.name == "baseline_cue"
    mixed = suites_lib.System(
        "mixed",
        "x",
        "policy",
        {"data.dataset": "geo_twins/32px_identical", "seed": 1},
        shares_pretrain="baseline_cue",
        kind="m2net",
        dataset="identical",
        seed=1,
    )
    with pytest.raises(ValueError, match="`data` configs differ"):
        suites_lib.pretrain_source(SUITE, mixed, {**by_name, "mixed": mixed}, base)
    # Outside the study (no `seed` field) another seed is another pretraining: refused.
    reseeded = suites_lib.System(
        "reseeded",
        "x",
        "policy",
        {"data.dataset": "geo_twins/32px", "seed": 1},
        shares_pretrain="baseline_cue",
        kind="m2net",
    )
    with pytest.raises(ValueError, match="`seed` configs differ"):
        suites_lib.pretrain_source(SUITE, reseeded, {**by_name, "reseeded": reseeded}, base)


def test_interval_is_the_student_t_interval_of_the_seeds():
    got = mechanism_report.interval([1.0, 2.0, 3.0])
    half = 4.302652729749462 * 1.0 / np.sqrt(3)  # t(0.975, df=2) · s / √n, s = 1
    assert (got.mean, got.n) == (2.0, 3)
    np.testing.assert_allclose([got.low, got.high], [2 - half, 2 + half])
    assert mechanism_report.interval([None, float("nan"), 5.0]).n == 1
    assert mechanism_report.verdict(mechanism_report.interval([0.1, 0.2, 0.15])) == "holds"
    assert mechanism_report.verdict(mechanism_report.interval([-0.1, -0.2, -0.15])) == "fails"
    assert mechanism_report.verdict(mechanism_report.interval([-0.1, 0.2, 0.0])).startswith(
        "not shown"
    )


def _result(accuracy, ceiling, flops, diversity, mi, full=100e6):
    return {
        "accuracy": accuracy,
        "image_only_ceiling": ceiling,
        "flops_mean": flops,
        "full_flops": full,
        "diversity": diversity,
        "path_city_mi_bits": mi,
        "pr": 0.8,
        "twin_accuracy": 0.5,
        "lookalike_paths_differ": 0.3,
    }


def _hand_made(system):
    """Results built so that H1 holds, H2 is not shown (accuracy differences +1, −1, 0 points),
    H3 fails (Remove-U below Remove-MLP), H4 holds and H5 fails."""
    d = {0: 0.002, 1: -0.002, 2: 0.0}.get(system.seed, 0.0)  # small seed-to-seed spread
    e = {0: 0.01, 1: -0.01, 2: 0.0}.get(system.seed, 0.0)
    kind, identical = system.kind, system.dataset == "identical"
    if kind in ("baseline", "plus_pretrain"):
        return _result(0.60, 0.15, 100e6, 1, 0.0)
    if kind == "baseline_x2":  # 1.5 points above the baseline: within the plateau's 2.
        return _result(0.615, 0.15, 100e6, 1, 0.0)
    if kind == "m2net":  # 10 points above the ceiling on identical twins; 35 % fewer FLOPs.
        return _result(
            0.70 + d if identical else 0.60 + d, 0.60 if identical else 0.15, 65e6, 20 + d, 0.3 + d
        )
    if kind == "blockdrop":  # At the ceiling on identical twins (on average).
        return _result(
            0.60 + e if identical else 0.60 + d - e,
            0.60 if identical else 0.15,
            65e6,
            10 + d,
            0.5 + d,
        )
    if kind == "remove_u":
        return _result(0.60, 0.15, 66e6, 6 + d, 0.6)
    return _result(0.90, 0.15, 66e6, 30, 1.0)


def test_report_judges_each_hypothesis_by_the_interval_of_its_seedwise_difference(tmp_path):
    workdir, report_dir = str(tmp_path / "w"), str(tmp_path / "docs")
    systems = _systems()
    for system in systems:
        results.write_results(
            os.path.join(workdir, system.name), {system.stages[-1]: _hand_made(system)}
        )
    finished = {
        s.name: results.read_results(os.path.join(workdir, s.name))[s.stages[-1]] for s in systems
    }
    lines = mechanism_report.mechanism_sections(systems, finished, report_dir)
    text = "\n".join(lines)
    verdicts = {
        row[2:4]: row.rsplit(" | ", 1)[1].rstrip(" |") for row in lines if row.startswith("| H")
    }
    assert verdicts == {
        "H1": "holds",
        "H2": "not shown",
        "H3": "fails",
        "H4": "holds",
        "H5": "fails",
    }, text
    assert os.path.exists(os.path.join(report_dir, "mechanism_metrics.png"))
    # The baseline is one shared run: no interval.
    assert "| Baseline ResNet | 1 | 60.0 (1 run) |" in text
    assert "+1.5 points, within 2 points: the baseline is on its plateau" in text
    # Identical twins: 60 % against the bound 0.15 / archetype accuracy (absent here: no line).
    assert "Baseline ResNet on identical twins" not in text


def test_convergence_check_is_the_baseline_against_twice_the_pretraining():
    systems = _systems()
    check = next(s for s in systems if s.name == suites_lib.CONVERGENCE_CHECK)
    base = suite_base_config(SUITE)
    config = suites_lib.system_config(SUITE, check, base)
    assert check is systems[-1] and check.stages == ("pretrain",)  # It runs last.
    assert config.stages.pretrain.epochs == 2 * base.stages.pretrain.epochs
    assert config.data.dataset == suites_lib.MECHANISM_DATASETS["cue"][0]
    baseline = next(s for s in systems if s.name == "baseline_cue")
    for longer, expected in ((0.619, "within 2 points"), (0.621, "more than 2 points")):
        finished = {
            baseline.name: _result(0.60, 0.15, 100e6, 1, 0.0),
            check.name: _result(longer, 0.15, 100e6, 1, 0.0),
        }
        study = mechanism_report._Study(systems, finished)
        [line] = [x for x in mechanism_report.convergence_lines(study, check.label) if "%" in x]
        assert expected in line, line
    study = mechanism_report._Study(systems, {baseline.name: _result(0.6, 0.15, 1e8, 1, 0.0)})
    assert "not finished" in "\n".join(mechanism_report.convergence_lines(study, check.label))


def test_identical_twins_baseline_is_checked_against_the_image_only_bound():
    systems = _systems()
    check = next(s for s in systems if s.name == suites_lib.CONVERGENCE_CHECK)
    # 4 cities per archetype, archetype accuracy 0.96: ceiling 0.24, the bound 0.25 (1/4).
    for accuracy, expected in (
        (0.235, "1.5 points below, within 2"),
        (0.2, "5.0 points below, more than 2"),
    ):
        identical = {**_result(accuracy, 0.24, 1e8, 1, 0.0), "archetype_accuracy": 0.96}
        study = mechanism_report._Study(systems, {"baseline_identical": identical})
        text = "\n".join(mechanism_report.convergence_lines(study, check.label))
        assert "can exceed 25.0 %" in text and expected in text, text
