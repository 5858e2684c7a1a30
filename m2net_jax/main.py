"""Entry point: `python -m m2net_jax.main --config=m2net_jax/configs/quickstart.py --workdir=DIR`
(installed as the `m2net` command too).

Intentionally kept short: parse flags, start JAX's distributed runtime when there are several
processes, log the process/device picture, then hand over to `train` or `evaluate`.
TensorFlow is optional: it is needed only to build a dataset.
"""

import os
import sys

# TensorFlow is only the TFDS / clu back end here: keep it quiet (and off GPUs, below).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from m2net_jax import configs, user_errors, workdir_lock  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, results.")
configs.DEFINE_config_file(
    "config",
    "A config file[:argument], from any directory: e.g. m2net_jax/configs/quickstart.py, "
    "m2net_jax/configs/r47.py:geo_twins, or a file of your own.",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 in a multi-process run (else $JAX_COORDINATOR_ADDRESS, or the "
    "cluster's auto-detection: SLURM, Open MPI, TPU pods).",
)
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool(
    "multiprocess",
    None,
    "Start jax.distributed (default: when the flags above, $JAX_COORDINATOR_ADDRESS, or a "
    "multi-task SLURM / Open MPI job say so). Pass --multiprocess on TPU pod slices.",
)
flags.DEFINE_bool(
    "library_logs",
    False,
    "Show the INFO lines of Orbax, grain, TFDS, JAX and clu (by default only their warnings).",
)
flags.mark_flags_as_required(["config", "workdir"])

# Libraries whose INFO lines (Orbax alone logs ~40 per checkpoint) hide the job's own progress.
_CHATTY = tuple(
    f"{os.sep}{name}{os.sep}"
    for name in ("orbax", "grain", "tensorflow_datasets", "etils", "jax", "flax", "clu")
)


class _QuietLibraries(logging.logging.Filter):
    def filter(self, record) -> bool:
        return record.levelno >= logging.logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def _multiprocess() -> bool:
    if FLAGS.multiprocess is not None:
        return FLAGS.multiprocess
    env = os.environ
    return bool(
        FLAGS.coordinator_address
        or FLAGS.num_processes
        or env.get("JAX_COORDINATOR_ADDRESS")
        or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.library_logs:
        logging.get_absl_handler().addFilter(_QuietLibraries())
    if _multiprocess():  # Before any other JAX call.
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    _hide_gpus_from_tensorflow()

    from m2net_jax import evaluate, results, steps, train, validation

    config = FLAGS.config
    logging.info(
        "JAX process %d of %d; %d local / %d global devices (%s).",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    logging.debug("Config:\n%s", config)
    # Every config problem at once, before any work (the dataset's own checks follow in train).
    problems = validation.validate_config(
        config, device_count=jax.device_count(), process_count=jax.process_count()
    )
    if problems.errors:
        raise validation.ConfigError(problems.errors, problems.warnings)
    steps.configure_compilation_cache(config.compilation_cache_dir)
    try:
        with workdir_lock.job_lock(FLAGS.workdir):
            if config.mode == "train":
                train.train_and_evaluate(config, FLAGS.workdir)
            else:
                evaluate.evaluate_workdir(config, FLAGS.workdir)
    except train.Preempted as stop:
        logging.warning("%s", stop)
        return
    if jax.process_index() == 0:
        print(results.format_table(results.read_results(FLAGS.workdir)))


def _hide_gpus_from_tensorflow() -> None:
    """TensorFlow, when installed, is only TFDS's and clu's back end: keep it off the GPUs."""
    try:
        import tensorflow as tf
    except ImportError:
        return  # Training from a built dataset needs no TensorFlow.
    tf.config.set_visible_devices([], "GPU")


def cli():
    """The `m2net` console script."""
    # absl's --help lists the flags of the running script, sys.argv[0]: here the console
    # script's shim, not this module.
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(user_errors.reporting_user_errors(main), flags_parser=user_errors.parse_flags)


if __name__ == "__main__":
    cli()
