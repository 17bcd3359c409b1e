"""Block-sparse matmul: every backend against the dense masked oracle, values and gradients.

The oracle is ``kernels.reference_matmul`` differentiated by plain autodiff (no custom VJP),
computed in fp32 from the same (possibly bf16-rounded) inputs. Pallas kernels run in
interpret mode on CPU, so the real kernel bodies are exercised; shapes stay tiny.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import BlockBudget
from kernels.bsmm import reference as bsmm_reference
from tests.helpers import assert_close, backend_name, block_oracle, force_xla_core

BACKENDS = [("xla", False), ("xla-scan", False), ("reference", False), ("pallas_gpu", True),
            ("pallas_tpu", True)]


def _masks(kb, nb, rng):
    """Density 0 .. 1, plus all-zero rows and columns."""
    out = [np.zeros((kb, nb), bool), np.ones((kb, nb), bool)]
    out += [rng.random((kb, nb)) < d for d in (0.3, 0.6)]
    holes = rng.random((kb, nb)) < 0.8
    holes[rng.integers(kb)] = False
    holes[:, rng.integers(nb)] = False
    return out + [holes]


def _check_backend(backend, interpret, lead, k, n, b, dtype, seed, full_budget=False):
    """One compiled program, several masks; the budget is one short of full unless asked, so
    dense masks are truncated (the oracle then uses ``meta.block_mask_KbxNb``)."""
    rng = np.random.default_rng(seed)
    kb, nb = k // b, n // b
    budget = BlockBudget(kb, nb) if full_budget else BlockBudget(max(kb - 1, 1), max(nb - 1, 1))
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    ct = jnp.asarray(rng.standard_normal((*lead, n)), dtype)

    @jax.jit
    def run(x, w, ct, mask_KbxNb):
        meta = kernels.make_block_meta(mask_KbxNb, b, budget, block_mask=True)
        f = lambda x, w: kernels.block_sparse_matmul(
            x, w, meta, backend=backend, interpret=interpret
        )
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct)), meta.block_mask_KbxNb

    for mask in _masks(kb, nb, rng):
        got, kept = run(x, w, ct, mask)
        kept = np.asarray(kept)
        fits = (mask.sum(0) <= budget[0]).all() and (mask.sum(1) <= budget[1]).all()
        assert (kept == mask).all() == fits and not (kept & ~mask).any()
        want = block_oracle(x, w, kept, b, ct)
        for name, g, r in zip(("y", "dx", "dw"), got, want):
            assert g.shape == r.shape and g.dtype == dtype, (name, g.shape, g.dtype)
            assert_close(g, r, dtype, f"{backend} {name} density={mask.mean():.2f}")
        dw_outside = np.asarray(got[2], np.float32) * (1 - np.kron(kept, np.ones((b, b))))
        assert not dw_outside.any(), "dW must be exactly zero outside the non-zero blocks"
    assert run._cache_size() == 1, "a new mask must not recompile"


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_backend_matches_oracle_fp32(backend, interpret, monkeypatch):
    _check_backend(backend_name(backend, monkeypatch), interpret, (2, 5), 48, 64, 16,
                   jnp.float32, seed=1)


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_backend_matches_oracle_bf16(backend, interpret, monkeypatch):
    _check_backend(backend_name(backend, monkeypatch), interpret, (24,), 64, 96, 32,
                   jnp.bfloat16, seed=2)


@pytest.mark.parametrize("seed", range(4))
def test_xla_random_shapes(seed, monkeypatch):
    # Even seeds run XLA's column scan, odd ones its batched formulation; seeds 2-3 give a
    # full budget (the dense fallback), 0-1 one block short of it (Kb >= 2, so the core runs).
    force_xla_core(monkeypatch, ("scan", "batched")[seed % 2])
    rng = np.random.default_rng(100 + seed)
    b = int(rng.choice([16, 32, 64]))
    lead = tuple(int(v) for v in rng.integers(1, 7, size=int(rng.integers(1, 3))))
    k, n = b * int(rng.integers(2, 5)), b * int(rng.integers(1, 5))
    _check_backend("xla", False, lead, k, n, b, jnp.float32, seed, full_budget=seed // 2 == 1)


def test_make_block_meta_hand_computed():
    mask = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]], bool)
    meta = kernels.make_block_meta(mask, 16, BlockBudget(2, 3), block_mask=True)
    # Padding repeats the column's last real index (0 for an empty column).
    np.testing.assert_array_equal(meta.col_kidx_NbxT, [[0, 1], [0, 0], [0, 2], [0, 0]])
    np.testing.assert_array_equal(meta.col_count_Nb, [2, 0, 2, 0])
    np.testing.assert_array_equal(meta.row_nidx_KbxR, [[0, 2, 2], [0, 0, 0], [2, 2, 2]])
    np.testing.assert_array_equal(meta.row_count_Kb, [2, 1, 1])
    assert meta.shape == (48, 64) and int(meta.n_dropped) == 0
    # An element mask is pooled: one non-zero entry switches its whole block on.
    elem = np.zeros((48, 64), np.float32)
    elem[20, 40] = 1.0
    meta = kernels.make_block_meta(elem, 16, BlockBudget(1, 1))
    assert np.asarray(meta.block_mask_KbxNb).nonzero() == (np.array([1]), np.array([2]))


def test_budget_forms_and_the_layer_call_style():
    """``budget=`` by keyword (as SparseDense calls it), int totals, and the default budgets."""
    mask = np.zeros((64, 96), bool)
    mask[:16, :16] = mask[32:48, :16] = mask[:16, 80:] = True  # blocks (0,0), (2,0), (0,5)
    budget = kernels.block_budget(64, 96, 16, 0.5)
    meta = kernels.make_block_meta(mask, block_size=16, budget=budget)
    assert meta.budget == (2, 6)
    assert kernels.make_block_meta(mask, 16, 3).budget == (3, 3)  # int: per-layer total
    assert kernels.make_block_meta(mask, 16).budget == (2, 2)  # concrete: tightest
    traced = jax.jit(lambda m: kernels.make_block_meta(m, 16).col_kidx_NbxT)(mask)
    assert traced.shape == (6, 4)  # traced, no budget: full Kb per column
    with pytest.raises(TypeError, match="max_blocks"):  # one name for the budget: budget=
        kernels.make_block_meta(mask, 16, max_blocks=budget)


def test_block_budget():
    assert kernels.block_budget(1024, 4096, 128, 0.1) == (1, 32)
    assert kernels.block_budget(1024, 4096, 128, 0.25, row_slack=1) == (2, 9)
    assert kernels.block_budget(1024, 4096, 128, 0.5, col_slack=1) == (5, 32)
    assert kernels.block_budget(960, 960, 32, 0.1) == (3, 30)  # no float round-up to 4
    assert kernels.block_budget(256, 256, 64, 0.0) == (1, 4)
    with pytest.raises(ValueError, match="density"):
        kernels.block_budget(256, 256, 64, 1.5)


def test_non_divisible_shape_error_names_shape_block_and_fix():
    with pytest.raises(ValueError, match=r"K=100, N=64.*block_size=32.*pad"):
        kernels.make_block_meta(np.ones((100, 64)), 32)
    with pytest.raises(ValueError, match="block_mask=True"):  # a block mask passed as [K, N]
        kernels.make_block_meta(np.ones((3, 2)), 16)
    meta = kernels.make_block_meta(np.ones((2, 2), bool), 32, block_mask=True)
    with pytest.raises(ValueError, match=r"K=64, N=80.*block_size=32.*\(64, 96\)"):
        kernels.block_sparse_matmul(jnp.ones((4, 64)), jnp.ones((64, 80)), meta)
    with pytest.raises(ValueError, match="built for"):
        kernels.block_sparse_matmul(jnp.ones((4, 64)), jnp.ones((64, 128)), meta)
    for bad in (8, 48, 512):
        with pytest.raises(ValueError, match="power of two"):
            kernels.make_block_meta(np.ones((2, 2), bool), bad, block_mask=True)


def test_budget_overflow_raises_outside_jit():
    mask = np.zeros((4, 3), bool)
    mask[:3, 1] = True  # 3 blocks in column 1
    with pytest.raises(ValueError, match=r"max_per_col=2.*column 1 has 3 blocks"):
        kernels.make_block_meta(mask, 16, BlockBudget(2, 3), block_mask=True)
    kernels.make_block_meta(mask, 16, BlockBudget(3, 3), block_mask=True)  # fits
    meta = kernels.make_block_meta(
        mask, 16, BlockBudget(2, 3), block_mask=True, on_overflow="truncate"
    )
    assert int(meta.n_dropped) == 1 and not meta.block_mask_KbxNb[2, 1]


@pytest.mark.parametrize("backend,interpret", [("xla", False), ("pallas_gpu", True)])
def test_budget_overflow_truncates_under_jit(backend, interpret):
    """Under jit: keep the lowest-index blocks per column (then row), count the rest."""
    rng = np.random.default_rng(3)
    mask = np.zeros((4, 3), bool)
    mask[:, 0] = True  # 4 blocks in column 0, budget 2 -> K-blocks 0, 1 kept
    mask[2, 1] = mask[0, 2] = True  # row 0 then holds 2 blocks, budget 2 -> fits
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)

    @jax.jit
    def run(mask):
        meta = kernels.make_block_meta(mask, 16, BlockBudget(2, 2), block_mask=True)
        y = kernels.block_sparse_matmul(x, w, meta, backend=backend, interpret=interpret)
        return y, meta.block_mask_KbxNb, meta.n_dropped

    y, kept, dropped = run(mask)
    want = mask.copy()
    want[2:, 0] = False
    np.testing.assert_array_equal(kept, want)
    assert int(dropped) == 2
    assert_close(y, block_oracle(x, w, want, 16, jnp.zeros((8, 48)))[0], jnp.float32, "y")


def test_topology_changes_inside_one_jitted_loop_without_recompiling():
    """A prune/regrow loop (column top-k of changing scores) inside one jit, plus a layer scan."""
    rng = np.random.default_rng(4)
    n_layers, steps, b, k, n, per_col = 2, 3, 16, 64, 64, 2
    x = jnp.asarray(rng.standard_normal((2, 6, k)), jnp.float32)
    w_LxKxN = jnp.asarray(rng.standard_normal((n_layers, k, n)), jnp.float32)
    scores = jnp.asarray(rng.random((steps, n_layers, k // b, n // b)), jnp.float32)
    budget = kernels.block_budget(k, n, b, per_col / (k // b))
    traces = []

    @jax.jit
    def train(w_LxKxN, scores_SxLxKbxNb):
        traces.append(1)

        def loss(w_LxKxN, masks_LxKxN):
            def layer(h, w_mask):
                w_KxN, mask_KxN = w_mask  # one layer's traced [K, N] mask, as in nn.scan
                meta = kernels.make_block_meta(mask_KxN, b, budget)
                return jnp.tanh(kernels.block_sparse_matmul(h, w_KxN, meta)), None

            h, _ = jax.lax.scan(layer, x, (w_LxKxN, masks_LxKxN))
            return jnp.sum(h**2)

        def step(w_LxKxN, scores_LxKbxNb):
            masks = jax.vmap(lambda s: kernels.column_topk_block_mask(s, per_col))(scores_LxKbxNb)
            masks_LxKxN = jax.vmap(lambda m: kernels.expand_block_mask(m, b))(masks)
            value, g = jax.value_and_grad(loss)(w_LxKxN, masks_LxKxN)
            return w_LxKxN - 0.01 * g, (value, g, masks)

        return jax.lax.scan(step, w_LxKxN, scores_SxLxKbxNb)

    w_last, (values, grads, masks) = train(w_LxKxN, scores)
    train(w_LxKxN, scores[::-1])  # other topologies, same program
    assert len(traces) == 1 and train._cache_size() == 1

    def dense_loss(w_LxKxN, masks_LxKxN):
        h = x
        for w_KxN, m_KxN in zip(w_LxKxN, masks_LxKxN):
            h = jnp.tanh(kernels.reference_matmul(h, w_KxN, m_KxN))
        return jnp.sum(h**2)

    w_cur = w_LxKxN
    for s in range(steps):
        m = np.asarray(masks[s])
        assert (m.sum(axis=1) == per_col).all() and (s == 0 or (m != np.asarray(masks[0])).any())
        m_LxKxN = jnp.asarray(np.kron(m, np.ones((b, b))))
        value, g = jax.value_and_grad(dense_loss)(w_cur, m_LxKxN)
        assert_close(values[s], value, jnp.float32, f"loss step {s}")
        assert_close(grads[s], g, jnp.float32, f"grad step {s}")
        w_cur = w_cur - 0.01 * g


def test_frozen_topology_matches_oracle_with_static_slices():
    rng = np.random.default_rng(5)
    mask = rng.random((4, 6)) < 0.4
    mask[:, 1] = mask[:, 2] = [1, 1, 0, 1]  # two columns share a K-block set: one GEMM
    mask[:, 5] = False
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 5, 96)), jnp.float32)
    fmeta = kernels.make_block_meta(mask, 16, block_mask=True, frozen=True)
    assert isinstance(fmeta, kernels.FrozenBlockMeta) and hash(fmeta)

    def run(x, w, ct, backend="xla", interpret=False):
        y, vjp = jax.vjp(
            lambda x, w: kernels.block_sparse_matmul(
                x, w, fmeta, backend=backend, interpret=interpret
            ),
            x,
            w,
        )
        return (y, *vjp(ct))

    want = block_oracle(x, w, mask, 16, ct)
    for got in (
        jax.jit(run)(x, w, ct),
        jax.jit(run, static_argnums=(3, 4))(x, w, ct, "pallas_gpu", True),
    ):
        for name, g, r in zip(("y", "dx", "dw"), got, want):
            assert_close(g, r, jnp.float32, f"frozen {name}")
    jaxpr = str(jax.make_jaxpr(run)(x, w, ct))
    assert "gather" not in jaxpr and "scatter" not in jaxpr and "while" not in jaxpr
    with pytest.raises(ValueError, match="frozen=True"):
        jax.jit(lambda m: kernels.make_block_meta(m, 16, block_mask=True, frozen=True))(mask)


def test_backend_choice():
    assert kernels.available_backends("cpu") == ("xla", "reference")
    assert kernels.available_backends("gpu")[0] == "pallas_gpu"
    assert kernels.available_backends("tpu")[0] == "pallas_tpu"
    assert kernels.resolve_backend("auto") == "xla"  # tests run on CPU
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.resolve_backend("cuda")


def _stub_backend(calls):
    """A backend defined outside the package: the reference products, recording each call."""

    def delegate(name):
        def product(*args):
            calls.append(name)
            return getattr(bsmm_reference, name)(*args)

        return product

    return kernels.MatmulBackend(*(delegate(n) for n in ("matmul", "matmul_t", "sddmm")))


def test_registered_backend_matches_dense_maskedblock_oracle(monkeypatch):
    """``register_backend`` makes an outside backend selectable by name (and by "auto" via
    the environment variable); values and both gradients match ``x @ (w * expand(mask))``."""
    rng = np.random.default_rng(8)
    mask = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 0, 1]], bool)  # empty column 1
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 3, 48)), jnp.float32)
    m_KxN = jnp.asarray(np.kron(mask, np.ones((16, 16))), jnp.float32)  # independent expand
    want_y, vjp = jax.vjp(lambda x, w: x @ (w * m_KxN), x, w)
    want = (want_y, *vjp(ct))
    calls = []
    kernels.register_backend("stub_reference", _stub_backend(calls))
    try:
        meta = kernels.make_block_meta(mask, 16, block_mask=True)
        monkeypatch.setenv("SPARSE_GPT_BSMM_BACKEND", "stub_reference")
        for backend in ("stub_reference", "auto"):  # "auto" takes the environment variable
            f = lambda x, w: kernels.block_sparse_matmul(x, w, meta, backend=backend)
            y, vjp_got = jax.vjp(f, x, w)
            for name, g, r in zip(("y", "dx", "dw"), (y, *vjp_got(ct)), want):
                assert_close(g, r, jnp.float32, f"registered {backend} {name}")
            assert sorted(set(calls)) == ["matmul", "matmul_t", "sddmm"]
            calls.clear()
    finally:
        kernels.unregister_backend("stub_reference")
    with pytest.raises(ValueError, match="unknown backend 'stub_reference'"):
        kernels.resolve_backend("stub_reference")  # unregistered again


def test_unknown_or_bad_backend_errors_name_the_registered_ones():
    meta = kernels.make_block_meta(np.ones((2, 2), bool), 16, block_mask=True)
    kernels.register_backend("stub_reference", _stub_backend([]))
    try:
        with pytest.raises(ValueError, match="unknown backend 'triton'") as err:
            kernels.block_sparse_matmul(jnp.ones((4, 32)), jnp.ones((32, 32)), meta,
                                        backend="triton")
        for name in (*kernels.BACKENDS, "stub_reference", "register_backend"):
            assert name in str(err.value), name
    finally:
        kernels.unregister_backend("stub_reference")
    with pytest.raises(ValueError, match="built in"):
        kernels.register_backend("xla", _stub_backend([]))
    with pytest.raises(TypeError, match="MatmulBackend"):
        kernels.register_backend("stub_reference", bsmm_reference)


def test_no_backend_module_imports_another():
    """Backends share code through kernels/common.py (and their op's meta), never each other."""
    root = pathlib.Path(kernels.__file__).parent
    for op, backends in (("bsmm", ("reference", "xla", "pallas_gpu", "pallas_tpu")),
                         ("attention", ("reference", "xla", "pallas_gpu"))):
        others = {f"kernels.{o}.{b}" for o in ("bsmm", "attention") for b in backends}
        for b in backends:
            tree = ast.parse((root / op / f"{b}.py").read_text())
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            bad = (imported & others) - {f"kernels.{op}.{b}"}
            assert not bad and not any(i.startswith("sparse_gpt") for i in imported), (b, bad)


@pytest.mark.parametrize("backend,platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_pallas_kernels_lower_for_their_platform(backend, platform):
    """Lowering (not compiling) from this CPU host catches Triton/Mosaic-incompatible code."""
    b, k, n = 128, 384, 512
    x = jax.ShapeDtypeStruct((200, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
    m = jax.ShapeDtypeStruct((k // b, n // b), jnp.bool_)

    def f(x, w, mask):
        meta = kernels.make_block_meta(mask, b, BlockBudget(2, 3), block_mask=True)
        loss = lambda x, w: jnp.sum(kernels.block_sparse_matmul(x, w, meta, backend=backend))
        return jax.value_and_grad(loss, (0, 1))(x, w)

    text = jax.jit(f).trace(x, w, m).lower(lowering_platforms=(platform,)).as_text()
    call = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    assert text.count(call) == 3  # forward, dX and dW kernels


def test_pallas_tpu_under_the_tpu_semantics_interpreter():
    """``pltpu.InterpretParams`` models SMEM scalar prefetch and DMAs (slower: ~5 s here)."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(6)
    mask = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 0]], bool)  # empty column 1
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((8, 48)), jnp.float32)
    meta = kernels.make_block_meta(mask, 16, BlockBudget(3, 2), block_mask=True)

    @jax.jit
    def run(x, w, ct):
        f = lambda x, w: kernels.block_sparse_matmul(
            x, w, meta, backend="pallas_tpu", interpret=pltpu.InterpretParams()
        )
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct))

    for name, g, r in zip(("y", "dx", "dw"), run(x, w, ct), block_oracle(x, w, mask, 16, ct)):
        assert_close(g, r, jnp.float32, f"tpu interpreter {name}")


def test_mixed_dtypes_promote_and_gradients_keep_input_dtypes():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)
    meta = kernels.make_block_meta(np.array([[1, 0], [1, 1]], bool), 16, block_mask=True)
    y, vjp = jax.vjp(lambda x, w: kernels.block_sparse_matmul(x, w, meta), x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert_close(y, block_oracle(x, w, np.array([[1, 0], [1, 1]]), 16, y)[0], jnp.float32, "y")
