"""The steps module's process set-up (m2net_jax/steps.py): the persistent compilation cache.

The train and predict steps themselves are exercised by tests/test_train.py.
"""

import json
import os
import subprocess
import sys

from m2net_jax import steps

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compilation_cache_job.py")


def _run_job(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # Store every compilation, however quick (JAX's default skips those under a second).
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, JOB, cache_dir],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_compiled_step_from_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    first = _run_job(cache)
    assert first["cache_dir"] == cache
    assert first["hits"] == 0 and first["misses"] > 0
    written = set(os.listdir(cache))
    assert written
    second = _run_job(cache)
    assert second["hits"] > 0 and second["misses"] == 0
    assert set(os.listdir(cache)) == written  # Nothing compiled anew.


def test_an_empty_cache_dir_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    off = _run_job("")
    assert off == {"cache_dir": None, "hits": 0, "misses": 0}
    assert os.listdir(tmp_path) == []


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert steps.default_compilation_cache_dir() == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert steps.default_compilation_cache_dir() == str(tmp_path / "xdg" / "m2net_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    assert steps.default_compilation_cache_dir() == os.path.join(home, ".cache", "m2net_jax", "jax")
