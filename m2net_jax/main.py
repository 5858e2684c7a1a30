"""Entry point: `python -m m2net_jax.main --config=configs/quickstart.py --workdir=DIR`.

Intentionally kept short: parse flags, start the distributed runtime when there are several
processes, log the process/device picture, then hand over to `train` or `evaluate`.
"""

import os

# TensorFlow is only the TFDS / clu back end here: keep it off accelerators and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, results.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file, e.g. configs/quickstart.py or configs/r47.py:geo_twins.",
    lock_config=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")

    from m2net_jax import evaluate, train

    config = FLAGS.config
    logging.info(
        "JAX process %d of %d; %d local / %d global devices (%s).",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform,
    )  # fmt: skip
    logging.info("Config:\n%s", config)
    if config.mode == "train":
        train.train_and_evaluate(config, FLAGS.workdir)
    elif config.mode == "eval":
        evaluate.evaluate_workdir(config, FLAGS.workdir)
    else:
        raise app.UsageError(f"config.mode must be 'train' or 'eval', not {config.mode!r}.")
    print(evaluate.format_table(evaluate.read_results(FLAGS.workdir)))


if __name__ == "__main__":
    app.run(main)
