"""The stage state's building blocks (m2net_jax/state.py): here, the computation dtype."""

import jax.numpy as jnp
import pytest

from m2net_jax import state as state_lib


def test_auto_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert state_lib.compute_dtype("auto", backend="cpu") == jnp.float32
    assert state_lib.compute_dtype("auto", backend="gpu") == jnp.bfloat16
    assert state_lib.compute_dtype("auto", backend="tpu") == jnp.bfloat16
    assert state_lib.compute_dtype("float32") == jnp.float32
    assert state_lib.compute_dtype("bfloat16") == jnp.bfloat16


def test_unknown_compute_dtype_names_the_config_key():
    with pytest.raises(ValueError, match="config.compute_dtype='float16'"):
        state_lib.compute_dtype("float16")
