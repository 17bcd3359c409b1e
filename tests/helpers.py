"""Small training configs and batch helpers shared by the tests that train end to end."""

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from sparse_gpt import cli
from sparse_gpt import config as config_lib


def small_config(corpus, base=None, **overrides):
    """A 2-layer byte model on the `corpus` fixture's slice; ``overrides`` win.

    ``base``: the config to shrink (default: the ``tiny`` preset), e.g. a config family's.
    """
    path, data_dir = corpus
    c = config_lib.get_config("tiny") if base is None else base
    for key, value in dict({"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                            "model.max_len": 32, "data.seq_len": 32, "data.path": path,
                            "data.data_dir": data_dir, "train.batch_size": 4,
                            "train.num_steps": 8, "train.warmup_steps": 2,
                            "train.log_every": 2, "train.eval_every": 4,
                            "train.eval_batches": 2, "train.checkpoint_every": 4,
                            "train.sample_tokens": 8, "train.progress_bar": False},
                           **overrides).items():
        cli.apply_override(c, key, str(value))
    return c


def take(it, n):
    """The next ``n`` batches of iterator ``it``."""
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    """Two lists of batches are equal, key by key and value by value."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def force_xla_core(monkeypatch, core: str) -> None:
    """Makes the xla backend run its ``"scan"`` or ``"batched"`` formulation at every shape
    (kernels/bsmm/xla.py ``_use_batched``; test shapes take the batched one otherwise)."""
    from kernels.bsmm import xla
    monkeypatch.setattr(xla, "_BATCHED_MAX_BYTES", {"scan": 0, "batched": 1 << 40}[core])


def backend_name(backend: str, monkeypatch) -> str:
    """A ``BACKENDS`` entry's backend: ``"xla-scan"`` is xla forced onto its column scan."""
    if backend == "xla-scan":
        force_xla_core(monkeypatch, "scan")
        return "xla"
    return backend


def block_oracle(x, w, mask_KbxNb, b, ct):
    """fp32 ``(y, dx, dw)`` of ``x @ (w * expand(mask))`` by plain autodiff (the dense masked
    oracle of every block-sparse backend)."""
    m_KxN = kernels.expand_block_mask(jnp.asarray(mask_KbxNb, jnp.float32), b)
    f = lambda x, w: kernels.reference_matmul(x, w, m_KxN)
    y, vjp = jax.vjp(f, x.astype(jnp.float32), w.astype(jnp.float32))
    return (y, *vjp(ct.astype(jnp.float32)))


def compact_oracle(x, blocks, kidx, ct):
    """fp32 ``(y, dx, dblocks)`` of a compact weight: :func:`block_oracle` of its dense view,
    dW gathered back to the compact shape."""
    b, k = blocks.shape[-1], x.shape[-1]
    kidx = jnp.asarray(kidx)
    w = kernels.densify_blocks(blocks.astype(jnp.float32), kidx, k)
    y, dx, dw = block_oracle(x, w, kernels.index_block_mask(kidx, k // b), b, ct)
    return y, dx, kernels.gather_blocks(dw, kidx, b)


def assert_close(got, want, dtype, name):
    """Same shape, and equal within 1e-5 (bf16: 2e-2) of the largest magnitude (at least 1)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    tol = 2e-2 * scale if dtype == jnp.bfloat16 else 1e-5 * scale
    np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=name)
