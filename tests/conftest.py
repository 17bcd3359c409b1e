"""Test set-up: 8 fake CPU devices, fp32 matmuls, a per-session compilation cache."""

import os
import tempfile

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests train the same small config several times (resume, round trips); a persistent
# cache shared by the session compiles each distinct step function once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sparse_gpt_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
