"""Hybrid sparse attention: patterns by hand, the block-sparse kernel against the dense masked
oracle (every backend, values and gradients), the model and the train step's step window."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from sparse_gpt.model import attention as A
from sparse_gpt.model.context import StepContext
from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt import flops as flops_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.training import step as train_lib

BACKENDS = [("xla", False), ("reference", False), ("pallas_gpu", True)]
FAST = {"xla_backend_optimization_level": 0}   # 2-3x faster compiles of these tiny programs


def _loops(seq_len, allowed):
    """An [L, L] mask built with Python loops and Python ints (the independent oracle)."""
    return np.array([[allowed(i, j) for j in range(seq_len)] for i in range(seq_len)], bool)


def test_patterns_match_hand_built_masks():
    L = 10
    local = _loops(L, lambda i, j: 0 <= i - j < 3)
    strided = _loops(L, lambda i, j: j <= i and (i - j) % 4 == 0)
    np.testing.assert_array_equal(A.pattern_mask(A.Pattern("local", window=3), L), local)
    np.testing.assert_array_equal(A.pattern_mask(A.Pattern("strided", stride=4), L), strided)
    np.testing.assert_array_equal(
        A.pattern_mask(A.Pattern("local_strided", window=3, stride=4), L), local | strided)
    np.testing.assert_array_equal(A.causal_mask(4), np.tril(np.ones((4, 4), bool)))
    # Fixed blocks of 3 with 1 summary column (positions 2, 5): written out by hand.
    fixed = np.array([[1, 0, 0, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0, 0, 0],
                      [1, 1, 1, 0, 0, 0, 0],
                      [0, 0, 1, 1, 0, 0, 0],
                      [0, 0, 1, 1, 1, 0, 0],
                      [0, 0, 1, 1, 1, 1, 0],
                      [0, 0, 1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(
        A.pattern_mask(A.Pattern("fixed", stride=3, summary=1), 7), fixed)


def test_block_masks_at_a_block_size():
    # L = 64, B = 16: a band of 16 touches the diagonal block and the one to its left.
    np.testing.assert_array_equal(A.block_mask(A.Pattern("local", window=16), 64, 16),
                                  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
    # Every 32nd token back: offsets 32 and 64 land in blocks 2 and 4 to the left.
    np.testing.assert_array_equal(A.block_mask(A.Pattern("strided", stride=32), 64, 16),
                                  [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]])
    meta = kernels.attention_meta(A.Pattern("strided", stride=32), 64, 16)
    np.testing.assert_array_equal(meta.row_kidx_LbxT, [[0, 0], [1, 1], [0, 2], [1, 3]])
    np.testing.assert_array_equal(meta.row_count_Lb, [1, 1, 2, 2])
    np.testing.assert_array_equal(meta.col_qidx_LbxS, [[0, 2], [1, 3], [2, 2], [3, 3]])
    np.testing.assert_array_equal(meta.col_count_Lb, [2, 2, 1, 1])


def test_row_groups_cover_every_row_with_enough_width():
    from kernels.attention.meta import row_groups

    count = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 0])
    groups = row_groups(count, max_groups=4)                 # step ceil(10 / 4) = 3
    assert [w for _, w in groups] == [1, 3, 6, 9, 10]         # 0 -> 1 block; 10 capped at T
    rows = np.concatenate([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(20))
    for r, w in groups:
        assert (count[r] <= w).all() and (w - count[r] < 3).all()


@dataclasses.dataclass(frozen=True)
class Band:
    """Keys lo <= i - j < hi: with lo = 1 query 0 sees nothing (its output must be zero)."""
    lo: int
    hi: int

    def __call__(self, q, k):
        return (q - k >= self.lo) & (q - k < self.hi)


def _check_kernel(mask_fn, backend, interpret, shape=(2, 64, 2, 16), block=16, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    mask = kernels.element_mask(mask_fn, shape[1])

    @functools.partial(jax.jit, compiler_options=FAST)
    def both(q, k, v, ct):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
        want, vjp = jax.vjp(lambda *a: kernels.reference_attention(*a, mask), *f32[:3])
        f = functools.partial(kernels.block_sparse_attention, mask_fn=mask_fn,
                              block_size=block, backend=backend, interpret=interpret)
        got, vjp_got = jax.vjp(lambda q, k, v: f(q, k, v), q, k, v)
        return (got, *vjp_got(ct)), (want, *vjp(f32[3]))

    got, want = both(q, k, v, ct)
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, (name, g.shape, g.dtype)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=tol,
                                   rtol=tol, err_msg=f"{backend} {name}")
    return got


@pytest.mark.parametrize("backend,interpret", BACKENDS)
@pytest.mark.parametrize("pattern", [A.Pattern("local_strided", window=8, stride=24),
                                     A.Pattern("fixed", stride=32, summary=4)])
def test_kernel_matches_dense_masked_oracle(backend, interpret, pattern):
    _check_kernel(pattern, backend, interpret)


@pytest.mark.parametrize("backend,interpret", BACKENDS)
def test_kernel_empty_rows_and_skipped_blocks(backend, interpret):
    out = _check_kernel(Band(1, 20), backend, interpret)[0]
    assert not np.asarray(out)[:, 0].any(), "a query with no allowed key outputs zeros"


def test_kernel_bf16_and_backend_choice():
    _check_kernel(A.Pattern("local", window=20), "xla", False, (1, 32, 2, 16), 16, jnp.bfloat16)
    assert kernels.resolve_attention_backend("auto") == "xla"   # tests run on CPU
    assert kernels.resolve_attention_backend("auto", "gpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="unknown attention backend"):
        kernels.resolve_attention_backend("triton")
    with pytest.raises(ValueError, match="not a multiple of the attention block size"):
        kernels.block_sparse_attention(*[jnp.zeros((1, 40, 1, 16))] * 3, Band(0, 4),
                                       block_size=16)


def test_registered_attention_backend_matches_oracle():
    """An outside backend (here the reference functions) is selectable by name once registered."""
    from kernels.attention import reference as attn_reference

    stub = kernels.AttentionBackend(attn_reference.forward, attn_reference.backward)
    kernels.register_attention_backend("stub_reference", stub)
    try:
        _check_kernel(Band(1, 20), "stub_reference", False)
    finally:
        kernels.unregister_attention_backend("stub_reference")
    with pytest.raises(ValueError, match="unknown attention backend 'stub_reference'"):
        kernels.resolve_attention_backend("stub_reference")


def test_xla_kernel_skips_empty_blocks():
    """Compiled FLOPs follow the block density (local 16 at L=256, B=16: 31/256 blocks)."""
    pattern = A.Pattern("local", window=16)
    q = jax.ShapeDtypeStruct((1, 256, 1, 16), jnp.float32)

    def flops(backend):
        loss = lambda q, k, v: jnp.sum(kernels.block_sparse_attention(   # noqa: E731
            q, k, v, pattern, block_size=16, backend=backend))
        cost = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, q, q).compile()
        cost = cost.cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    density = A.block_mask(pattern, 256, 16).mean()
    assert density == 31 / 256
    assert flops("xla") < 1.5 * density * flops("reference")


def test_pallas_gpu_lowers_to_triton():
    """Lowering (not compiling) from this CPU host catches Triton-incompatible code."""
    x = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    pattern = A.Pattern("fixed", stride=64, summary=8)
    loss = lambda q, k, v: jnp.sum(kernels.block_sparse_attention(  # noqa: E731
        q, k, v, pattern, block_size=64, backend="pallas_gpu").astype(jnp.float32))
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3   # forward, dQ, dK/dV


def _tiny_config(**attention):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=2, d_model=32, n_heads=2, max_len=64)
    c.data.seq_len = 64
    c.train.update(batch_size=2, num_steps=6)
    c.attention.update(pattern="local_strided", window=8, stride=48, block_size=16,
                       sparse_start=2, sparse_end=4)
    c.attention.update(**attention)
    return c


def test_config_window_and_errors():
    assert plan_lib.from_config(_tiny_config(sparse_end=0)).attention is None           # off by default
    spec = plan_lib.from_config(_tiny_config(sparse_end=-1)).attention
    assert (spec.start, spec.end, spec.pattern.window) == (2, 6, 8)      # -1: num_steps
    assert np.asarray(jax.vmap(spec.active)(jnp.arange(7))).tolist() == [0, 0, 1, 1, 1, 1, 0]
    for bad, message in [(dict(pattern="star"), "Unknown attention.pattern"),
                         (dict(block_size=24), "attention.block_size"),
                         (dict(block_size=128), "not a multiple"),
                         (dict(impl="flash"), "Unknown attention.impl"),
                         (dict(sparse_start=5), "sparse_start"),
                         (dict(pattern="fixed", summary=60), "summary")]:
        with pytest.raises(ValueError, match=message):
            plan_lib.from_config(_tiny_config(**bad)).attention
    # Pairs per head, local 8 | strided 48 at L=64, B=16: the 4 diagonal blocks, the 3 below
    # them (offsets 1..31) and block (3, 0) (offset 48); not (2, 0) or (3, 1) (17..47).
    assert spec.pairs(64) == A.block_mask(spec.pattern, 64, 16).sum() * 256 == 8 * 256
    assert float(spec.switch(0).pairs(64)) == 64 * 64 and float(spec.switch(3).pairs(64)) == 8 * 256
    assert dataclasses.replace(spec, impl="masked").pairs(64) == 64 * 64
    piped = _tiny_config(sparse_end=-1)
    piped.mesh.update(stage=2, data=-1, num_microbatches=2)
    with pytest.raises(ValueError, match="unpipelined"):   # a pipelined model: refuse
        plan_lib.from_config(piped)


def test_model_sparse_attention_equals_masked_oracle():
    c = _tiny_config()
    model = model_lib.GPT(plan_lib.from_config(c).model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 64)))
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    spec = plan_lib.from_config(c).attention
    oracle = dataclasses.replace(spec, impl="masked")   # jax's dense attention, [L, L] mask

    @functools.partial(jax.jit, compiler_options=FAST)
    def logits(step):
        run = lambda s=None: model.apply(variables, tokens, StepContext(attention=s))  # noqa: E731
        return run(spec.switch(step)), run(oracle.switch(step)), run()

    kernel, masked, dense = logits(2)
    np.testing.assert_allclose(kernel, masked, atol=1e-6, rtol=1e-5)
    assert not np.allclose(kernel, dense, atol=1e-3)
    kernel, masked, dense = logits(5)                  # outside the window: dense
    np.testing.assert_allclose(kernel, dense, atol=1e-6, rtol=0)
    np.testing.assert_allclose(masked, dense, atol=1e-6, rtol=0)


def test_train_step_switches_by_step_without_recompiling():
    """One jitted step over steps 0..5 with the window [2, 4): no recompile, the oracle's loss
    inside the window, and the attention FLOPs of the pattern counted only there."""
    c = _tiny_config()
    c.sparsity.update(method="static", density=0.25, sparse_layers="mlp/fc")
    model, tx, method = train_lib.build(plan_lib.from_config(c))
    spec = plan_lib.from_config(c).attention
    state = jax.jit(lambda r: train_lib.init_state(plan_lib.from_config(c), model, tx, method, r))(jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, method, attention=spec),
                   compiler_options=FAST)
    oracle_ctx = StepContext(attention=dataclasses.replace(spec, impl="masked").switch(2))
    oracle = lambda p, m, t, mdl, ctx: train_lib.forward(p, m, t, mdl, oracle_ctx)  # noqa: E731
    oracle_loss = jax.jit(lambda p, m, b: train_lib.loss_fn(p, m, b, model, oracle),
                          compiler_options=FAST)
    rng = np.random.default_rng(1)
    seq = jnp.asarray(rng.integers(0, 32, (2, 65)))
    batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": jnp.ones((2, 64))}
    full = float(flops_lib.step_flops(model.cfg, state.masks, 2, 64)["sparse"])
    # Attention FLOPs in the window: 12 * batch * D * layers * pairs, 64^2 -> 8 * 16^2.
    saved = 12 * 2 * 32 * 2 * (64 * 64 - 8 * 256)
    on = []
    for i in range(6):
        if i == 2:
            want = oracle_loss(state.params, state.masks, batch)
        before = float(state.flops)
        state, metrics = step(state, batch)
        on.append(float(metrics["sparse_attention"]))
        assert float(state.flops) - before == pytest.approx(full - on[-1] * saved), i
        if i == 2:
            np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert on == [0, 0, 1, 1, 0, 0]
    assert step._cache_size() == 1, "the attention switch must not recompile"


@pytest.mark.slow
def test_sharded_training_with_sparse_attention_matches_one_device():
    """On a data-parallel mesh the kernel runs per device in shard_map (like the matmul)."""
    from sparse_gpt.parallel import sharding
    from sparse_gpt.training import trainer

    c = _tiny_config(sparse_start=1, sparse_end=3)
    c.train.batch_size = 4
    tokens = np.random.default_rng(0).integers(0, 32, (4, 64), np.int32)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
             "weights": np.ones((4, 64), np.float32)}
    losses = []
    for data, devices in ((1, jax.devices()[:1]), (4, jax.devices()[:4])):
        c.mesh.data = data
        plan = plan_lib.from_config(c, num_devices=len(devices))
        model, tx, method = train_lib.build(plan)
        steps = trainer.make_steps(plan, model, tx, method, sharding.make_mesh(c.mesh, devices),
                                   compiler_options=FAST)
        state = steps.init(jax.random.key(0))
        losses.append([])
        for _ in range(4):
            state, metrics = steps.train_step(state, batch)
            losses[-1].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
