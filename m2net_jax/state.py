"""What a training stage holds: the stages, the two networks, their variables, the train state
and the optimizers.

BlockDrop's schedule, which M²Net follows, has three stages (paper §4.1.3): *pretrain* trains
the recognizer (and, beside it, the image classifier whose ResNet-10 the policy network's image
branch starts from), *policy* trains the policy network against the frozen recognizer, and
*finetune* trains both. A stage is data (`StageSpec`): which networks it runs and which of them
the optimizer updates. Frozen networks are frozen by construction: their parameters are never
passed to the optimizer.

Variables are one tree for all networks, ``{'params': {'recognizer': ..., 'policy': ...,
'image_classifier': ...}, 'batch_stats': {...}}`` (the image classifier only with
`config.policy.image_init='pretrained'`); `network_variables` cuts out one network's
``{'params', 'batch_stats'}`` for `Module.apply`.

This module needs only jax, flax, optax and the models: no data stack, no checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from m2net_jax.models import (
    ImageClassifier,
    PolicyNetwork,
    Recognizer,
    with_trained_image_branch,
)

AXIS = "data"  # The one mesh axis: data parallelism over every device of every process.
STAGES = ("pretrain", "policy", "finetune")
COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What distinguishes one stage of the schedule from another."""

    name: str
    # Which networks ('recognizer', 'policy', 'image_classifier') the stage runs; one the job
    # does not have (the image classifier with `policy.image_init='random'`) is left out.
    networks: tuple[str, ...]
    trains: tuple[str, ...]  # Which of them the optimizer updates.

    @property
    def uses_policy(self) -> bool:
        """Whether blocks are chosen by the policy network (else all of them run)."""
        return "policy" in self.networks


STAGE_SPECS = {
    "pretrain": StageSpec(
        "pretrain",
        networks=("recognizer", "image_classifier"),
        trains=("recognizer", "image_classifier"),
    ),
    "policy": StageSpec("policy", networks=("recognizer", "policy"), trains=("policy",)),
    "finetune": StageSpec(
        "finetune", networks=("recognizer", "policy"), trains=("recognizer", "policy")
    ),
}


def parse_stages(run: str) -> tuple[str, ...]:
    """'pretrain,policy' -> ('pretrain', 'policy'), validated and in schedule order."""
    names = tuple(s.strip() for s in run.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ValueError(
            f"config.stages.run={run!r} names unknown stages {unknown}; use a comma-separated "
            f"subset of {','.join(STAGES)}."
        )
    return tuple(s for s in STAGES if s in names)


# --------------------------------------------------------------------------------------------
# The networks and their variables.

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_INITS = ("pretrained", "random")  # config.policy.image_init


def compute_dtype(name: str, backend: str | None = None):
    """The networks' computation dtype for `config.compute_dtype`.

    'float32' or 'bfloat16'; 'auto' is bfloat16 on GPU and TPU, whose matrix units run it at
    several times float32's rate, and float32 on CPU, where XLA emulates bfloat16 convolutions
    and gains nothing. `backend` defaults to JAX's default backend.
    """
    if name == "auto":
        backend = jax.default_backend() if backend is None else backend
        return jnp.bfloat16 if backend in ("gpu", "cuda", "rocm", "tpu") else jnp.float32
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.compute_dtype={name!r} is not supported; use 'float32', 'bfloat16' or "
            "'auto' (bfloat16 on GPU/TPU, float32 on CPU)."
        )
    return COMPUTE_DTYPES[name]


@flax.struct.dataclass
class Networks:
    """The networks of M²Net as module definitions (static: no parameters).

    `image_classifier` is the policy's ResNet-10 trained as a classifier during pretraining
    (`config.policy.image_init='pretrained'`), else None.
    """

    recognizer: Recognizer = flax.struct.field(pytree_node=False)
    policy: PolicyNetwork = flax.struct.field(pytree_node=False)
    image_classifier: ImageClassifier | None = flax.struct.field(pytree_node=False, default=None)


def create_networks(config, num_classes: int) -> Networks:
    """The recognizer and policy network a config describes, batch norm synced over 'data'.

    Both compute in `config.compute_dtype` (`compute_dtype`). Whatever it is, parameters, batch
    norm statistics, logits and keep probabilities stay float32 (the modules' `dtype` fields),
    so the optimizer state and the losses are float32 and checkpoints do not depend on it.

    Args:
      config: a config with `recognizer` and `policy` groups (see `configs/base.py`).
      num_classes: K, the dataset's class count.
    """
    dtype = compute_dtype(config.compute_dtype)
    recognizer = Recognizer(
        depth=config.recognizer.depth,
        num_classes=num_classes,
        width=config.recognizer.width,
        stem=config.recognizer.stem,
        conv_type=config.recognizer.conv_type,
        geo_conditioning=config.recognizer.geo_conditioning,
        dtype=dtype,
        axis_name=AXIS,
    )
    policy = PolicyNetwork(
        num_blocks=recognizer.num_blocks,
        use_geo=config.policy.use_geo,
        fusion_alpha=config.policy.fusion_alpha,
        width=config.policy.width,
        stem=config.policy.stem,
        dtype=dtype,
        axis_name=AXIS,
    )
    image_classifier = None
    if config.policy.image_init == "pretrained":
        image_classifier = ImageClassifier(
            num_classes=num_classes,
            width=config.policy.width,
            stem=config.policy.stem,
            dtype=dtype,
            axis_name=AXIS,
        )
    elif config.policy.image_init != "random":
        raise ValueError(
            f"config.policy.image_init={config.policy.image_init!r}; use one of {IMAGE_INITS}."
        )
    return Networks(recognizer=recognizer, policy=policy, image_classifier=image_classifier)


def init_variables(networks: Networks, key: jax.Array, image_size: int) -> dict[str, Any]:
    """Initial ``{'params', 'batch_stats'}`` of the networks, each ``{'recognizer', 'policy'}``
    (and ``'image_classifier'`` when `networks` has one).

    Each network's initial values depend only on `key` and its own definition, so a policy
    network initialised next to another recognizer is the same. Runs outside shard_map, on
    copies of the modules without a batch-norm axis.
    """
    return _init_variables(networks, key, image_size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_variables(networks: Networks, key: jax.Array, image_size: int) -> dict[str, Any]:
    rec = networks.recognizer.clone(axis_name=None)
    pol = networks.policy.clone(axis_name=None)
    k_rec, k_pol = jax.random.split(key)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    policy_images = jnp.zeros((1, image_size // 2, image_size // 2, 3), jnp.float32)
    locations = jnp.zeros((1, 8), jnp.float32)
    all_on = jnp.ones((1, rec.num_blocks))
    v_rec = rec.init(k_rec, images, all_on, train=False, **location_kwargs(rec, locations))
    v_pol = pol.init(k_pol, policy_images, locations, train=False)
    out = {c: {"recognizer": v_rec[c], "policy": v_pol[c]} for c in COLLECTIONS}
    if networks.image_classifier is not None:
        classifier = networks.image_classifier.clone(axis_name=None)
        v_cls = classifier.init(jax.random.fold_in(key, 2), policy_images, train=False)
        for c in COLLECTIONS:
            out[c]["image_classifier"] = v_cls[c]
    return out


def location_kwargs(recognizer: Recognizer, locations) -> dict[str, Any]:
    """The recognizer's location argument: only M²Net+ recognizers take one."""
    return {"locations": locations} if recognizer.geo_conditioning else {}


def network_variables(variables: Mapping[str, Any], network: str) -> dict[str, Any]:
    """One network's ``{'params', 'batch_stats'}`` out of the two-network tree, for `apply`."""
    return {c: variables[c][network] for c in COLLECTIONS}


def select_networks(variables: Mapping[str, Any], networks) -> dict[str, Any]:
    """The networks' tree restricted to `networks` (names; those it does not hold are skipped)."""
    return {c: {n: variables[c][n] for n in networks if n in variables[c]} for c in COLLECTIONS}


def complete_variables(variables: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` with the networks it lacks taken from `fresh` (e.g. a new policy network
    next to a pretrained recognizer).

    A new policy network next to a trained image classifier (the pretrain stage's, with
    `config.policy.image_init='pretrained'`) starts its image branch from that classifier
    (`models.with_trained_image_branch`).
    """
    out = {c: {**fresh[c], **variables[c]} for c in COLLECTIONS}
    if "policy" not in variables["params"] and "image_classifier" in variables["params"]:
        policy = with_trained_image_branch(
            network_variables(out, "policy"), network_variables(variables, "image_classifier")
        )
        for c in COLLECTIONS:
            out[c]["policy"] = policy[c]
    return out


def model_signature(config, num_classes: int, spec: StageSpec) -> dict[str, Any]:
    """The config values that fix a stage's checkpoint shapes (checked when resuming)."""
    sig = {
        "data.image_size": config.data.image_size,
        "num_classes": num_classes,
        **{f"recognizer.{k}": v for k, v in config.recognizer.items()},
    }
    if spec.uses_policy:
        sig.update({f"policy.{k}": config.policy[k] for k in ("use_geo", "width", "stem")})
    if "image_classifier" in spec.networks:
        sig["policy.image_init"] = config.policy.image_init
        if config.policy.image_init == "pretrained":
            sig.update({f"policy.{k}": config.policy[k] for k in ("width", "stem")})
    return sig


def networks_from_signature(signature: Mapping[str, Any], config) -> Networks:
    """The networks a checkpoint was written for: its recorded class count, the config's rest."""
    return create_networks(config, int(signature["num_classes"]))


# --------------------------------------------------------------------------------------------
# The train state and the optimizers.


@flax.struct.dataclass
class TrainState:
    """Everything a stage needs to continue exactly where it stopped (with the data iterator).

    `opt_state` covers only the stage's trainable networks: frozen ones are not passed to the
    optimizer at all. `rng` is the stage's base key; step t uses `fold_in(rng, t)`.
    """

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: optax.OptState
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """``{'params', 'batch_stats'}`` of the stage's networks."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def trainable(tree: Mapping[str, Any], spec: StageSpec) -> dict[str, Any]:
    """The entries of a per-network tree (params, grads) that the stage's optimizer updates."""
    return {name: tree[name] for name in spec.trains if name in tree}


def make_optimizer(stage_cfg, *, steps_per_epoch: int) -> optax.GradientTransformation:
    """The stage's optax optimizer: (SGD-Nesterov | Adam) with L2 decay and an LR schedule.

    The optimizer state's tree depends on the optimizer and schedule kinds only, not on
    `steps_per_epoch` (which sets the schedule's length): checkpoints restore into a state built
    for any dataset size.
    """
    total_steps = max(1, stage_cfg.epochs * steps_per_epoch)
    warmup = min(stage_cfg.warmup_epochs * steps_per_epoch, total_steps - 1)
    if stage_cfg.schedule == "cosine" and warmup:
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=stage_cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=total_steps,
        )
    elif stage_cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(stage_cfg.learning_rate, decay_steps=total_steps)
    elif stage_cfg.schedule == "constant":
        lr = optax.constant_schedule(stage_cfg.learning_rate)
    else:
        raise ValueError(f"Unknown schedule {stage_cfg.schedule!r}; use 'cosine' or 'constant'.")
    if stage_cfg.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=stage_cfg.momentum, nesterov=True)
    elif stage_cfg.optimizer == "adam":
        opt = optax.adam(lr)
    else:
        raise ValueError(f"Unknown optimizer {stage_cfg.optimizer!r}; use 'sgd' or 'adam'.")
    # Coupled L2 decay, as PyTorch's `weight_decay` in BlockDrop's reference.
    return optax.chain(optax.add_decayed_weights(stage_cfg.weight_decay), opt)


def create_train_state(
    variables: Mapping[str, Any], spec: StageSpec, tx: optax.GradientTransformation, key
) -> TrainState:
    """A stage's state at step 0: its networks' variables and a fresh optimizer state."""
    variables = select_networks(variables, spec.networks)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(trainable(variables["params"], spec)),
        rng=key,
    )


def _with_sharding(tree, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def abstract_variables(networks: Networks, image_size: int, sharding=None) -> dict[str, Any]:
    """Shapes and dtypes (and `sharding`) of both networks' variables, computed without FLOPs."""
    init = functools.partial(init_variables, networks, image_size=image_size)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    return _with_sharding(shapes, sharding)


def abstract_train_state(stage: str, config, networks: Networks, sharding=None) -> TrainState:
    """Shapes, dtypes (and `sharding`) of a stage's TrainState, for restoring a checkpoint.

    Built for a one-step epoch: the tree does not depend on the schedule's length.
    """
    spec = STAGE_SPECS[stage]
    tx = make_optimizer(config.stages[stage], steps_per_epoch=1)

    def build():
        key = jax.random.PRNGKey(0)
        variables = init_variables(networks, key, config.data.image_size)
        return create_train_state(variables, spec, tx, key)

    return _with_sharding(jax.eval_shape(build), sharding)
