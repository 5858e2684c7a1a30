"""Packaging for m2net_jax: M²Net (geo-aware dynamic inference) in JAX/Flax.

Bounds: a lower bound the code needs, and an upper bound at the next release that may break
APIs: the next major version, or for a 0.x package the next minor (JAX, Flax, Optax, Orbax,
grain and clu change APIs between minor releases). `constraints.txt` holds the exact versions CI
installs and tests: `pip install -c constraints.txt -e '.[test]'`.
"""

import setuptools

# TensorFlow is optional. clu 0.0.12's metric writers and periodic actions import it (for its
# TensorBoard summary writer), and so does main.py to keep it off GPUs. Building the datasets does
# not need it: the builders hand TFDS encoded images (geo_twins builds byte-identically without
# it). tensorflow-cpu has no macOS wheels; on Apple silicon the plain `tensorflow` is the CPU build.
TF = [
    "tensorflow-cpu>=2.18,<3; sys_platform != 'darwin'",
    "tensorflow>=2.18,<3; sys_platform == 'darwin'",
]

setuptools.setup(
    name="m2net_jax",
    version="0.1.0",
    description=(
        "M²Net: geo-aware dynamic-inference ResNets for landmark recognition, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["m2net_jax", "m2net_jax.*"]),
    package_data={"m2net_jax.data": ["*.csv"]},
    install_requires=[
        "jax>=0.8,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "clu>=0.0.12,<0.1",
        "tensorflow-datasets>=4.9.8,<5",
        "array_record>=0.7,<1",
        "etils[epath]>=1.5,<2",
        "ml-collections>=1.0,<2",
        "numpy>=2.0,<3",
        "scipy>=1.11,<2",  # Student-t intervals of the mechanism study (JAX requires it too)
        "absl-py>=2.0,<3",
        "pillow>=10.0,<14",
        "matplotlib>=3.8,<4",
        # Event files for TensorBoard; the `tensorboard` package writes them without TensorFlow.
        "tensorboard>=2.18,<3",
    ],
    extras_require={
        "tf": TF,
        # The tests exercise clu's TensorBoard writer and the notebook, which use TensorFlow.
        "test": [
            *TF,
            "pytest>=8.0,<10",
            "pytest-xdist>=3.5,<4",  # README's test command spreads the tests over the cores
            "ruff>=0.17,<0.18",  # `ruff format` output changes between minor releases
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
        ],
        # NVIDIA GPUs (CUDA 12 wheels from PyPI); `jax[cuda13]` for CUDA 13 drivers.
        "gpu": ["jax[cuda12]>=0.8,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "m2net=m2net_jax.main:cli",
            "m2net-build=m2net_jax.data.build:cli",
            "m2net-experiments=m2net_jax.experiments.__main__:cli",
        ]
    },
)
