"""Compiles the smoke recognizer's predict step once, with the cache `configure_compilation_cache`
sets up, and prints what the persistent compilation cache did, as JSON.

  python tests/compilation_cache_job.py CACHE_DIR     ('' turns the cache off)

Prints {"cache_dir": ..., "hits": ..., "misses": ...}: JAX's monitoring events
/jax/compilation_cache/cache_hits and /cache_misses during this process.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from m2net_jax import state as state_lib  # noqa: E402
from m2net_jax import steps  # noqa: E402
from m2net_jax.configs import r47  # noqa: E402

events = {"hits": 0, "misses": 0}


def _count(event, **kwargs):
    del kwargs
    for name in events:
        if event == f"/jax/compilation_cache/cache_{name}":
            events[name] += 1


def main(cache_dir):
    jax.monitoring.register_event_listener(_count)
    used = steps.configure_compilation_cache(cache_dir)
    config = r47.get_config("smoke")
    config.recognizer.depth = 29
    networks = state_lib.create_networks(config, num_classes=10)
    mesh = steps.make_mesh()
    variables = state_lib.init_variables(networks, jax.random.PRNGKey(0), 32)
    b = mesh.size
    batch = {
        "image": np.zeros((b, 32, 32, 3), np.float32),
        "policy_image": np.zeros((b, 16, 16, 3), np.float32),
        "location": np.zeros((b, 8), np.float32),
        "label": np.zeros((b,), np.int32),
    }
    predict = steps.make_predict_step(networks, mesh, use_policy=True)
    jax.block_until_ready(predict(steps.replicate(variables, mesh), steps.shard_batch(batch, mesh)))
    print(json.dumps({"cache_dir": used, **events}))


if __name__ == "__main__":
    main(sys.argv[1])
