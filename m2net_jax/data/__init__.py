"""Datasets of M²Net: TFDS builders (registered on import) and the grain input pipeline.

Importing this package registers the builders with TFDS, so ``tfds.builder('geo_twins')`` and
`m2net_jax.data.pipeline` find them. Nothing here imports TensorFlow: with TFDS 4.9.10, reading a
built dataset and building one both work where it is not installed.
"""

from m2net_jax.data import (
    geo_twins,  # noqa: F401  (registers the `geo_twins` builder)
    landmarks,  # noqa: F401  (registers `landmark420`, `landmark732`)
)
