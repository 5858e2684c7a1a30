"""Packaging for m2net_jax: M²Net (geo-aware dynamic inference) in JAX/Flax."""

import setuptools

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
        "jax>=0.8",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.7",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "absl-py>=2.0",
        "pillow>=10.0",
        "matplotlib>=3.8",
        # TFDS image encoding and clu's TensorBoard writer need TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.18",
        "tensorboard>=2.18",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "ruff>=0.6",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
