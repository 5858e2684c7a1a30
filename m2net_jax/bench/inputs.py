"""Random variables and batches for the benchmarks.

Weights are random (kernels He-normal, BN statistics at identity): speed does not depend on
them, and with random policy-network weights the policies are mixed, as in mid-training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from m2net_jax import geo
from m2net_jax.bench.suites import Suite
from m2net_jax.models import PolicyNetwork, Recognizer


def random_variables(
    module,
    *args,
    seed: int = 0,
    kernel_gain: float = 2.0,
    random_bn: bool = False,
    bias_std: float = 0.1,
):
    """Random variables of `module` without compiling its init (which costs tens of seconds for
    a ResNet on 2 cores; drawing `jax.eval_shape`'s shapes with numpy costs none).

    Kernels N(0, kernel_gain / fan_in) (2: He-normal); BN at the identity (mean 0, variance 1,
    scale 1), or with `random_bn` scales and variances in [0.5, 1.5] and means N(0, bias_std);
    biases N(0, bias_std).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, (kernel_gain / fan_in) ** 0.5, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            if random_bn:
                return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
            return np.ones(leaf.shape, np.float32)
        if name == "mean" and not random_bn:
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0.0, bias_std, leaf.shape).astype(np.float32)  # bias (and mean)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def both_variables(suite: Suite, rec: Recognizer, pol: PolicyNetwork, seed: int = 0):
    """{'params', 'batch_stats'}, each {'recognizer', 'policy'}, as a train state holds them."""
    s = suite.image_size
    v_rec = random_variables(
        rec.clone(axis_name=None),
        jnp.zeros((1, s, s, 3)),
        jnp.ones((1, rec.num_blocks)),
        seed=seed,
    )
    v_pol = random_variables(
        pol.clone(axis_name=None),
        jnp.zeros((1, s // 2, s // 2, 3)),
        jnp.zeros((1, 8)),
        seed=seed + 1,
    )
    variables = {c: {"recognizer": v_rec[c], "policy": v_pol[c]} for c in ("params", "batch_stats")}
    # On the device once: numpy arguments would be copied to it at every call (on a GPU that
    # copy alone takes longer than a batch-1 forward).
    return jax.device_put(variables)


def random_batch(suite: Suite, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch shaped like the input pipeline's: photos, policy photos, locations, labels."""
    rng = np.random.default_rng(seed)
    s = suite.image_size
    lat = rng.uniform(-60, 60, batch)
    lon = rng.uniform(-180, 180, batch)
    return {
        "image": rng.random((batch, s, s, 3), np.float32),
        "policy_image": rng.random((batch, s // 2, s // 2, 3), np.float32),
        "location": geo.encode_location(lat, lon),
        "label": rng.integers(0, suite.num_classes, batch).astype(np.int32),
    }


def half_policy(num_blocks: int) -> np.ndarray:
    """The latency benchmark's fixed policy: every other block, ⌈N/2⌉ of N kept (Pr ≈ 0.53)."""
    return (np.arange(num_blocks) % 2 == 0).astype(np.float32)
