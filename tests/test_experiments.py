"""The comparison driver: suites of systems, shared checkpoints, resume, report and plots."""

import dataclasses
import json
import os

import pytest

from m2net_jax import experiments

PLOTS = (
    "fig5_twin_paths.png",
    "fig7_diversity_vs_pr.png",
    "fig9_accuracy_vs_flops.png",
    "fig10_accuracy_vs_pr.png",
    "fig11_compatibility.png",
)


@pytest.fixture(scope="module")
def smoke_suite(smoke_data_dir, tmp_path_factory):
    """The smoke suite run once: (workdir, report directory, report text, systems)."""
    workdir = str(tmp_path_factory.mktemp("suite"))
    report_dir = str(tmp_path_factory.mktemp("docs"))
    report = experiments.run_suite("smoke", workdir, data_dir=smoke_data_dir, report_dir=report_dir)
    assert report == os.path.join(report_dir, "report.md")
    with open(report) as f:
        text = f.read()
    base = experiments.load_config(experiments.SUITES["smoke"].config)
    systems = experiments.suite_systems(experiments.SUITES["smoke"], base)
    return workdir, report_dir, text, systems


def test_every_suite_has_every_system_of_the_paper_and_m2net_plus():
    for name, suite in experiments.SUITES.items():
        if suite.kind == "mechanism":  # tests/test_mechanism_suite.py
            continue
        base = experiments.load_config(suite.config)
        systems = experiments.suite_systems(suite, base)
        names = [s.name for s in systems]
        assert len(set(names)) == len(names), name
        depth = base.recognizer.depth
        expected = {
            "baseline_r29",
            "baseline_r47",
            "baseline_r65",
            "mobilenet",
            "shufflenet_g2",
            "shufflenet_g4",
            "hetconv_p2",
            "hetconv_p4",
            "blockdrop",
            "m2net",
            "remove_u",
            "m2net_mobilenet",
            "m2net_shufflenet_g4",
            "m2net_hetconv_p4",
            "m2net_plus",
        }
        assert expected <= set(names), name
        by_name = {s.name: s for s in systems}
        for system in systems:
            if system.shares_pretrain:  # A shared checkpoint is made before it is used.
                assert names.index(system.shares_pretrain) < names.index(system.name)
        assert by_name["m2net"].shares_pretrain == f"baseline_r{depth}"
        blockdrop = experiments.system_config(suite, by_name["blockdrop"], base)
        assert not blockdrop.policy.use_geo and blockdrop.reward.theta_d == 0
        assert experiments.system_config(suite, by_name["remove_u"], base).policy.use_geo
        plus = experiments.system_config(suite, by_name["m2net_plus"], base)
        assert plus.recognizer.geo_conditioning
        sweep = [s for s in systems if s.group == "sweep"]
        assert len(sweep) == 3 * len(suite.penalty_scales)
        for s in sweep:
            c = experiments.system_config(suite, s, base)
            for stage in ("policy", "finetune"):
                assert c.stages[stage].penalty == s.penalty_scale * base.stages[stage].penalty


# Train split sizes: geo_twins/smoke 8 classes x 16, geo_twins 5120; Landmark sets unknown.
TRAIN_EXAMPLES = {
    "geo_twins/smoke": 128,
    "geo_twins": 5120,
    "geo_twins/32px": 5120,
    "geo_twins/32px_identical": 5120,
}


@pytest.mark.parametrize("suite_name", list(experiments.SUITES))
def test_every_system_of_every_suite_passes_the_config_check(suite_name):
    """A system whose config fails at start-up (a curriculum that cannot complete, say) would
    stop a suite hours in; every one is checked here."""
    from m2net_jax import validation

    suite = experiments.SUITES[suite_name]
    base = experiments.suite_base_config(suite)
    for system in experiments.suite_systems(suite, base):
        config = experiments.system_config(suite, system, base)
        config.stages.run = ",".join(system.stages)
        examples = TRAIN_EXAMPLES.get(config.data.dataset)
        problems = validation.validate_config(config, num_train_examples=examples)
        assert problems.errors == [], (system.name, problems.errors)


def test_accuracy_noise_is_the_binomial_standard_deviation_of_the_difference():
    a = {"accuracy": 0.5, "num_examples": 100}  # variance 0.25 / 100 each
    b = {"accuracy": 0.1, "num_examples": 400}  # variance 0.09 / 400
    expected = 100 * (0.25 / 100 + 0.09 / 400) ** 0.5
    assert experiments.accuracy_difference_std(a, b) == pytest.approx(expected)
    assert experiments.accuracy_difference_std(a, a) == pytest.approx(100 * 0.005**0.5)


def test_an_unknown_override_or_suite_is_a_clear_error(tmp_path):
    suite = experiments.SUITES["smoke"]
    base = experiments.load_config(suite.config)
    typo = experiments.System("x", "X", "policy", {"reward.theta_dd": 0.0})
    with pytest.raises(KeyError, match="theta_dd"):
        experiments.system_config(suite, typo, base)
    with pytest.raises(ValueError, match="Unknown suite"):
        experiments.run_suite("nope", str(tmp_path))


def test_smoke_suite_reports_every_system_and_writes_every_plot(smoke_suite):
    _, report_dir, text, systems = smoke_suite
    for system in systems:
        assert f"| {system.label} |" in text, system.name
    for plot in PLOTS:
        path = os.path.join(report_dir, plot)
        assert os.path.getsize(path) > 1000, plot
        assert f"]({plot})" in text, plot
    for claim in ("BlockDrop (Table 3)", "Remove-U > Remove-MLP", "M²Net on MobileNet"):
        assert claim in text


def test_systems_share_a_finished_pretraining_instead_of_repeating_it(smoke_suite):
    workdir, _, _, _ = smoke_suite
    for name in ("m2net", "blockdrop", "remove_u", "m2net_penalty_x0.5"):
        with open(os.path.join(workdir, name, "shared_pretrain.json")) as f:
            assert json.load(f)["source"] == os.path.join(workdir, "baseline_r29")
        with open(os.path.join(workdir, name, "timing.json")) as f:
            assert json.load(f)["stages"] == ["policy", "finetune"]
    # The smoke suite's compact backbones do not train, so there is nothing to share: the
    # compatibility systems run their own (0-epoch) pretraining.
    assert not os.path.exists(os.path.join(workdir, "m2net_mobilenet", "shared_pretrain.json"))
    with open(os.path.join(workdir, "m2net_mobilenet", "results.json")) as f:
        assert set(json.load(f)) == {"pretrain", "policy", "finetune"}


def test_rerun_skips_finished_systems_and_rejects_a_changed_one(smoke_suite, smoke_data_dir):
    workdir, _, _, systems = smoke_suite
    suite = experiments.SUITES["smoke"]
    base = experiments.load_config(suite.config)
    base.data.data_dir = smoke_data_dir
    by_name = {s.name: s for s in systems}
    for system in systems:
        path = os.path.join(workdir, system.name, "results.json")
        stamp = os.path.getmtime(path)
        experiments.run_system(suite, system, workdir, base_config=base, systems_by_name=by_name)
        assert os.path.getmtime(path) == stamp, system.name

    changed = dataclasses.replace(by_name["remove_u"], overrides={"reward.theta_d": 0.25})
    with pytest.raises(ValueError, match="Delete that directory"):
        experiments.run_system(suite, changed, workdir, base_config=base, systems_by_name=by_name)
