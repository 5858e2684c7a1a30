"""One process of a multi-process uniqueness check (tests/test_multiprocess.py starts several).

  python tests/multiprocess_uniqueness.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_JSON

Every process holds its own rows of one global (M, N) policy matrix (drawn from a fixed seed);
`policy_gradient.uniqueness` runs under shard_map over all processes' devices; process 0 writes
the gathered (M,) result and the matrix to OUT_JSON.
"""

import json
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def main(coordinator, num_processes, process_id, out):
    jax.distributed.initialize(coordinator, int(num_processes), int(process_id))
    from m2net_jax import policy_gradient as pg

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    m, n = 4 * jax.device_count(), 7
    policies = np.random.default_rng(0).integers(0, 2, (m, n)).astype(np.float32)
    rows = m // jax.process_count()
    local = policies[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    global_policies = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    uniq = jax.jit(
        jax.shard_map(
            lambda p: pg.uniqueness(p, axis_name="data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
        )
    )(global_policies)
    uniq = multihost_utils.process_allgather(uniq, tiled=True)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"policies": policies.tolist(), "uniqueness": np.asarray(uniq).tolist()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
