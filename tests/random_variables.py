"""Random variables for a Flax module without compiling its initialiser (shared by tests)."""

from m2net_jax import bench


def random_variables(module, *args, seed=0, bias_std=0.1):
    """Variables of `module` drawn at random: kernels N(0, 1/fan_in), BN scales and variances in
    [0.5, 1.5], biases and means N(0, bias_std). Unlike the init, no residual block is the
    identity (a fresh block's last BN scale is zero)."""
    return bench.random_variables(
        module, *args, seed=seed, kernel_gain=1.0, random_bn=True, bias_std=bias_std
    )
