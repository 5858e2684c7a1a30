"""The configs that ship with m2net_jax, and how `--config` finds them from any directory.

A config is a Python file whose `get_config([argument])` returns an `ml_collections.ConfigDict`;
`--config=PATH[:ARGUMENT]` loads it. The shipped ones live in this package:

  base.py                 every key, declared once (the others start from it; not a job itself)
  quickstart.py           README's main job (ResNet-29 of width 16 on geo_twins, 32 px)
  r29.py, r47.py, r65.py  the paper's setups; ARGUMENT `landmark420` (default), `landmark732`,
                          `geo_twins` or `smoke`

`--config` names them by their path inside the package, the same from any working directory:

  python -m m2net_jax.main --config=m2net_jax/configs/r47.py:smoke --workdir=/tmp/r47_smoke

A relative PATH is looked for from the working directory first (a config file of your own, or a
checkout's copy when run from its root), then from the folder that holds the installed
`m2net_jax` package. To vary a shipped config, copy it and import `m2net_jax.configs.base` as it
does, or override keys on the command line (`--config.stages.pretrain.epochs=2`).
"""

import importlib.util
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

# The folder holding the `m2net_jax` package: site-packages, or a checkout's root.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HERE = os.path.dirname(os.path.abspath(__file__))

# The flag `DEFINE_config_file` defines belongs to its caller (`--helpshort` of main.py lists it).
flags.disclaim_key_flags()


def shipped() -> list[str]:
    """The shipped configs that run a job, as `--config` names them (`m2net_jax/configs/r47.py`)."""
    return sorted(
        f"m2net_jax/configs/{name}"
        for name in os.listdir(_HERE)
        if name.endswith(".py") and name not in ("__init__.py", "base.py")
    )


def resolve(spec: str) -> str:
    """`PATH[:ARGUMENT]` with PATH replaced by the file it names (see the module docstring).

    Raises:
      FileNotFoundError: no such file from the working directory or the package's folder; the
        message lists the shipped configs.
    """
    path, colon, argument = spec.partition(":")
    candidates = [path] if os.path.isabs(path) else [path, os.path.join(PACKAGE_PARENT, path)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate + colon + argument
    raise FileNotFoundError(
        f"No config file {path!r} (looked in {os.getcwd()} and {PACKAGE_PARENT}). Shipped "
        f"configs: {', '.join(shipped())}; e.g. --config=m2net_jax/configs/r47.py:smoke."
    )


def load(spec: str) -> ml_collections.ConfigDict:
    """The locked config `PATH[:ARGUMENT]` names, found as `--config` finds it."""
    path, _, argument = resolve(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("m2net_jax_loaded_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(argument) if argument else module.get_config()
    config.lock()
    return config


class _ResolvingParser(flags.ArgumentParser):
    """Resolves the path (`resolve`) before ml_collections' parser loads the file."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument):
        try:
            spec = resolve(argument)
        except FileNotFoundError as error:
            # absl reports a ValueError at once as a bad flag value; ml_collections would defer
            # its IOError until the config is first read, far from the command line.
            raise ValueError(str(error)) from error
        return self._parser.parse(spec)

    def flag_type(self):
        return self._parser.flag_type()


def DEFINE_config_file(name: str, help_string: str, *, lock_config: bool = True):
    """`ml_collections.config_flags.DEFINE_config_file`, with the shipped configs found from any
    directory and a missing file reported as a flag error that lists them."""
    holder = config_flags.DEFINE_config_file(
        name, None, help_string, flag_values=flags.FLAGS, lock_config=lock_config
    )
    # ml_collections takes no parser of ours; absl's Flag keeps its parser in a public attribute.
    flags.FLAGS[name].parser = _ResolvingParser(flags.FLAGS[name].parser)
    return holder
