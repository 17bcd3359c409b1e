"""Compact block-sparse layout: ``compact_matmul`` on every backend against the dense oracle.

The oracle is ``kernels.reference_matmul`` of x and the densified weight under its block
mask, differentiated by plain autodiff; its dW is gathered into the compact ``[Nb, T, B, B]``
form with ``gather_blocks``. Pallas backends run in interpret mode at tiny shapes (skipped
until their compact products exist).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.bsmm import pallas_gpu, pallas_tpu
from tests.helpers import assert_close, backend_name, compact_oracle, force_xla_core

_PALLAS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}
# The Pallas backends' compact products are checked against the same oracle in
# tests/test_compact_pallas.py (several shapes, unsorted slots, bf16); here under -m slow.
BACKENDS = [("xla", False), ("xla-scan", False), ("reference", False),
            pytest.param("pallas_gpu", True, marks=pytest.mark.slow),
            pytest.param("pallas_tpu", True, marks=pytest.mark.slow)]


def _skip_missing(backend):
    mod = _PALLAS.get(backend)
    if mod is not None and getattr(mod, "compact_matmul", None) is None:
        pytest.skip(f"{backend} has no compact products yet")


def _kidx(kb, nb, t, rng, ascending=False):
    """Distinct K-blocks per column; unsorted unless ``ascending``."""
    k = np.stack([rng.permutation(kb)[:t] for _ in range(nb)]).astype(np.int32)
    return np.sort(k, axis=1) if ascending else k


def _data(lead, k, n, t, b, dtype, rng):
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    blocks = jnp.asarray(rng.standard_normal((n // b, t, b, b)), dtype)
    ct = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
    return x, blocks, ct


def _check(backend, interpret, lead, k, n, b, t, dtype, seed, n_index=3):
    """One compiled program, several (unsorted) slot indices: values and gradients."""
    rng = np.random.default_rng(seed)
    x, blocks, ct = _data(lead, k, n, t, b, dtype, rng)

    @jax.jit
    def run(x, blocks, ct, kidx):
        f = lambda x, bl: kernels.compact_matmul(x, bl, kidx, backend=backend, interpret=interpret)
        y, vjp = jax.vjp(f, x, blocks)
        return (y, *vjp(ct))

    for i in range(n_index):
        kidx = _kidx(k // b, n // b, t, rng, ascending=i == 0)
        got = run(x, blocks, ct, kidx)
        for name, g, r in zip(("y", "dx", "dblocks"), got, compact_oracle(x, blocks, kidx, ct)):
            assert g.dtype == dtype, (name, g.dtype)
            assert_close(g, r, dtype, f"{backend} {name} T={t} index {i}")
    assert run._cache_size() == 1, "a new slot index must not recompile"


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_backend_matches_oracle_fp32(backend, interpret, monkeypatch):
    backend = backend_name(backend, monkeypatch)
    _skip_missing(backend)
    _check(backend, interpret, (2, 3), 64, 96, 16, 2, jnp.float32, seed=1)


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_backend_matches_oracle_bf16_one_slot(backend, interpret, monkeypatch):
    backend = backend_name(backend, monkeypatch)
    _skip_missing(backend)
    _check(backend, interpret, (24,), 64, 64, 32, 1, jnp.bfloat16, seed=2, n_index=2)


@pytest.mark.parametrize("backend,interpret", [b for b in BACKENDS if b != ("xla-scan", False)])
def test_every_block_live(backend, interpret):
    """T = Kb (xla's dense fallback, whatever its core); slots are a permutation of the
    K-blocks."""
    _skip_missing(backend)
    _check(backend, interpret, (5,), 48, 32, 16, 3, jnp.float32, seed=3, n_index=2)


@pytest.mark.parametrize("seed", range(4))
def test_xla_random_shapes(seed, monkeypatch):
    # Even seeds run XLA's column scan, odd ones its batched formulation (xla._use_batched).
    force_xla_core(monkeypatch, ("scan", "batched")[seed % 2])
    rng = np.random.default_rng(200 + seed)
    b = int(rng.choice([16, 32]))
    kb, nb = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    t = int(rng.integers(1, kb + 1))
    lead = tuple(int(v) for v in rng.integers(1, 6, size=int(rng.integers(1, 3))))
    _check("xla", False, lead, kb * b, nb * b, b, t, jnp.float32, seed, n_index=2)


def test_xla_agrees_with_the_dense_layout_op():
    rng = np.random.default_rng(4)
    b, kb, nb, t = 16, 6, 5, 2
    x, blocks, ct = _data((9,), kb * b, nb * b, t, b, jnp.float32, rng)
    kidx = _kidx(kb, nb, t, rng)
    w = kernels.densify_blocks(blocks, jnp.asarray(kidx), kb * b)
    meta = kernels.make_block_meta(kernels.index_block_mask(kidx, kb), b, block_mask=True)
    y_c, vjp_c = jax.vjp(lambda x, bl: kernels.compact_matmul(x, bl, kidx, backend="xla"),
                         x, blocks)
    y_d, vjp_d = jax.vjp(lambda x, w: kernels.block_sparse_matmul(x, w, meta, backend="xla"),
                         x, w)
    (dx_c, db_c), (dx_d, dw_d) = vjp_c(ct), vjp_d(ct)
    assert_close(y_c, y_d, jnp.float32, "y")
    assert_close(dx_c, dx_d, jnp.float32, "dx")
    assert_close(db_c, kernels.gather_blocks(dw_d, jnp.asarray(kidx), b), jnp.float32, "dW")


@pytest.mark.parametrize("t", [1, 2, 4])
def test_frozen_topology_matchescompact_oracle(t):
    """A ``FrozenBlockMeta`` on xla (static slices), reference and Pallas (converted)."""
    rng = np.random.default_rng(10 + t)
    b, kb, nb = 16, 4, 6
    kidx = _kidx(kb, nb, t, rng, ascending=True)
    kidx[2] = kidx[3]  # two columns share a K-block set: one GEMM
    mask = np.asarray(kernels.index_block_mask(kidx, kb))
    fmeta = kernels.make_block_meta(mask, b, block_mask=True, frozen=True)
    x, blocks, ct = _data((2, 5), kb * b, nb * b, t, b, jnp.float32, rng)
    want = compact_oracle(x, blocks, kidx, ct)

    def run(x, blocks, ct, backend="xla", interpret=False):
        f = lambda x, bl: kernels.compact_matmul(x, bl, fmeta, backend=backend,
                                                 interpret=interpret)
        y, vjp = jax.vjp(f, x, blocks)
        return (y, *vjp(ct))

    backends = [("xla", False), ("reference", False)]
    backends += [(n, True) for n, mod in _PALLAS.items()
                 if t == 2 and getattr(mod, "compact_matmul", None) is not None]
    for backend, interpret in backends:
        got = jax.jit(run, static_argnums=(3, 4))(x, blocks, ct, backend, interpret)
        for name, g, r in zip(("y", "dx", "dblocks"), got, want):
            assert_close(g, r, jnp.float32, f"frozen {backend} {name} T={t}")
    jaxpr = str(jax.make_jaxpr(run)(x, blocks, ct))
    # Activations are only sliced; dX permutes the (small) weight once, by one static gather.
    assert "scatter" not in jaxpr and "while" not in jaxpr, jaxpr
    assert jaxpr.count("gather") <= 1, jaxpr


@pytest.mark.parametrize("k,n", [(64, 256), (256, 64)])
def test_frozen_layouts_compute_the_same_products_bit_for_bit(k, n):
    """With a trace-time topology the two layouts' xla products are the same GEMMs: y, dX
    and dW (gathered to blocks) are equal bit for bit under jit, which is what makes a
    static compact run the dense layout's run (tests/test_compact.py). Several column
    groups, so the dense layout's dW spreads more than one group over K."""
    rng = np.random.default_rng(k + n)
    b, m = 16, 128
    kb, nb = k // b, n // b
    kidx = _kidx(kb, nb, max(1, kb // 4), rng, ascending=True)
    mask = np.asarray(kernels.index_block_mask(kidx, kb))
    fmeta = kernels.make_block_meta(mask, b, block_mask=True, frozen=True)
    x, blocks, ct = _data((m,), k, n, kidx.shape[1], b, jnp.float32, rng)
    w = kernels.densify_blocks(blocks, jnp.asarray(kidx), k)

    @jax.jit
    def both(x, blocks, w, ct):
        y_c, vjp_c = jax.vjp(lambda x, bl: kernels.compact_matmul(x, bl, fmeta, backend="xla"),
                             x, blocks)
        y_d, vjp_d = jax.vjp(lambda x, w: kernels.block_sparse_matmul(x, w, fmeta,
                                                                      backend="xla"), x, w)
        return (y_c, *vjp_c(ct)), (y_d, *vjp_d(ct))

    (y_c, dx_c, db_c), (y_d, dx_d, dw_d) = both(x, blocks, w, ct)
    np.testing.assert_array_equal(y_c, y_d)
    np.testing.assert_array_equal(dx_c, dx_d)
    np.testing.assert_array_equal(db_c, kernels.gather_blocks(dw_d, jnp.asarray(kidx), b))


def test_layout_round_trips():
    rng = np.random.default_rng(6)
    b, kb, nb, t = 16, 5, 4, 3
    kidx = _kidx(kb, nb, t, rng)
    w = jnp.asarray(rng.standard_normal((kb * b, nb * b)), jnp.float32)
    mask = np.asarray(kernels.index_block_mask(kidx, kb))
    assert mask.dtype == bool and (mask.sum(0) == t).all()
    assert all(mask[kidx[j, s], j] for j in range(nb) for s in range(t))
    blocks = kernels.gather_blocks(w, kidx, b)
    assert blocks.shape == (nb, t, b, b)
    np.testing.assert_array_equal(blocks[1, 2], w[kidx[1, 2] * b:(kidx[1, 2] + 1) * b, b:2 * b])
    dense = kernels.densify_blocks(blocks, kidx, kb * b)
    np.testing.assert_array_equal(dense, w * np.kron(mask, np.ones((b, b), np.float32)))
    np.testing.assert_array_equal(kernels.compact_index(mask, t), np.sort(kidx, axis=1))
    jitted = jax.jit(lambda m: kernels.compact_index(m, t))(jnp.asarray(mask))
    np.testing.assert_array_equal(jitted, np.sort(kidx, axis=1))
    # Traced and short of T: the lowest dead K-blocks fill up, distinct and ascending.
    short = np.zeros((4, 2), bool)
    short[2, 0] = short[[1, 3], 1] = True
    got = jax.jit(lambda m: kernels.compact_index(m, 3))(jnp.asarray(short))
    np.testing.assert_array_equal(got, [[0, 1, 2], [0, 1, 3]])
    fmeta = kernels.make_block_meta(mask, b, block_mask=True, frozen=True)
    np.testing.assert_array_equal(kernels.frozen_index(fmeta), np.sort(kidx, axis=1))


def test_compact_meta_row_view_hand_computed():
    kidx = np.array([[3, 2], [1, 0], [3, 0]], np.int32)  # slots s = j*T + t: 0..5
    for cmeta in (kernels.make_compact_meta(kidx, 16, 64),
                  jax.jit(lambda k: kernels.make_compact_meta(k, 16, 64))(kidx)):
        assert (cmeta.block_size, cmeta.shape, cmeta.slots, cmeta.row_budget) == (
            16, (64, 48), 2, 3)
        np.testing.assert_array_equal(cmeta.row_count_Kb, [2, 1, 1, 2])
        # Row 0 is fed by slots 3 and 5, row 1 by 2, row 2 by 1, row 3 by 0 and 4; padding
        # repeats the last real slot.
        np.testing.assert_array_equal(cmeta.row_slot_KbxR, [[3, 5, 5], [2, 2, 2], [1, 1, 1],
                                                            [0, 4, 4]])
        np.testing.assert_array_equal(cmeta.row_nidx_KbxR, [[1, 2, 2], [1, 1, 1], [0, 0, 0],
                                                            [0, 2, 2]])
        np.testing.assert_array_equal(cmeta.block_mask(), kernels.index_block_mask(kidx, 4))
    empty_row = kernels.make_compact_meta(np.array([[0], [2]], np.int32), 16, 64)
    np.testing.assert_array_equal(empty_row.row_count_Kb, [1, 0, 1, 0])
    np.testing.assert_array_equal(empty_row.row_slot_KbxR, [[0, 0], [0, 0], [1, 1], [0, 0]])
    assert jax.tree.leaves(empty_row)[0].dtype == jnp.int32
    fm = kernels.make_block_meta(np.eye(2, dtype=bool), 16, block_mask=True, frozen=True)
    np.testing.assert_array_equal(kernels.make_compact_meta(fm).kidx_NbxT, [[0], [1]])


def test_mixed_dtypes_and_empty_batch():
    rng = np.random.default_rng(7)
    x, blocks, ct = _data((4,), 32, 32, 1, 16, jnp.float32, rng)
    kidx = np.array([[1], [0]], np.int32)
    f = lambda x, bl: kernels.compact_matmul(x, bl, kidx, backend="xla")
    y, vjp = jax.vjp(f, x.astype(jnp.bfloat16), blocks)
    dx, db = vjp(ct)
    assert (y.dtype, dx.dtype, db.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert_close(db, compact_oracle(x.astype(jnp.bfloat16), blocks, kidx, ct)[2], jnp.float32,
                 "dblocks")
    assert f(jnp.zeros((0, 3, 32)), blocks).shape == (0, 3, 32)


def test_errors_name_the_problem_and_the_fix():
    rng = np.random.default_rng(8)
    x, blocks, _ = _data((3,), 64, 32, 2, 16, jnp.float32, rng)
    kidx = _kidx(4, 2, 2, rng)
    unbalanced = np.eye(4, 2, dtype=bool)
    unbalanced[3, 1] = True
    with pytest.raises(ValueError, match=r"column 0 .* has 1 .*block_balance=column"):
        kernels.compact_index(unbalanced, 2)
    with pytest.raises(ValueError, match=r"\[Nb, T, B, B\]"):
        kernels.compact_matmul(x, blocks[0], kidx)
    with pytest.raises(ValueError, match=r"int32 \[Nb, T\] = \[2, 2\]"):
        kernels.compact_matmul(x, blocks, kidx[:, :1])
    with pytest.raises(ValueError, match="K=48"):
        kernels.compact_matmul(x[:, :48], blocks, kidx)
    with pytest.raises(ValueError, match="K=40 features"):
        kernels.compact_matmul(x[:, :40], blocks, kidx)
    with pytest.raises(ValueError, match="CompactMeta is for shape"):
        kernels.compact_matmul(x, blocks, kernels.make_compact_meta(kidx, 16, 128))
    fm = kernels.make_block_meta(unbalanced, 16, block_mask=True, frozen=True)
    with pytest.raises(ValueError, match=r"column 0 has 1 live .*T=2"):
        kernels.compact_matmul(x, blocks, fm)
    with pytest.raises(ValueError, match="repeats a K-block"):
        kernels.make_compact_meta(np.array([[1, 1], [0, 2]], np.int32), 16, 64)
    with pytest.raises(ValueError, match="outside"):
        kernels.make_compact_meta(np.array([[1, 4], [0, 2]], np.int32), 16, 64)
    stub = kernels.MatmulBackend(*(lambda *a: None,) * 3)
    kernels.register_backend("stub_no_compact", stub)
    try:
        with pytest.raises(ValueError, match=r"'stub_no_compact' has no compact.*sparse_storage="
                                              r"dense.*compact=kernels.CompactBackend"):
            kernels.compact_matmul(x, blocks, kidx, backend="stub_no_compact")
    finally:
        kernels.unregister_backend("stub_no_compact")


def test_registered_compact_backend_is_used():
    """A backend from outside: its compact products run through the custom VJP."""
    calls = []

    def wrap(fn, tag):
        def f(*a):
            calls.append(tag)
            return fn(*a)
        return f

    from kernels.bsmm import reference as ref
    compact = kernels.CompactBackend(wrap(ref.compact_matmul, "fwd"),
                                     wrap(ref.compact_matmul_t, "dx"),
                                     wrap(ref.compact_sddmm, "dw"))
    kernels.register_backend("stub_compact", kernels.MatmulBackend(
        ref.matmul, ref.matmul_t, ref.sddmm, compact=compact))
    try:
        rng = np.random.default_rng(9)
        x, blocks, ct = _data((6,), 32, 48, 1, 16, jnp.float32, rng)
        kidx = _kidx(2, 3, 1, rng)
        f = lambda x, bl: kernels.compact_matmul(x, bl, kidx, backend="stub_compact")
        y, vjp = jax.vjp(f, x, blocks)
        got = (y, *vjp(ct))
        for name, g, r in zip(("y", "dx", "dblocks"), got, compact_oracle(x, blocks, kidx, ct)):
            assert_close(g, r, jnp.float32, name)
        assert sorted(calls) == ["dw", "dx", "fwd"]
    finally:
        kernels.unregister_backend("stub_compact")
