"""Test set-up: four forced CPU devices, quiet TensorFlow, no GPU for TF.

XLA_FLAGS must be set before JAX is imported, so it happens here, at collection time.
Every test therefore sees 4 CPU devices; single-device code simply uses the first.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# One persistent compilation cache per test session (subprocesses inherit it): tests that build
# the same step functions compile them once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="m2net-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the tiny `geo_twins/smoke` build, made once per test session."""
    from m2net_jax.data import pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.ensure_built("geo_twins/smoke", data_dir=data_dir, build_if_missing=True)
    return data_dir
