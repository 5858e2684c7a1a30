"""Test set-up: four forced CPU devices, quiet TensorFlow, no GPU for TF.

XLA_FLAGS must be set before JAX is imported, so it happens here, at collection time.
Every test therefore sees 4 CPU devices; single-device code simply uses the first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
