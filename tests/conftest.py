"""Test set-up: 8 fake CPU devices, fp32 matmuls, a per-session compilation cache."""

import gzip
import json
import os
import tempfile

import pytest

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A ~60 KB slice of the bundled corpus as .txt files, and a shared TFDS cache."""
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(os.path.join(ROOT, "sparse_gpt", "corpus", "shakespeare.jsonl.gz")) as f:
        docs = [json.loads(line)["text"] for line in f][:6]
    for i, doc in enumerate(docs):
        (root / f"doc{i}.txt").write_text(doc[:10_000])
    return str(root), str(tmp_path_factory.mktemp("tfds"))
