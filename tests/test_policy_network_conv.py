"""SmallMapConv (models.policy_network) equals nn.Conv on maps smaller than its kernel."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from m2net_jax.models.policy_network import SmallMapConv


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (2, 3), (4, 4)])
def test_small_map_conv_equals_conv_with_the_same_kernel(hw):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, *hw, 5))
    conv = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    variables = conv.init(jax.random.PRNGKey(1), x)
    small = SmallMapConv(7, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    # Same parameter structure: checkpoints of either load into the other.
    assert jax.tree.structure(small.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)
    want = conv.apply(variables, x)
    got = small.apply(variables, x)
    assert got.shape == want.shape == (3, *hw, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
