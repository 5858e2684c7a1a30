"""Every configuration key of m2net_jax, declared once, grouped by concern.

Paper configs (`r29.py`, `r47.py`, `r65.py`) and `quickstart.py` import this file and override a
few keys. Values follow BlockDrop's schedule where the M²Net paper is silent; see
BUILD_NOTES.md for each choice.

Run a config with:
  python -m m2net_jax.main --config=m2net_jax/configs/quickstart.py --workdir=/tmp/m2net
and override any key, e.g. `--config.reward.theta_d=0` (Remove-U) or `--config.policy.use_geo=False`
(Remove-MLP / BlockDrop). An unknown key is an error.
"""

import ml_collections
from ml_collections import config_dict

STAGES = ("pretrain", "policy", "finetune")


def get_config():
    """Returns the base ConfigDict (R47 on the embedded geo_twins set, 32 px)."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # 'train': run `stages.run` then evaluate them; 'eval': evaluate a workdir.
    c.seed = 0
    # A step with a non-finite loss or gradient never changes the state; then 'stop' the run
    # (the newest checkpoint is the last good one) or 'skip' the step and go on.
    c.on_nonfinite = "stop"
    # The networks' computation dtype: 'float32', 'bfloat16' or 'auto' (bfloat16 on GPU/TPU,
    # float32 on CPU). Parameters, optimizer state, batch norm statistics, logits and losses are
    # float32 whatever it is, so checkpoints move freely between the choices.
    c.compute_dtype = "float32"
    # JAX's persistent compilation cache: unset for $JAX_COMPILATION_CACHE_DIR or else
    # ~/.cache/m2net_jax/jax; a directory to move it; '' to turn it off. Only trusted users may
    # write to it (JAX loads compiled code from it).
    c.compilation_cache_dir = config_dict.placeholder(str)

    # Data: a TFDS name (with optional '/config'), built into `data_dir` (TFDS default if unset).
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "geo_twins"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.image_size = 32  # Recognizer input; the policy network sees image_size // 2.
    c.data.build_if_missing = True  # Only the embedded geo_twins set can be built automatically.
    c.data.worker_count = 0  # grain worker processes (0: in the main process).
    c.data.prefetch_buffer_size = 2
    # A split whose decoded photos take at most this many MB (geo_twins at 32 px: ~15) is decoded
    # once per process and served from host memory; the batches are the same. 0: always from disk.
    c.data.cache_in_memory_mb = 1024

    # Recognition network (§4.1.3).
    c.recognizer = ml_collections.ConfigDict()
    c.recognizer.depth = 47  # 29, 47 or 65: 9, 15 or 21 droppable bottleneck blocks.
    c.recognizer.width = 64
    c.recognizer.stem = "small"  # 'imagenet' (7x7/2 + max-pool) for >= 112 px, 'small' (3x3/1).
    c.recognizer.conv_type = "standard"  # Or a compact backbone (models.CONV_TYPES), §4.4.
    c.recognizer.geo_conditioning = False  # M²Net+: the location also conditions the recognizer.

    # Policy network (§3.3, Tables 1-2).
    c.policy = ml_collections.ConfigDict()
    c.policy.use_geo = True  # False: image-only policy (BlockDrop / Remove-MLP).
    c.policy.fusion_alpha = 0.7
    c.policy.width = 64
    c.policy.stem = "small"
    # Where the image branch (ResNet-10) starts: 'pretrained' trains it as a classifier of the
    # same classes during the pretrain stage, at the policy's resolution, and the policy stage
    # starts from it (BlockDrop starts from an ImageNet ResNet; nothing is downloaded here);
    # 'random' starts it from scratch.
    c.policy.image_init = "pretrained"

    # Reward (Eqn 5); the penalty lambda is per stage (stages.*.penalty).
    c.reward = ml_collections.ConfigDict()
    c.reward.theta_s = 1.0
    c.reward.theta_d = 0.5  # 0: Remove-U (and BlockDrop's reward).

    # Sampling of policies during training.
    c.sampling = ml_collections.ConfigDict()
    c.sampling.bound = 0.8  # Exploration bound: s' = b s + (1 - b)(1 - s).
    # Policy stage: one more decided block every this many epochs (a fraction is allowed). The
    # stage must be at least N x this long, to end with this many epochs at k = N (validation).
    c.sampling.curriculum_epochs = 1.0

    # The three stages of BlockDrop's schedule; `run` selects which of them this job runs.
    c.stages = _stages()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_interval_steps = 200
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.step = -1  # mode='eval': the checkpoint step to evaluate (-1: the latest of each stage).
    c.eval.split = "test"

    c.lock()
    return c


def _stages() -> ml_collections.ConfigDict:
    """The stages' keys: which run, and each stage's schedule, optimizer and reward weights."""
    stages = ml_collections.ConfigDict()
    stages.run = ",".join(STAGES)
    stages.pretrain = _stage(
        epochs=30,
        batch_size=128,
        optimizer="sgd",
        learning_rate=0.1,
        weight_decay=5e-4,
        warmup_epochs=1,
    )
    stages.policy = _stage(
        epochs=15,
        batch_size=128,
        optimizer="adam",
        learning_rate=1e-3,
        weight_decay=0.0,
        penalty=5.0,
        entropy_weight=0.1,
        schedule="constant",  # BlockDrop's: no decay while the curriculum opens blocks.
    )
    stages.finetune = _stage(
        epochs=10,
        batch_size=128,
        optimizer="adam",
        learning_rate=1e-4,
        weight_decay=0.0,
        penalty=10.0,
        entropy_weight=0.0,
    )
    return stages


def _stage(
    *,
    epochs,
    batch_size,
    optimizer,
    learning_rate,
    weight_decay,
    warmup_epochs=0,
    penalty=0.0,
    entropy_weight=0.0,
    schedule="cosine",
):
    """One stage's hyperparameters (global batch size; epochs over the train split)."""
    s = ml_collections.ConfigDict()
    s.epochs = epochs
    s.batch_size = batch_size
    s.optimizer = optimizer  # 'sgd' (momentum 0.9, Nesterov) or 'adam'.
    s.learning_rate = learning_rate
    s.schedule = schedule  # 'cosine' (with linear warm-up) or 'constant'.
    s.warmup_epochs = warmup_epochs
    s.momentum = 0.9
    s.weight_decay = weight_decay
    s.penalty = penalty  # lambda in Eqn 5: a wrong prediction's reward is -penalty.
    s.entropy_weight = entropy_weight  # beta: entropy bonus on the policy.
    return s


def apply_variant(c, variant):
    """Points `c` at a dataset variant: 'landmark420', 'landmark732', 'geo_twins' or 'smoke'.

    The paper's datasets use 224 px photos (112 px for the policy) and the ImageNet stem; the
    embedded geo_twins set uses 32 px photos and the small stem, with epochs sized for a CPU;
    'smoke' is a seconds-long run on the tiny geo_twins build, for tests and trying things out.
    """
    if variant in ("landmark420", "landmark732"):
        c.data.dataset = variant
        c.data.image_size = 224
        c.data.build_if_missing = False
        c.recognizer.stem = c.policy.stem = "imagenet"
        # The paper gives no schedule; BlockDrop-style values (BUILD_NOTES.md).
        c.stages.pretrain.update(epochs=90, batch_size=256, learning_rate=0.1, warmup_epochs=5)
        c.stages.policy.update(epochs=60, batch_size=256, learning_rate=1e-3)
        c.stages.finetune.update(epochs=30, batch_size=256, learning_rate=1e-4)
        c.sampling.curriculum_epochs = 2.0  # ResNet-65's 21 blocks open in 40 of the 60 epochs.
        c.checkpoint.save_interval_steps = 1000
        c.log.every_steps = 100
    elif variant == "geo_twins":
        c.data.dataset = "geo_twins"
        c.data.image_size = 32
        c.recognizer.stem = c.policy.stem = "small"
        c.stages.pretrain.epochs = 15
        c.stages.policy.epochs = 10
        c.stages.finetune.epochs = 5
        c.stages.pretrain.batch_size = c.stages.policy.batch_size = 128
        c.stages.finetune.batch_size = 128
        c.sampling.curriculum_epochs = 0.4  # ResNet-65's 21 blocks open in 8 of the 10 epochs.
    elif variant == "smoke":
        c.data.dataset = "geo_twins/smoke"
        c.data.image_size = 32
        c.recognizer.stem = c.policy.stem = "small"
        c.recognizer.width = 8
        c.policy.width = 8
        for stage in STAGES:
            c.stages[stage].epochs = 1
            c.stages[stage].batch_size = 16
            c.stages[stage].warmup_epochs = 0
        # One more block every step: ResNet-65's 21 blocks all open within 24 steps.
        c.stages.policy.epochs = 3
        c.sampling.curriculum_epochs = 1 / 16
        c.eval.batch_size = 32
        c.log.every_steps = 2
        c.checkpoint.save_interval_steps = 2
    else:
        raise ValueError(
            f"Unknown config variant {variant!r}; use one of 'landmark420', 'landmark732', "
            "'geo_twins', 'smoke' (e.g. --config=m2net_jax/configs/r47.py:geo_twins)."
        )
    return c
