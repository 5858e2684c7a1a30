"""Several local JAX processes behave as one: same training, metrics over the global batch.

Each test starts real processes (2 processes x 2 CPU devices, gloo collectives) and compares
them with this test process's 4 devices.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from smoke_job import smoke_config

from m2net_jax import checkpoint, train
from m2net_jax.data import pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

pytestmark = pytest.mark.multiprocess


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def pairwise_uniqueness(policies):
    """Eqn 2 by its definition: mean normalised Hamming distance to every policy of the batch."""
    m, n = policies.shape
    return np.array(
        [sum(np.sum(policies[i] != policies[j]) / n for j in range(m)) / m for i in range(m)]
    )


def test_uniqueness_across_processes_is_over_the_global_batch(tmp_path):
    out = tmp_path / "uniqueness.json"
    address = f"localhost:{free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_uniqueness.py"),
                address,
                "2",
                str(i),
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    policies = np.array(result["policies"])
    np.testing.assert_allclose(result["uniqueness"], pairwise_uniqueness(policies), atol=1e-6)
    # What each process would get from its own half alone differs: the test can tell.
    half = len(policies) // 2
    per_process = np.concatenate(
        [pairwise_uniqueness(policies[:half]), pairwise_uniqueness(policies[half:])]
    )
    assert not np.allclose(per_process, result["uniqueness"], atol=1e-3)


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one_with_the_same_devices(smoke_data_dir, tmp_path):
    stages = "pretrain,policy"
    # A gentler pretraining step keeps SGD from magnifying the last-bit differences between
    # gloo's cross-process sums and in-process ones.
    overrides = {"stages.pretrain.learning_rate": 0.01}

    multi = tmp_path / "two_processes"
    flags = [
        "--config=m2net_jax/configs/r47.py:smoke",
        f"--workdir={multi}",
        f"--config.data.data_dir={smoke_data_dir}",
        "--config.recognizer.depth=29",
        f"--config.stages.run={stages}",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]
    proc = subprocess.run(
        [os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PYTHON": sys.executable, "PORT": str(free_port())},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]

    single = tmp_path / "one_process"
    config = smoke_config(smoke_data_dir, stages)
    config.stages.pretrain.learning_rate = overrides["stages.pretrain.learning_rate"]
    config.checkpoint.save_interval_steps = 2
    train.train_and_evaluate(config, str(single))

    info = pipeline.dataset_info(config.data.dataset, data_dir=smoke_data_dir)
    for stage in ("pretrain", "policy"):
        got = checkpoint.restore_variables(str(multi), stage, config)
        want = checkpoint.restore_variables(str(single), stage, config)
        assert got.step == want.step
        pairs = zip(jax.tree.leaves(got.variables), jax.tree.leaves(want.variables), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)

    results = {}
    for name, workdir in (("multi", multi), ("single", single)):
        with open(workdir / "results.json") as f:
            results[name] = json.load(f)
    for stage in ("pretrain", "policy"):
        m, s = results["multi"][stage], results["single"][stage]
        # Every test photo counted once, across both processes' shards.
        assert m["num_examples"] == s["num_examples"] == info.num_examples["test"]
        assert m["diversity"] == s["diversity"]
        assert m["accuracy"] == pytest.approx(s["accuracy"], abs=1.5 / s["num_examples"])
