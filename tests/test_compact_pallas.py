"""Pallas products of compact (column-balanced, live-blocks-only) weights against the oracle.

A compact weight ``blocks[j, t] = W[kidx[j,t] block, j block]`` (kernels/bsmm/compact.py)
is checked through the public ``kernels.compact_matmul`` (custom VJP) on the Pallas
backends in interpret mode: y, dX and the compact dW against ``kernels.reference_matmul``
on the densified weight under plain autodiff, its dW gathered back to compact form. Slots
come unsorted, T runs from 1 to Kb, some K-block rows are empty, M is not a tile multiple.
The compact Pallas GPU products must also lower to Triton (from this CPU host).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.bsmm import ops, pallas_gpu, pallas_tpu
from tests.helpers import assert_close, compact_oracle

# (M, K, N, B, T): T = 1 with empty K-block rows, T = Kb, and 1 < T < Kb.
SHAPES = [(40, 96, 64, 16, 1), (24, 64, 128, 32, 2), (33, 64, 96, 16, 3)]


def _index(kb, nb, t, rng):
    """Distinct, unsorted K-blocks per column; with T = 1 K-block row 0 stays empty."""
    rows = np.arange(1, kb) if t == 1 else np.arange(kb)
    kidx = np.stack([rng.permutation(rows)[:t] for _ in range(nb)]).astype(np.int32)
    if t > 1:  # at least one column strictly descending
        kidx[0] = np.sort(kidx[0])[::-1]
    return kidx


def _problem(m, k, n, b, t, dtype, seed):
    rng = np.random.default_rng(seed)
    kidx = _index(k // b, n // b, t, rng)
    blocks = jnp.asarray(rng.standard_normal((n // b, t, b, b)), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((m, n)), dtype)
    return x, blocks, dy, kidx


def _vjp(backend, x, blocks, dy, kidx, b, interpret=True):
    @jax.jit
    def run(x, blocks, dy, kidx):
        cmeta = kernels.make_compact_meta(kidx, b, x.shape[1])
        f = lambda x, blocks: kernels.compact_matmul(
            x, blocks, cmeta, backend=backend, interpret=interpret)
        y, pull = jax.vjp(f, x, blocks)
        return (y, *pull(dy))

    return run(x, blocks, dy, jnp.asarray(kidx))


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}K{}N{}B{}T{}".format(*s))
def test_compact_values_and_gradients_match_the_oracle(backend, shape):
    m, k, n, b, t = shape
    x, blocks, dy, kidx = _problem(*shape, jnp.float32, seed=sum(shape))
    got = _vjp(backend, x, blocks, dy, kidx, b)
    for name, g, r in zip(("y", "dX", "dblocks"), got, compact_oracle(x, blocks, kidx, dy)):
        assert g.shape == r.shape and g.dtype == jnp.float32, (name, g.shape, g.dtype)
        assert_close(g, r, jnp.float32, f"{backend} {shape} {name}")


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_compact_bf16_full_columns(backend):
    """T = Kb (every block live) in bf16: outputs and gradients keep the input dtype."""
    m, k, n, b = 24, 64, 64, 32
    x, blocks, dy, kidx = _problem(m, k, n, b, k // b, jnp.bfloat16, seed=5)
    got = _vjp(backend, x, blocks, dy, kidx, b)
    for name, g, r in zip(("y", "dX", "dblocks"), got, compact_oracle(x, blocks, kidx, dy)):
        assert g.shape == r.shape and g.dtype == jnp.bfloat16, (name, g.shape, g.dtype)
        assert_close(g, r, jnp.bfloat16, f"{backend} bf16 {name}")


@pytest.mark.parametrize("mod", [pallas_gpu, pallas_tpu], ids=["pallas_gpu", "pallas_tpu"])
def test_compact_products_called_directly(mod):
    """The three backend functions on their own (what ops.py registers), M a tile multiple
    and not, ``block_m`` given."""
    m, k, n, b, t = 48, 96, 64, 16, 2
    x, blocks, dy, kidx = _problem(m, k, n, b, t, jnp.float32, seed=9)
    cmeta = kernels.make_compact_meta(kidx, b, k)
    want = compact_oracle(x, blocks, kidx, dy)
    kw = dict(interpret=True, block_m=16)
    got = (mod.compact_matmul(x, blocks, cmeta, jnp.float32, **kw),
           mod.compact_matmul_t(dy, blocks, cmeta, jnp.float32, **kw),
           mod.compact_sddmm(x, dy, cmeta, jnp.float32, **kw))
    for name, g, r in zip(("y", "dX", "dblocks"), got, want):
        assert_close(g, r, jnp.float32, f"{mod.__name__} direct {name}")


def test_compact_pallas_tpu_under_the_tpu_semantics_interpreter():
    """Scalar-prefetched index maps (slot // T for dX) under the SMEM/DMA-modelling one."""
    from jax.experimental.pallas import tpu as pltpu

    m, k, n, b, t = 8, 64, 48, 16, 2
    x, blocks, dy, kidx = _problem(m, k, n, b, t, jnp.float32, seed=3)
    got = _vjp("pallas_tpu", x, blocks, dy, kidx, b, interpret=pltpu.InterpretParams())
    for name, g, r in zip(("y", "dX", "dblocks"), got, compact_oracle(x, blocks, kidx, dy)):
        assert_close(g, r, jnp.float32, f"tpu interpreter {name}")


@pytest.mark.parametrize("backend,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_compact_pallas_lowers_for_its_platform(backend, platform):
    """Forward, dX and dW of a compact weight lower to Triton / Mosaic calls (T = 3, not a
    power of two; M not a tile multiple)."""
    b, k, n, t = 128, 512, 384, 3
    x = jax.ShapeDtypeStruct((200, k), jnp.bfloat16)
    blocks = jax.ShapeDtypeStruct((n // b, t, b, b), jnp.bfloat16)
    kidx = jax.ShapeDtypeStruct((n // b, t), jnp.int32)

    def f(x, blocks, kidx):
        cmeta = kernels.make_compact_meta(kidx, b, k)
        loss = lambda x, w: jnp.sum(kernels.compact_matmul(x, w, cmeta, backend=backend))
        return jax.value_and_grad(loss, (0, 1))(x, blocks)

    text = jax.jit(f).trace(x, blocks, kidx).lower(lowering_platforms=(platform,)).as_text()
    call = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    assert text.count(call) == 3  # forward, dX and dW kernels


@pytest.mark.parametrize("mod", [pallas_gpu, pallas_tpu], ids=["pallas_gpu", "pallas_tpu"])
def test_the_pallas_backends_register_their_compact_products(mod):
    impl = ops._REGISTRY.get(mod.__name__.rsplit(".", 1)[1])
    assert impl.compact is not None and impl.compact.takes_interpret
    assert (impl.compact.matmul, impl.compact.matmul_t, impl.compact.sddmm) == (
        mod.compact_matmul, mod.compact_matmul_t, mod.compact_sddmm)
