"""`python -m m2net_jax.bench`: runs a suite, prints its tables, optionally writes JSON.

  python -m m2net_jax.bench --suite=quick --json=/tmp/bench_quick.json   # 2-core CPU, < 10 min
  python -m m2net_jax.bench --suite=full --json=/tmp/bench_full.json     # an accelerator

The flags live here only: importing `m2net_jax.bench` defines none.
"""

import json
import tempfile

from absl import app, flags

from m2net_jax import steps
from m2net_jax.bench.runner import PARTS, run
from m2net_jax.bench.suites import SUITES
from m2net_jax.bench.table import format_table

_SUITE = flags.DEFINE_enum("suite", "quick", sorted(SUITES), "Which sizes to run.")
_JSON = flags.DEFINE_string("json", None, "Write the results to this JSON file.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Which parts to run, of {PARTS}.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir of the pipeline part.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # An empty persistent compilation cache: the train part times each step's compile cold
    # (as a new job) and warm (as a rerun that finds it there).
    steps.configure_compilation_cache(tempfile.mkdtemp(prefix="m2net-bench-jax-cache-"))
    results = run(_SUITE.value, parts=tuple(_PARTS.value), data_dir=_DATA_DIR.value)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)
    print(format_table(results))


if __name__ == "__main__":
    app.run(main)
