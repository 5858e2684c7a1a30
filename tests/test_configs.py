"""The shipped configs (m2net_jax/configs): found by `--config` from any directory."""

import os
import subprocess
import sys

import pytest

from m2net_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_lists_every_job_config_but_not_base():
    assert configs.shipped() == [
        "m2net_jax/configs/quickstart.py",
        "m2net_jax/configs/r29.py",
        "m2net_jax/configs/r47.py",
        "m2net_jax/configs/r65.py",
    ]


def test_a_packaged_config_loads_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = configs.load("m2net_jax/configs/r47.py:smoke")
    assert config.recognizer.depth == 47
    assert config.data.dataset == "geo_twins/smoke"
    with pytest.raises(AttributeError):
        config.not_a_key = 1  # locked


def test_a_file_in_the_working_directory_comes_before_the_package(tmp_path, monkeypatch):
    own = tmp_path / "m2net_jax" / "configs"
    own.mkdir(parents=True)
    (own / "r47.py").write_text(
        "from m2net_jax.configs import r47\n\n\n"
        "def get_config(arg):\n    c = r47.get_config(arg)\n    c.seed = 7\n    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("m2net_jax/configs/r47.py:smoke") == "m2net_jax/configs/r47.py:smoke"
    assert configs.load("m2net_jax/configs/r47.py:smoke").seed == 7


def test_a_missing_config_is_an_error_listing_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        configs.resolve("configs/r47.py:smoke")  # the layout before configs moved into the package
    for name in configs.shipped():
        assert name in str(error.value)


def _main(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "m2net_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
        check=False,
    )


def test_main_takes_a_packaged_config_from_another_directory(tmp_path):
    # --helpfull parses every flag (the config and its overrides), prints them and exits (with
    # status 1, absl's) before training; the override's default is the smoke variant's value.
    proc = _main(
        [
            "--config=m2net_jax/configs/r47.py:smoke",
            "--config.stages.pretrain.batch_size=8",
            f"--workdir={tmp_path / 'w'}",
            "--helpfull",
        ],
        cwd=tmp_path,
    )
    assert "error" not in proc.stderr.lower(), proc.stderr
    override_help = proc.stdout.split("--config.stages.pretrain.batch_size:")[1]
    assert "(default: '16')" in override_help.split("--")[0]


def test_main_rejects_a_missing_config_at_once_listing_the_shipped_ones(tmp_path):
    proc = _main(["--config=configs/r47.py", f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "m2net_jax/configs/r47.py" in proc.stderr
    assert "Shipped configs" in proc.stderr
    assert not (tmp_path / "w").exists()
