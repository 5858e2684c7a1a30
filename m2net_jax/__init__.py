"""m2net_jax: M²Net (geo-aware dynamic inference paths for landmark recognition) in JAX/Flax."""

__version__ = "0.1.0"
