"""The command line of the comparison suites (`m2net-experiments`): absl flags, then
`runner.run_suite`.

The flags are defined when `cli` runs, not when this module is imported, so importing it (or the
package) leaves `absl.flags.FLAGS` as it was.
"""

import os
import sys

import jax
from absl import app, flags

from m2net_jax import experiments
from m2net_jax.experiments.runner import run_suite
from m2net_jax.experiments.suites import SUITES, load_config

FLAGS = flags.FLAGS
# absl's --help prints the docstring of the running module, under `python -m` this one: show the
# package's overview of the command, the suites and the systems there, as it always has.
__doc__ = experiments.__doc__


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TF only reads data here.
    # Systems of a suite share many programs (evaluation, the sweep's models), and a resumed
    # suite all of them: keep XLA's compilations next to the results.
    jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
    base_config = load_config(FLAGS.config) if FLAGS.config else None
    path = run_suite(
        FLAGS.suite,
        FLAGS.workdir,
        base_config=base_config,
        data_dir=FLAGS.data_dir,
        only=FLAGS.systems,
        report_only=FLAGS.report_only,
        report_dir=FLAGS.report_dir,
    )
    print(f"Report: {path}")


def _define_flags() -> None:
    flags.DEFINE_enum("suite", None, sorted(SUITES), "Which comparison suite to run.")
    flags.DEFINE_string("workdir", None, "Directory of the suite: one workdir per system, report.")
    flags.DEFINE_string("config", None, "Replace the suite's base config file (path[:arg]).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (config.data.data_dir).")
    flags.DEFINE_list("systems", None, "Run only these systems (and those they share with).")
    flags.DEFINE_bool("report_only", False, "Run nothing; rewrite the report from results.")
    flags.DEFINE_string("report_dir", None, "Where report.md and the plots go (default: workdir).")
    flags.mark_flags_as_required(["suite", "workdir"])


def cli():
    """The `m2net-experiments` console script and `python -m m2net_jax.experiments`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _define_flags()
    # absl's --help lists the flags of the running script, sys.argv[0]: under the console
    # script that is its shim, not this module.
    for flag in FLAGS.get_key_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


if __name__ == "__main__":
    cli()
