"""Running the recognizer so that dropped blocks cost nothing (§3, Fig. 2; Eqn 7's FLOPs).

M²Net's point is that a photo runs only the blocks its policy keeps. The masked forward,
`Recognizer.__call__`, computes every block and blends, so under `jit` a dropped block still
costs its full FLOPs. The functions here skip the work for real, with `lax.cond` around each
block inside one compiled function:

- `skipping_logits`: block n runs only if some photo of the batch keeps it; otherwise only its
  shortcut (the stage's downsample, or nothing) is computed. For one photo (B = 1) that is
  exactly M²Net's per-photo saving; for a batch it saves the blocks nobody uses.
- `frozen_logits`: the policy stage's two eval-mode forwards of the frozen recognizer (greedy
  and sampled policies) with their common work done once. Up to the first block where some
  photo's two policies differ, the two forwards compute the same activations (under the
  curriculum every block before the last k is forced on in both), so that prefix runs once.

Both give the masked forward's logits: the same ops on the same shapes, only skipped where the
blend would have discarded them (0 · F(x) + 1 · shortcut is the shortcut for any finite F(x)),
equal to it up to float rounding where XLA fuses differently around a cond.
They run the recognizer's pieces (`embed`, `block`, `shortcut`, `head`) through
`Recognizer.apply(..., method=...)`, in inference mode: batch norm with running averages, so a
device's branch choice involves no collective and may differ between devices of a mesh.

A `lax.cond` only skips work when it is not batched: under `jax.vmap` it becomes a select that
computes both branches. Call these functions on a batch, not inside `vmap`.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from m2net_jax.models import Recognizer


def _check_policy(recognizer: Recognizer, images, policy, name: str) -> None:
    expected = (images.shape[0], recognizer.num_blocks)
    if policy.shape != expected:
        raise ValueError(
            f"{name} has shape {policy.shape}; expected (B, N) = {expected} for a "
            f"ResNet-{recognizer.depth} on a batch of {images.shape[0]}."
        )


def _head(recognizer: Recognizer, variables: Any, x: jax.Array, locations):
    # Only an M²Net+ recognizer (geo_conditioning) reads the locations, in its head.
    kwargs = {} if locations is None else {"locations": locations}
    return recognizer.apply(variables, x, method="head", **kwargs)


def gated_block(recognizer: Recognizer, variables: Any, x: jax.Array, keep: jax.Array, index: int):
    """Block `index` for a batch, computing its residual branch only if some photo keeps it.

    Args:
      recognizer: the `Recognizer` module (unbound).
      variables: its {'params', 'batch_stats'}.
      x: (B, H, W, C) activations entering the block.
      keep: (B,) float or bool decisions p_n of the batch's photos.
      index: n, the block's index in [0, N) (static).

    Returns:
      (B, H', W', C') the masked block's output: `Recognizer.block(x, keep, n)` when any photo
      keeps the block, its shortcut (downsample or identity) when none does.
    """

    def run(x):
        return recognizer.apply(variables, x, keep, index, method="block")

    def skip(x):
        return recognizer.apply(variables, x, index, method="shortcut")

    return lax.cond(jnp.any(keep > 0), run, skip, x)


def skipping_logits(
    recognizer: Recognizer, variables: Any, images: jax.Array, policy: jax.Array, *, locations=None
):
    """Eval-mode logits under per-photo policies, computing a block only if some photo keeps it.

    The batch-size-1 path of M²Net's dynamic inference is this function with B = 1: each block
    is a `lax.cond` on the photo's own decision, so a dropped block's convolutions never run.
    With B > 1 a block is skipped for the whole batch when no photo uses it.

    Args:
      recognizer: the `Recognizer` module.
      variables: its {'params', 'batch_stats'}.
      images: (B, H, W, 3) float32 in [0, 1].
      policy: (B, N) float or bool in {0, 1}, 1 = run block n.
      locations: (B, 8) raw DMS locations, for a geo-conditioned recognizer (M²Net+) only.

    Returns:
      (B, K) float32 logits, those of `recognizer.apply(variables, images, policy)`.
    """
    _check_policy(recognizer, images, policy, "policy")
    policy = lax.stop_gradient(jnp.asarray(policy, jnp.float32))
    x = recognizer.apply(variables, images, method="embed")
    for n in range(recognizer.num_blocks):
        x = gated_block(recognizer, variables, x, policy[:, n], n)
    return _head(recognizer, variables, x, locations)


def naive_frozen_logits(
    recognizer: Recognizer, variables: Any, images: jax.Array, greedy, sampled, *, locations=None
):
    """The reference: two separate eval-mode masked forwards, (greedy logits, sampled logits)."""
    kwargs = {} if locations is None else {"locations": locations}
    logits_g = recognizer.apply(variables, images, greedy, train=False, **kwargs)
    logits_s = recognizer.apply(variables, images, sampled, train=False, **kwargs)
    return logits_g, logits_s


def frozen_logits(
    recognizer: Recognizer, variables: Any, images: jax.Array, greedy, sampled, *, locations=None
):
    """The frozen recognizer's logits under the greedy and the sampled policies, sharing work.

    Equal to `naive_frozen_logits` (two eval-mode masked forwards), computed so that the stem
    runs once, and block n runs once for both while every photo's greedy and sampled policies
    agree on blocks 0..n (both forwards then hold the same activations); from the first block
    where some photo's two policies differ, the two forwards go on separately. Under the policy
    stage's curriculum the first N − k blocks are forced on in both policies, so at least that
    prefix is shared; no k is needed, the agreement is read off the policies. When not even
    block 0 is shared (typical once k = N), the two plain masked forwards run, with no per-block
    conds (each costs a host round trip on a GPU).

    Each stream is computed at batch size B with the masked forward's ops, so the logits agree
    with it to float rounding (XLA may fuse differently around the conds; on the CPU and GPU
    tried they were bitwise equal at R47 sizes). The policies are discrete and the recognizer
    frozen: no gradient flows through here (both are `stop_gradient`-ed, which also keeps the
    conds out of the backward pass).

    Args:
      recognizer: the `Recognizer` module (its `axis_name` is unused: eval-mode batch norm).
      variables: its {'params', 'batch_stats'}.
      images: (B, H, W, 3) float32 in [0, 1].
      greedy: (B, N) float or bool greedy policies p̃ (curriculum applied).
      sampled: (B, N) float or bool sampled policies p (curriculum applied).
      locations: (B, 8) raw DMS locations, for a geo-conditioned recognizer (M²Net+) only.

    Returns:
      (logits_greedy, logits_sampled), each (B, K) float32.
    """
    _check_policy(recognizer, images, greedy, "greedy")
    _check_policy(recognizer, images, sampled, "sampled")
    variables = lax.stop_gradient(variables)
    greedy = lax.stop_gradient(jnp.asarray(greedy, jnp.float32))
    sampled = lax.stop_gradient(jnp.asarray(sampled, jnp.float32))
    # shared[n]: every photo's two policies agree on blocks 0..n, so the forwards coincide there.
    agree = jnp.all(greedy == sampled, axis=0)
    shared = jnp.cumprod(agree.astype(jnp.int32)) > 0
    block = lambda x, keep, n: recognizer.apply(variables, x, keep, n, method="block")
    head = lambda x: _head(recognizer, variables, x, locations)

    def with_shared_prefix(images):
        x_g = recognizer.apply(variables, images, method="embed")
        x_s = x_g
        for n in range(recognizer.num_blocks):

            def once(x_g, x_s, n=n):
                del x_s  # Equal to x_g on this branch.
                y = block(x_g, greedy[:, n], n)
                return y, y

            def twice(x_g, x_s, n=n):
                return block(x_g, greedy[:, n], n), block(x_s, sampled[:, n], n)

            x_g, x_s = lax.cond(shared[n], once, twice, x_g, x_s)
        return head(x_g), head(x_s)

    def separately(images):
        return naive_frozen_logits(
            recognizer, variables, images, greedy, sampled, locations=locations
        )

    return lax.cond(shared[0], with_shared_prefix, separately, images)
