"""m2net_jax.state: stages, the networks' variables, and the train state's shape."""

import jax
import jax.numpy as jnp
import pytest

from m2net_jax import state as state_lib
from m2net_jax.configs import r47


def _config():
    c = r47.get_config("smoke")
    c.recognizer.depth = 29
    return c


@pytest.mark.parametrize("stage", state_lib.STAGES)
def test_optimizer_state_tree_does_not_depend_on_the_dataset_size(stage):
    """Restoring builds the state for a one-step epoch; any schedule length gives that tree."""
    config = _config()
    networks = state_lib.create_networks(config, num_classes=8)
    spec = state_lib.STAGE_SPECS[stage]

    def tree(steps_per_epoch):
        tx = state_lib.make_optimizer(config.stages[stage], steps_per_epoch=steps_per_epoch)

        def build():
            key = jax.random.PRNGKey(0)
            variables = state_lib.init_variables(networks, key, config.data.image_size)
            return state_lib.create_train_state(variables, spec, tx, key)

        return jax.eval_shape(build)

    shapes = [tree(n) for n in (1, 7, 12_345)]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[2])
    assert shapes[0] == shapes[1] == shapes[2]
    abstract = state_lib.abstract_train_state(stage, config, networks)
    assert jax.tree.structure(abstract) == jax.tree.structure(shapes[1])


def test_stages_hold_only_their_networks_and_train_only_theirs():
    config = _config()
    networks = state_lib.create_networks(config, num_classes=8)
    variables = state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size)
    tx = state_lib.make_optimizer(config.stages.pretrain, steps_per_epoch=3)
    pretrain = state_lib.create_train_state(
        variables, state_lib.STAGE_SPECS["pretrain"], tx, jax.random.PRNGKey(1)
    )
    # Pretraining also trains the classifier the policy's image branch will start from.
    assert set(pretrain.params) == {"recognizer", "image_classifier"}
    assert set(pretrain.opt_state[1][0].trace) == {"recognizer", "image_classifier"}
    tx = state_lib.make_optimizer(config.stages.policy, steps_per_epoch=3)
    policy = state_lib.create_train_state(
        variables, state_lib.STAGE_SPECS["policy"], tx, jax.random.PRNGKey(1)
    )
    assert set(policy.params) == {"recognizer", "policy"}
    # The optimizer state mirrors the policy network only: the recognizer is frozen.
    params_leaves = len(jax.tree.leaves(variables["params"]["policy"]))
    moments = [x for x in jax.tree.leaves(policy.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * params_leaves  # Adam's mu and nu, for the policy only.


def test_without_a_pretrained_image_branch_pretraining_holds_the_recognizer_only():
    config = _config()
    config.policy.image_init = "random"
    networks = state_lib.create_networks(config, num_classes=8)
    assert networks.image_classifier is None
    variables = state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size)
    assert set(variables["params"]) == {"recognizer", "policy"}
    tx = state_lib.make_optimizer(config.stages.pretrain, steps_per_epoch=3)
    pretrain = state_lib.create_train_state(
        variables, state_lib.STAGE_SPECS["pretrain"], tx, jax.random.PRNGKey(1)
    )
    assert set(pretrain.params) == {"recognizer"}


def _branch(variables, network, collection="params"):
    return variables[collection][network]["img_resnet10"]


def test_a_new_policy_network_starts_its_image_branch_from_the_trained_classifier():
    """The policy stage's start (complete_variables after pretraining): the image branch's stem
    and blocks, parameters and batch statistics, are the classifier's; its last layer (N
    outputs, not K) and the location branch are the fresh network's."""
    config = _config()
    networks = state_lib.create_networks(config, num_classes=8)
    fresh = state_lib.init_variables(networks, jax.random.PRNGKey(0), config.data.image_size)
    # "Trained" variables: every leaf of the pretrain stage's networks moved away from fresh.
    pretrained = jax.tree.map(
        lambda x: x + 1.0, state_lib.select_networks(fresh, ("recognizer", "image_classifier"))
    )
    start = state_lib.complete_variables(pretrained, fresh)

    for collection in ("params", "batch_stats"):
        trained = _branch(pretrained, "image_classifier", collection)
        branch = _branch(start, "policy", collection)
        assert set(branch) == set(_branch(fresh, "policy", collection))
        for name in branch:
            expected = _branch(fresh, "policy", collection)[name] if name == "fc" else trained[name]
            for a, b in zip(jax.tree.leaves(branch[name]), jax.tree.leaves(expected), strict=True):
                assert a.shape == b.shape
                assert jnp.array_equal(a, b), (collection, name)
    assert _branch(start, "policy")["fc"]["kernel"].shape[-1] == networks.recognizer.num_blocks
    assert _branch(pretrained, "image_classifier")["fc"]["kernel"].shape[-1] == 8
    for a, b in zip(
        jax.tree.leaves(start["params"]["policy"]["loc_mlp"]),
        jax.tree.leaves(fresh["params"]["policy"]["loc_mlp"]),
        strict=True,
    ):
        assert jnp.array_equal(a, b)
    # The recognizer is the trained one; a policy network already present is kept as it is.
    assert jnp.array_equal(
        jax.tree.leaves(start["params"]["recognizer"])[0],
        jax.tree.leaves(pretrained["params"]["recognizer"])[0],
    )
    again = state_lib.complete_variables(start, fresh)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, again["params"], start["params"]))


def test_network_variables_cuts_out_one_network():
    tree = {"params": {"a": 1, "b": 2}, "batch_stats": {"a": 3, "b": 4}}
    assert state_lib.network_variables(tree, "b") == {"params": 2, "batch_stats": 4}


def test_parse_stages_validates_and_orders():
    assert state_lib.parse_stages("finetune, pretrain") == ("pretrain", "finetune")
    with pytest.raises(ValueError, match="unknown stages"):
        state_lib.parse_stages("pretrain,polcy")


def test_auto_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert state_lib.compute_dtype("auto", backend="cpu") == jnp.float32
    assert state_lib.compute_dtype("auto", backend="gpu") == jnp.bfloat16
    assert state_lib.compute_dtype("auto", backend="tpu") == jnp.bfloat16
    assert state_lib.compute_dtype("float32") == jnp.float32
    assert state_lib.compute_dtype("bfloat16") == jnp.bfloat16


def test_unknown_compute_dtype_names_the_config_key():
    with pytest.raises(ValueError, match="config.compute_dtype='float16'"):
        state_lib.compute_dtype("float16")
