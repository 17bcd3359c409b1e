"""The fast paths of the train step, each against the path it replaces.

* a static block-sparse run multiplies with its frozen topology (``model/topology.py``):
  the same losses, parameters, FLOPs and eval loss as the dense masked product of the same
  masks, with the layers scanned (``lax.switch`` over per-layer topologies) or unrolled;
* ``method=dense`` runs the model without masks: the same numbers as all-ones masks;
* only evolving methods re-apply the masks after the optimizer update, yet a static run's
  masked weights stay exactly zero under AdamW's weight decay;
* ``model.scan_unroll`` changes the program, not the numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import cli, config as config_lib, plan as plan_lib
from sparse_gpt.model.context import StepContext
from sparse_gpt.model.topology import Topology
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.training import step as train_lib, trainer
from tests.helpers import force_xla_core

FAST = {"xla_backend_optimization_level": 0}
STEPS = 4


def config(**overrides):
    c = config_lib.get_config("tiny")
    for key, value in dict({
            "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.max_len": 16,
            "data.seq_len": 16, "train.batch_size": 8, "train.warmup_steps": 1,
            "train.num_steps": 100, "sparsity.method": "static", "sparsity.density": 0.25,
            "sparsity.structure": "block", "sparsity.block_size": 16,
            "model.matmul": "block_sparse"}, **overrides).items():
        cli.apply_override(c, key, str(value))
    return c


def batch(c, seed=0):
    shape = (c.train.batch_size, c.data.seq_len)
    tokens = np.random.default_rng(seed).integers(0, 256, shape, np.int32)
    return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
            "weights": np.ones(shape, np.float32)}


def run(c, steps=STEPS, **make_kwargs):
    """(losses, final state, eval loss sum, steps) of ``steps`` steps via make_steps."""
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    st = trainer.make_steps(plan, model, tx, method, compiler_options=FAST, **make_kwargs)
    state = st.init(jax.random.key(0))
    losses = []
    for i in range(steps):
        state, metrics = st.train_step(state, batch(c, i))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, float(st.eval_step(state, batch(c, 99))["loss_sum"]), st


@pytest.mark.parametrize("unroll", [1, 0], ids=["scanned", "unrolled"])
def test_frozen_topology_matches_dense_masked_product(unroll):
    c = config(**{"model.scan_unroll": unroll})
    plan = plan_lib.from_config(c)
    model, _, method = train_lib.build(plan)
    assert train_lib.keeps_fixed_masks(model, method)
    losses, state, val, _ = run(c)
    ref_losses, ref_state, ref_val, _ = run(config(**{"model.scan_unroll": unroll,
                                                       "model.matmul": "masked"}))
    np.testing.assert_array_equal(jax.device_get(state.masks["blocks"]["mlp"]["fc"]["kernel"]),
                                  jax.device_get(ref_state.masks["blocks"]["mlp"]["fc"]["kernel"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    assert float(state.flops) == pytest.approx(float(ref_state.flops), rel=1e-6)
    # The layers' masks differ, so the scanned program switches between their topologies.
    m = jax.device_get(state.masks["blocks"]["attn"]["qkv"]["kernel"])
    assert not np.array_equal(m[0], m[1])


def test_frozen_steps_use_the_first_states_masks_without_retracing():
    c = config()
    _, state, _, st = run(c, steps=1)
    traced = []
    orig = Topology.of

    def counting(*args, **kwargs):
        traced.append(1)
        return orig(*args, **kwargs)

    Topology.of = counting
    try:
        for i in range(3):
            state, _ = st.train_step(state, batch(c, i))
    finally:
        Topology.of = orig
    assert traced == []          # built once, on the first call of run()


def test_topology_refuses_masks_that_are_not_whole_blocks():
    mask = np.ones((2, 32, 32), bool)
    mask[0, 0, 0] = False
    with pytest.raises(ValueError, match="not made of whole 16x16 blocks"):
        Topology.of({"blocks": {"mlp": {"fc": {"kernel": mask}}}}, 16)


def test_frozen_topology_block_layout_is_the_masks():
    rng = np.random.default_rng(0)
    blocks = rng.random((3, 2, 4)) < 0.5
    mask = np.kron(blocks, np.ones((16, 16), bool)).astype(bool)
    topo = Topology.of({"blocks": {"mlp": {"fc": {"kernel": mask}}}}, 16)
    metas = topo.get("mlp/fc")
    assert len(metas) == 3 and topo.get("attn/qkv") is None
    for layer, meta in enumerate(metas):
        np.testing.assert_array_equal(meta.numpy(), blocks[layer])


def test_dense_method_runs_without_masks_and_matches_all_ones_masks():
    c = config(**{"sparsity.method": "dense", "sparsity.density": 1.0,
                  "sparsity.structure": "unstructured", "model.matmul": "masked"})
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    assert method.always_dense
    state = train_lib.init_state(plan, model, tx, method, jax.random.key(0))
    b = {k: jnp.asarray(v) for k, v in batch(c).items()}
    step = jax.jit(train_lib.make_train_step(model, tx, method))
    # The oracle: the same step of a method that keeps (all-ones) masks in the product.
    masked = jax.jit(train_lib.make_train_step(model, tx, type(
        "OnesMasks", (type(method),), {"always_dense": False})(method.settings)))
    jaxpr = str(jax.make_jaxpr(step)(state, b))
    ref = str(jax.make_jaxpr(masked)(state, b))
    assert jaxpr.count("select_n") < ref.count("select_n")   # no where(mask, w, 0)
    new, metrics = step(state, b)
    ref_new, ref_metrics = masked(state, b)
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
    assert float(metrics["density"]) == 1.0
    assert float(metrics["dense_flops"]) == float(ref_metrics["dense_flops"])
    assert float(new.flops) == pytest.approx(float(ref_new.flops), rel=1e-6)
    for a, r in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_new.params)):
        np.testing.assert_allclose(a, r, atol=1e-6)


def test_static_masked_weights_stay_exactly_zero_without_reapplying_masks():
    c = config(**{"model.matmul": "masked", "train.weight_decay": 0.5, "train.lr": 0.05})
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    assert not method.evolves
    state = train_lib.init_state(plan, model, tx, method, jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, method))
    for i in range(6):
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch(c, i).items()})
    flat_p = masks_lib.flatten(state.params)
    for path, m in masks_lib.flatten(state.masks).items():
        w = np.asarray(flat_p[path])
        m = np.asarray(m)
        assert np.all(w[~m] == 0.0), path
        assert np.any(w[m] != 0.0), path


def test_scan_unroll_changes_the_program_not_the_numbers():
    c1, c0 = (config(**{"model.scan_unroll": u, "model.matmul": "masked"}) for u in (1, 0))
    outs = []
    for c in (c1, c0):
        plan = plan_lib.from_config(c)
        model, tx, method = train_lib.build(plan)
        state = train_lib.init_state(plan, model, tx, method, jax.random.key(0))
        b = jnp.asarray(batch(c)["inputs"])
        outs.append(jax.jit(lambda p, m, t: train_lib.forward(p, m, t, model))(
            state.params, state.masks, b))
        text = jax.jit(lambda p, m, t: train_lib.forward(p, m, t, model)).lower(
            state.params, state.masks, b).as_text()
        assert text.count("stablehlo.while") == (c.model.scan_unroll == 1)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scan_unroll=-1 must be >= 0"):
        plan_lib.from_config(config(**{"model.scan_unroll": -1}))


def test_frozen_topology_with_a_dense_phase_leaves_the_kernels_at_the_lift():
    c = config(**{"sparsity.dense_finetune_start": 2, "train.num_steps": 8})
    losses, state, _, _ = run(c)
    ref_losses, ref_state, _, _ = run(config(**{"sparsity.dense_finetune_start": 2,
                                                "train.num_steps": 8,
                                                "model.matmul": "masked"}))
    assert bool(masks_lib.all_live(state.masks))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert float(state.flops) == pytest.approx(float(ref_state.flops), rel=1e-6)


def test_step_context_frozen_needs_topology_and_layer():
    topo = Topology.of({"blocks": {"mlp": {"fc": {"kernel": np.ones((2, 16, 16), bool)}}}}, 16)
    assert StepContext().frozen("mlp/fc") is None
    assert StepContext(topology=topo).frozen("mlp/fc") is None      # outside a block
    metas, layer = StepContext(topology=topo, layer=jnp.int32(1)).frozen("mlp/fc")
    assert len(metas) == 2 and int(layer) == 1


GMP = {"sparsity.method": "gmp", "sparsity.update_every": 2, "sparsity.update_start": 0,
       "sparsity.update_end": 8, "train.num_steps": 12}


def test_budget_tiers_follow_the_density_in_one_compilation():
    c = config(**GMP)
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    assert plan.model.block_tiers == (0.25, 0.5, 1.0) and plan.model.block_density == 1.0
    state = train_lib.init_state(plan, model, tx, method, jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, method))
    tier = jax.jit(lambda m: train_lib.budget_tier(model, m))
    tiers, losses = [], []
    for i in range(10):
        tiers.append(int(tier(state.masks)))
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch(c, i).items()})
        losses.append(float(metrics["loss"]))
    assert tiers[0] == 2 and tiers[-1] == 0 and 1 in tiers        # dense -> 1/2 -> 1/4
    assert step._cache_size() == 1
    ref_losses, _, _, _ = run(config(**GMP, **{"model.matmul": "masked"}), steps=10)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_kernel_tier_is_the_smallest_budget_holding_the_fullest_column():
    from sparse_gpt.model import gpt
    cfg = gpt.ModelConfig(n_layers=2, d_model=64, n_heads=2, block_size=16,
                          matmul="block_sparse", block_tiers=(0.25, 0.5, 1.0))
    masks = {"blocks": {"mlp": {"fc": {"kernel": np.zeros((2, 64, 256), bool)}}}}
    fc = masks["blocks"]["mlp"]["fc"]["kernel"]
    fc[:, :16] = True                        # one K-block in every column: 1 of Kb = 4
    assert int(gpt.kernel_tier(cfg, masks)) == 0
    fc[1, 16:32, 32:48] = True               # layer 1, column 2: two blocks
    assert int(gpt.kernel_tier(cfg, masks)) == 1
    fc[0, 16:48, 0:16] = True                # layer 0, column 0: three blocks
    assert int(gpt.kernel_tier(cfg, masks)) == 2


@pytest.mark.parametrize("seq_len", [48, 128, 192])
def test_chunked_causal_attention_matches_the_softmax_formula(seq_len):
    from sparse_gpt.model.causal import causal_attention
    rng = np.random.default_rng(seq_len)
    q, k, v = (rng.standard_normal((2, seq_len, 3, 8)).astype(np.float32) for _ in range(3))
    s = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(8)
    s = np.where(np.tril(np.ones((seq_len, seq_len), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhlm,bmhk->blhk", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(causal_attention(q, k, v), want, rtol=1e-5, atol=1e-5)
    # Gradients against XLA's own causal attention (the GPU/TPU path).
    def loss(f):
        return jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
    for g, r in zip(loss(causal_attention), loss(lambda *a: jax.nn.dot_product_attention(
            *a, is_causal=True))):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, storage, core", [("set", "dense", "batched"),
                                                   ("set", "compact", "batched"),
                                                   ("set", "compact", "scan")])
def test_kernels_outside_sparse_layers_take_the_plain_product(method, storage, core,
                                                              monkeypatch):
    """With sparse_layers=mlp/*, the all-live attention kernels must not go through a block
    budget sized for the sparse ones (it held 1 of 4 K-blocks and dropped the rest). ``core``:
    the XLA kernels' formulation (this shape takes the batched one unless forced)."""
    import dataclasses
    from sparse_gpt.model import compact, gpt
    force_xla_core(monkeypatch, core)
    c = config(**{"sparsity.method": method, "sparsity.sparse_layers": "mlp/*",
                  "model.sparse_storage": storage})
    p = plan_lib.from_config(c)
    assert p.model.dense_kernels == ("attn/qkv", "attn/out")
    model, tx, m = train_lib.build(p)
    state = train_lib.init_state(p, model, tx, m, jax.random.key(0))
    params, masks = state.params, state.masks
    if storage == "compact":
        params, masks = compact.densify(p.model, params, masks)
    tokens = batch(c)["inputs"]
    oracle = gpt.GPT(dataclasses.replace(p.model.dense_layout(), matmul="masked")).apply(
        {"params": params, "masks": masks}, tokens)
    ctx = StepContext(tier=train_lib.budget_tier(model, state.masks))
    out = model.apply({"params": state.params, "masks": state.masks}, tokens, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(oracle), atol=1e-5)
