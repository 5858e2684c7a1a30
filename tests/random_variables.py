"""Random variables for a Flax module without compiling its initialiser (shared by tests).

Compiling `jit(module.init)` for even a tiny ResNet costs tens of seconds on 2 cores (the
random-number initialisers); drawing the same shapes with numpy from `jax.eval_shape` costs none.
"""

import jax
import numpy as np


def random_variables(module, *args, seed=0, bias_std=0.1):
    """Variables of `module` drawn at random: kernels N(0, 1/fan_in), BN scales and variances in
    [0.5, 1.5], biases and means N(0, bias_std). Unlike the init, no residual block is the
    identity (a fresh block's last BN scale is zero)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, fan_in**-0.5, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, bias_std, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, shapes)
