"""m2net_jax.validation: every bad value refused with its key, the curriculum check, the configs."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from m2net_jax import policy_gradient as pg
from m2net_jax import state as state_lib
from m2net_jax import validation
from m2net_jax.configs import base, quickstart, r29, r47, r65
from m2net_jax.user_errors import UserError


def config_with(**values):
    """The base config with dotted keys (``stages__policy__penalty``) set."""
    c = base.get_config()
    for dotted, value in values.items():
        *parents, leaf = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_base_config_has_no_problems():
    problems = validation.validate_config(base.get_config(), device_count=4, process_count=2)
    assert problems.errors == [] and problems.warnings == []


BAD_VALUES = [
    ("mode", "test"),
    ("on_nonfinite", "ignore"),
    ("data.image_size", 33),
    ("data.image_size", 4),
    ("data.worker_count", -1),
    ("recognizer.depth", 50),
    ("recognizer.width", 0),
    ("recognizer.stem", "large"),
    ("recognizer.conv_type", "resnext"),
    ("policy.fusion_alpha", -0.1),
    ("policy.fusion_alpha", 1.5),
    ("policy.width", 0),
    ("policy.stem", "large"),
    ("reward.theta_s", -1.0),
    ("reward.theta_d", -0.5),
    ("sampling.bound", 0.4),
    ("sampling.bound", 1.1),
    ("sampling.curriculum_epochs", 0.0),
    ("policy.image_init", "imagenet"),
    ("stages.run", "pretrain,polcy"),
    ("stages.run", ""),
    *[(f"stages.{s}.learning_rate", v) for s in validation.STAGES for v in (0.0, -0.1)],
    ("stages.pretrain.learning_rate", float("nan")),
    ("stages.policy.learning_rate", float("inf")),
    *[(f"stages.{s}.batch_size", v) for s in validation.STAGES for v in (0, -8)],
    *[(f"stages.{s}.epochs", -1) for s in validation.STAGES],
    ("stages.pretrain.warmup_epochs", -1),
    ("stages.pretrain.warmup_epochs", 30),
    ("stages.pretrain.optimizer", "adamw"),
    ("stages.policy.schedule", "linear"),
    ("stages.pretrain.momentum", 1.0),
    ("stages.pretrain.momentum", -0.1),
    ("stages.pretrain.weight_decay", -1e-4),
    ("stages.policy.penalty", -5.0),
    ("stages.finetune.penalty", -10.0),
    ("stages.policy.entropy_weight", -0.1),
    ("checkpoint.save_interval_steps", 0),
    ("checkpoint.max_to_keep", 0),
    ("log.every_steps", 0),
    ("eval.batch_size", 0),
    ("eval.step", -2),
    ("eval.split", "validation"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_out_of_range_value_is_refused_naming_its_key(key, value):
    problems = validation.validate_config(config_with(**{key.replace(".", "__"): value}))
    assert len(problems.errors) == 1, problems.errors
    assert problems.errors[0].startswith(f"config.{key}={value!r} ")
    assert f"--config.{key}" in problems.errors[0]  # The fix names the override.


def test_negative_penalty_is_refused_with_the_positive_value_to_give():
    (error,) = validation.validate_config(config_with(stages__policy__penalty=-5.0)).errors
    assert "without its sign" in error and "--config.stages.policy.penalty=5.0" in error


def test_epochs_0_is_allowed_for_a_stage_that_does_not_run():
    c = config_with(stages__run="policy,finetune", stages__pretrain__epochs=0)
    c.stages.pretrain.warmup_epochs = 0
    assert validation.validate_config(c).errors == []


def test_batch_must_split_over_devices_and_processes():
    c = config_with(stages__pretrain__batch_size=130)
    (error,) = validation.validate_config(c, device_count=4).errors
    assert "multiple of 4" in error and "--config.stages.pretrain.batch_size=128" in error
    # 6 devices over 4 processes: a multiple of lcm(6, 4) = 12.
    errors = validation.validate_config(base.get_config(), device_count=6, process_count=4).errors
    keys = sorted(e.split("=")[0] for e in errors)
    assert keys == ["config.eval.batch_size"] + [
        f"config.stages.{s}.batch_size" for s in ("finetune", "policy", "pretrain")
    ]
    assert all("multiple of 12" in e for e in errors)


def test_batch_larger_than_the_train_split_is_refused():
    (error,) = validation.validate_config(
        config_with(stages__policy__batch_size=256), num_train_examples=200
    ).errors
    assert error.startswith("config.stages.policy.batch_size=256 exceeds the 200 training")


def test_warmup_as_long_as_the_stage_is_refused():
    c = config_with(stages__pretrain__epochs=3, stages__pretrain__warmup_epochs=3)
    (error,) = validation.validate_config(c).errors
    assert "config.stages.pretrain.warmup_epochs=3" in error
    assert "--config.stages.pretrain.warmup_epochs=2" in error


def test_width_must_split_into_the_conv_types_groups():
    c = config_with(recognizer__conv_type="shufflenet_g4", recognizer__width=10)
    (error,) = validation.validate_config(c).errors
    assert error.startswith("config.recognizer.width=10 must be a multiple of 4")


@pytest.mark.parametrize(
    ("size", "direction"), [(64, "resized up to 64 px"), (16, "resized down to 16 px")]
)
def test_image_size_other_than_the_built_one_is_a_warning_saying_what_is_resized(size, direction):
    problems = validation.validate_config(config_with(data__image_size=size), dataset_image_size=32)
    assert problems.errors == []
    (warning,) = problems.warnings
    assert warning.startswith(f"config.data.image_size={size} differs from the 32 px photos")
    assert direction in warning and "--config.data.image_size=32" in warning


def test_image_size_of_the_built_one_or_unknown_is_silent():
    c = base.get_config()
    assert validation.validate_config(c, dataset_image_size=32).warnings == []
    assert validation.validate_config(c, dataset_image_size=None).warnings == []


def test_imagenet_stem_on_small_photos_is_a_warning():
    (warning,) = validation.validate_config(config_with(recognizer__stem="imagenet")).warnings
    assert warning.startswith("config.recognizer.stem='imagenet' shrinks")


def test_stages_out_of_order_warn_with_the_order_they_run_in():
    run = "finetune,pretrain,policy"
    problems = validation.validate_config(config_with(stages__run=run))
    assert problems.errors == []
    (warning,) = problems.warnings
    assert f"--config.stages.run={','.join(state_lib.parse_stages(run))}" in warning


def test_skipped_middle_stage_is_a_warning():
    (warning,) = validation.validate_config(config_with(stages__run="pretrain,finetune")).warnings
    assert "skips policy" in warning


def test_schedule_order_is_trains():
    assert validation.STAGES == state_lib.STAGES == base.STAGES


def test_constant_schedule_with_warmup_is_a_warning():
    c = config_with(stages__pretrain__schedule="constant")
    problems = validation.validate_config(c)
    assert problems.errors == []
    assert problems.warnings[0].startswith("config.stages.pretrain.warmup_epochs=1 is ignored")


# --- the curriculum (issue 16) ---------------------------------------------------------------


def _steps_at_full_k(num_blocks, curriculum_epochs, steps_per_epoch, total_steps):
    """Steps of a stage of `total_steps` spent at k = N, by pg.curriculum_k."""
    steps_per_k = pg.curriculum_steps(curriculum_epochs, steps_per_epoch)
    ks = np.asarray(
        pg.curriculum_k(jnp.arange(total_steps), num_blocks=num_blocks, steps_per_k=steps_per_k)
    )
    return int(np.sum(ks == num_blocks)), steps_per_k


@pytest.mark.parametrize("depth", [29, 47, 65])
@pytest.mark.parametrize(
    "curriculum_epochs, steps_per_epoch", [(1.0, 5), (3.0, 2), (0.5, 7), (0.4, 40), (1 / 16, 8)]
)
def test_policy_steps_needed_is_the_shortest_stage_ending_a_curriculum_step_at_k_n(
    depth, curriculum_epochs, steps_per_epoch
):
    """Shortest stage (in steps) whose curriculum reaches k = N and spends a whole curriculum
    step there, found by running pg.curriculum_k; and the epoch count is N · E."""
    n = validation.num_blocks(depth)
    assert n == {29: 9, 47: 15, 65: 21}[depth]
    needed = validation.policy_steps_needed(n, curriculum_epochs, steps_per_epoch)
    for total in (needed - 1, needed):
        at_n, steps_per_k = _steps_at_full_k(n, curriculum_epochs, steps_per_epoch, total)
        assert (at_n >= steps_per_k) == (total == needed)
    assert validation.policy_epochs_needed(n, curriculum_epochs) == n * curriculum_epochs


@pytest.mark.parametrize("num_train_examples", [None, 128 * 40])
def test_policy_stage_is_long_enough_exactly_when_the_curriculum_completes(num_train_examples):
    """validate_config against the curriculum run step by step (epoch check and step check)."""
    for depth, per_k, epochs in [(65, 3.0, 62), (65, 3.0, 63), (47, 0.4, 5), (47, 0.4, 6)]:
        c = config_with(
            recognizer__depth=depth,
            sampling__curriculum_epochs=per_k,
            stages__policy__epochs=epochs,
            stages__policy__batch_size=128,
        )
        n = validation.num_blocks(depth)
        at_n, steps_per_k = _steps_at_full_k(n, per_k, 40, epochs * 40)
        errors = validation.validate_config(c, num_train_examples=num_train_examples).errors
        assert (errors == []) == (at_n >= steps_per_k), (depth, per_k, epochs, errors)


def test_short_policy_stage_is_refused_with_the_epochs_that_work():
    c = config_with(
        recognizer__depth=65, stages__policy__epochs=60, sampling__curriculum_epochs=3.0
    )
    (error,) = validation.validate_config(c).errors
    assert error.startswith("config.stages.policy.epochs=60 is too short for the curriculum")
    assert "sampling.curriculum_epochs=3.0" in error and "ends at k=20" in error
    assert "--config.stages.policy.epochs=63" in error
    assert "--config.sampling.curriculum_epochs=2.85" in error
    c.sampling.curriculum_epochs = 2.85
    assert validation.validate_config(c).errors == []
    c.sampling.curriculum_epochs = 3.0
    c.stages.policy.epochs = 63
    assert validation.validate_config(c).errors == []


def test_curriculum_of_a_small_dataset_is_checked_in_whole_steps():
    """8 steps an epoch, E = 1/16 epoch: a curriculum step is 1 step, not half of one, so
    ResNet-65's 21 blocks need 21 steps, 3 epochs (N · E = 1.3 epochs would pass in epochs)."""
    c = config_with(
        recognizer__depth=65,
        sampling__curriculum_epochs=1 / 16,
        stages__policy__epochs=2,
        stages__policy__batch_size=16,
    )
    assert validation.validate_config(c).errors == []  # Size unknown: checked in epochs.
    (error,) = validation.validate_config(c, num_train_examples=128).errors
    assert "ends at k=16" in error and "--config.stages.policy.epochs=3" in error
    assert "--config.sampling" not in error.rsplit(";", 1)[1]  # No E fits in 16 steps.
    c.stages.policy.epochs = 3
    assert validation.validate_config(c, num_train_examples=128).errors == []


def test_curriculum_is_checked_only_when_the_policy_stage_trains():
    short = dict(recognizer__depth=65, stages__policy__epochs=10)
    for other in (dict(stages__run="pretrain"), dict(mode="eval")):
        problems = validation.validate_config(config_with(**short, **other))
        assert problems.errors == [] and problems.warnings == []


def test_a_decaying_policy_learning_rate_is_a_warning():
    c = config_with(stages__policy__schedule="cosine")
    problems = validation.validate_config(c)
    assert problems.errors == []
    assert "config.stages.policy.schedule='cosine' decays the learning rate" in problems.warnings[0]
    assert validation.validate_config(config_with()).warnings == []


SHIPPED = {"base": base.get_config, "quickstart": quickstart.get_config}
for _name, _module in (("r29", r29), ("r47", r47), ("r65", r65)):
    for _variant in ("landmark420", "landmark732", "geo_twins", "smoke"):
        SHIPPED[f"{_name}:{_variant}"] = lambda m=_module, v=_variant: m.get_config(v)
# Train split sizes of the shipped datasets (geo_twins/smoke: 8 classes x 16; geo_twins: 5120;
# Landmark-420/732: unknown until built, so checked in epochs).
TRAIN_EXAMPLES = {"geo_twins/smoke": 128, "geo_twins": 5120}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_config_is_valid_and_its_curriculum_completes(name):
    config = SHIPPED[name]()
    problems = validation.validate_config(
        config, num_train_examples=TRAIN_EXAMPLES.get(config.data.dataset)
    )
    assert problems.errors == []
    assert not any("policy" in w for w in problems.warnings), problems.warnings
    assert config.stages.policy.schedule == "constant"
    assert config.policy.image_init == "pretrained"


def test_check_config_raises_one_config_error_with_every_problem(caplog):
    c = config_with(sampling__bound=0.2, log__every_steps=0, data__image_size=64)
    with caplog.at_level(logging.WARNING), pytest.raises(validation.ConfigError) as info:
        validation.check_config(c, dataset_image_size=32)
    error = info.value
    assert isinstance(error, UserError) and isinstance(error, ValueError)
    assert [e.split("=")[0] for e in error.errors] == [
        "config.sampling.bound",
        "config.log.every_steps",
    ]
    assert str(error).startswith("The config has 2 problems:\n  config.sampling.bound=0.2")
    assert "config.data.image_size=64 differs" in caplog.text


def test_check_config_returns_the_warnings_of_a_valid_config():
    problems = validation.check_config(config_with(data__image_size=64), dataset_image_size=32)
    assert problems.errors == [] and len(problems.warnings) == 1
