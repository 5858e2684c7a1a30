"""ResNet-29 M²Net (9 droppable bottleneck blocks).

# Landmark-420 (build it first: README, "Landmark-420/732"); days on one GPU:
python -m m2net_jax.main --config=m2net_jax/configs/r29.py --workdir=/tmp/r29_l420
# Landmark-732:
python -m m2net_jax.main --config=m2net_jax/configs/r29.py:landmark732 --workdir=/tmp/r29_l732
# The same architecture on the embedded geo_twins set (32 px), on a CPU:
python -m m2net_jax.main --config=m2net_jax/configs/r29.py:geo_twins --workdir=/tmp/r29_twins
"""

from m2net_jax.configs import base


def get_config(variant="landmark420"):
    c = base.get_config()
    c.recognizer.depth = 29
    return base.apply_variant(c, variant)
