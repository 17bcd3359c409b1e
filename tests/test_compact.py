"""Compact storage (``model.sparse_storage=compact``) against the dense layout, its oracle.

The dense layout (``[K, N]`` weights and masks) is the reference for every compact run:
the same seed gives the same losses and, densified, the same params, masks and moments (bit
for bit with gradient clipping off; with it, the clip norm's sum may round differently).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import cli, plan as plan_lib
from sparse_gpt import config as config_lib
from sparse_gpt.model import compact
from sparse_gpt.parallel import sharding
from sparse_gpt.sparsity import compact_update
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer
from tests.helpers import small_config as corpus_config

FAST = {"xla_backend_optimization_level": 0}
B = 16
FC = "blocks/mlp/fc/kernel"


def config(storage="compact", method="static", **overrides):
    c = config_lib.get_config("tiny")
    for key, value in dict({
            "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.max_len": 16,
            "model.vocab_size": 64, "data.seq_len": 16, "train.batch_size": 8,
            "train.num_steps": 6, "train.warmup_steps": 1, "sparsity.method": method,
            "sparsity.density": 0.25, "sparsity.structure": "block",
            "sparsity.block_size": B, "sparsity.update_every": 2, "sparsity.update_end": 6,
            "model.matmul": "block_sparse", "model.sparse_storage": storage,
            "mesh.data": 1}, **overrides).items():
        cli.apply_override(c, key, str(value))
    return c


def batches(c, n):
    shape = (c.train.batch_size, c.data.seq_len)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, c.model.vocab_size, shape, np.int32)
        out.append({"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
                    "weights": np.ones(shape, np.float32)})
    return out


def run(c, devices=None, n=None):
    devices = devices or jax.devices()[:1]
    p = plan_lib.from_config(c, num_devices=len(devices))
    model, tx, method = train_lib.build(p)
    steps = trainer.make_steps(p, model, tx, method, sharding.make_mesh(c.mesh, devices),
                               compiler_options=FAST)
    state = steps.init(jax.random.key(0))
    losses = []
    for batch in batches(c, n or c.train.num_steps):
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return p, state, np.array(losses), steps


def assert_close_leaves(a_tree, b_tree):
    """Equal bool/int leaves; float leaves within 1e-4 in norm (Adam's first steps on the
    lifted weights of a dense phase turn float rounding into a sign: elements can differ by
    up to 2 x lr)."""
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a, b = np.asarray(a), np.asarray(b)
        if not np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(a, b)
        else:
            assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-7


def dense_view(p, state):
    """(params, masks, Adam mu) of a compact state in the dense layout."""
    params, masks = compact.densify(p.model, state.params, state.masks)
    return params, masks, compact.densify_like(p.model, state.opt_state, state.masks)


@pytest.fixture(scope="module")
def static_pair():
    # Clipping off: the global gradient norm sums the two layouts' gradients in different
    # orders ([K, N] with zeros against [Nb, T, B, B]), so with it the parameters may differ
    # by float rounding (seen on some CPUs); every product is the same computation.
    off = {"train.grad_clip": 1e9}
    return run(config("dense", **off)), run(config("compact", **off))


def test_compact_kernels_hold_only_live_blocks_with_index_masks(static_pair):
    _, (p, state, _, _) = static_pair
    slots = dict(p.model.compact_slots)
    assert slots == {"attn/qkv": 1, "attn/out": 1, "mlp/fc": 1, "mlp/proj": 4}  # Kb/4
    fc, idx = compact.get(state.params, FC), compact.get(state.masks, FC)
    assert fc.shape == (2, 256 // B, 1, B, B) and idx.shape == (2, 256 // B, 1)
    assert idx.dtype == jnp.int32
    mu = compact.get(state.opt_state[1][0].mu, FC)   # adamw: chain(clip, adam, ...)
    assert mu.shape == fc.shape


def test_static_compact_trains_exactly_as_the_dense_layout(static_pair):
    (pd, dense, dense_losses, _), (pc, comp, comp_losses, _) = static_pair
    np.testing.assert_array_equal(comp_losses, dense_losses)
    params, masks, opt = dense_view(pc, comp)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dense.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(dense.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(dense.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(comp.flops) == float(dense.flops)


def test_rigl_compact_updates_as_the_dense_layout():
    _, dense, dense_losses, _ = run(config("dense", "rigl"))
    pc, comp, comp_losses, _ = run(config("compact", "rigl"))
    np.testing.assert_allclose(comp_losses, dense_losses, rtol=1e-6)
    params, masks, _ = dense_view(pc, comp)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(dense.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(dense.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_set_update_on_compact_arrays_by_hand():
    """One SET update: counts per column kept, the dropped blocks among each matrix's
    weakest, kept slots unchanged, new slots zero with zero moments; one compilation."""
    c = config("compact", "set", **{"sparsity.drop_fraction": 0.5,
                                    "sparsity.drop_fraction_schedule": "constant"})
    p = plan_lib.from_config(c, num_devices=1)
    model, tx, method = train_lib.build(p)
    state = train_lib.init_state(p, model, tx, method, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape),
                          state.params)            # distinct block magnitudes
    opt = jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32 and x.ndim else x,
                       state.opt_state)            # non-zero moments everywhere
    update = jax.jit(compact_update.updater(p.model, method))
    masks = state.masks
    for step in (0, 2):   # the second update starts from the first one's (unsorted) slots
        new_p, new_m, new_o, _ = update(jnp.int32(step), params, masks, None, opt,
                                        jax.random.key(step))
        kidx0 = np.asarray(compact.get(masks, FC))
        kidx = np.asarray(compact.get(new_m, FC))
        blocks0 = np.asarray(compact.get(params, FC))
        blocks = np.asarray(compact.get(new_p, FC))
        moments = [(np.asarray(compact.get(getattr(o[1][0], name), FC)) for o in (opt, new_o))
                   for name in ("mu", "nu")]
        moments = [tuple(pair) for pair in moments]
        kb = 64 // B
        for layer in range(kidx.shape[0]):
            changed = kidx[layer] != kidx0[layer]
            for j in range(kidx.shape[1]):
                assert len(set(kidx[layer, j])) == kidx.shape[2]       # distinct, T each
                kept = set(kidx0[layer, j]) & set(kidx[layer, j])
                assert kept == set(kidx0[layer, j][~changed[j]])       # kept blocks stay put
            assert np.all(blocks[layer][changed] == 0)
            np.testing.assert_array_equal(blocks[layer][~changed], blocks0[layer][~changed])
            for before, after in moments:
                assert np.all(after[layer][changed] == 0)
                np.testing.assert_array_equal(after[layer][~changed], before[layer][~changed])
            # Dropped: at most round(0.5 * live) of the matrix's live blocks, all among the
            # weakest by mean |w| (the drop is per matrix, regrowth per column).
            score = np.abs(blocks0[layer]).mean(axis=(-2, -1))          # [Nb, T]
            n_drop = int(np.round(0.5 * score.size))
            assert 0 < changed.sum() <= n_drop
            assert score[changed].max() <= np.sort(score.ravel())[n_drop - 1]
            assert np.all((kidx[layer] >= 0) & (kidx[layer] < kb))
        params, masks, opt = new_p, new_m, new_o
    assert update._cache_size() == 1
    proj = np.asarray(compact.get(masks, "blocks/mlp/proj/kernel"))     # T = 4
    assert not np.all(np.diff(proj, axis=-1) > 0)                         # slots unsorted
    # The updated compact model computes what the dense masked model of its view does.
    dp, dm = compact.densify(p.model, new_p, new_m)
    tokens = batches(c, 1)[0]["inputs"]
    dense_model = plan_lib.from_config(config("dense", "set"), num_devices=1).model
    from sparse_gpt.model import gpt
    ref = gpt.GPT(dataclasses.replace(dense_model, matmul="masked")).apply(
        {"params": dp, "masks": dm}, tokens)
    out = model.apply({"params": new_p, "masks": new_m}, tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_rewrite_slots_by_hand():
    # One layer, Kb = 4, Nb = 2, T = 2. Column 0: {0, 2} -> {2, 3}; column 1: {1, 3} kept.
    kidx = jnp.asarray([[[0, 2], [3, 1]]], jnp.int32)
    new = np.zeros((1, 4, 2), bool)
    new[0, [2, 3], 0] = True
    new[0, [1, 3], 1] = True
    out, changed = compact_update.rewrite_slots(kidx, jnp.asarray(new))
    np.testing.assert_array_equal(np.asarray(out), [[[3, 2], [3, 1]]])
    np.testing.assert_array_equal(np.asarray(changed), [[[True, False], [False, False]]])


def test_sharded_compact_training_matches_one_device():
    _, ref, ref_losses, _ = run(config(method="rigl"), n=3)
    c = config(method="rigl", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    _, state, losses, _ = run(c, jax.devices(), n=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(ref.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The blocks split like their kernel: fc's columns (Nb) over tensor, rows over fsdp.
    blocks = compact.get(state.params, FC)
    _, nb, t, b, _ = blocks.shape
    assert blocks.addressable_shards[0].data.shape == (2, nb // 2, t, b // 2, b)
    assert compact.get(state.masks, FC).sharding.spec[:2] == blocks.sharding.spec[:2]


def test_pipelined_compact_training_matches_one_device():
    _, ref, ref_losses, _ = run(config(), n=3)
    c = config(**{"mesh.data": 1, "mesh.stage": 2, "train.batch_size": 8})
    _, state, losses, _ = run(c, jax.devices()[:2], n=3)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)


def test_compact_run_resumes_after_a_kill_and_serves_eval_and_init_from(corpus, tmp_path):
    overrides = {"sparsity.method": "set", "sparsity.density": 0.5, "sparsity.structure":
                 "block", "sparsity.block_size": 16, "sparsity.update_every": 2,
                 "model.matmul": "block_sparse", "model.sparse_storage": "compact"}
    c = corpus_config(corpus, **overrides)
    run_dir, ref_dir = str(tmp_path / "run"), str(tmp_path / "ref")
    trainer.train(c, run_dir, stop_after=5)            # dies after the step-4 checkpoint
    resumed = trainer.train(c, run_dir)
    reference = trainer.train(c, ref_dir)
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(reference["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The checkpoint holds live blocks only, and restores for evaluation as trained.
    _, _, model, _, state = trainer.load_run(run_dir)
    assert compact.get(state.params, FC).ndim == 5
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another run starts from the compact run's weights: their dense view.
    from sparse_gpt.training import init_from
    dense, _ = compact.densify(model.cfg, state.params, state.masks)
    loaded = init_from.load_params(run_dir, plan_lib.from_config(corpus_config(corpus)).model)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_a_compact_run_warm_starts_from_a_compact_run(corpus, tmp_path):
    overrides = {"sparsity.method": "static", "sparsity.density": 0.5, "sparsity.structure":
                 "block", "sparsity.block_size": 16, "model.matmul": "block_sparse",
                 "model.sparse_storage": "compact"}
    source = str(tmp_path / "source")
    trainer.train(corpus_config(corpus, **overrides, **{"train.num_steps": 2}), source)
    warm = corpus_config(corpus, **overrides, **{"train.init_from": source,
                                                 "train.num_steps": 2})
    out = trainer.train(warm, str(tmp_path / "warm"))
    assert np.isfinite(out["loss"]) and compact.get(out["state"].params, FC).ndim == 5


def test_dense_switch_continues_as_the_dense_layout():
    """static 75% with a dense phase from step 3: the compact run, densified by the trainer's
    switch, trains on as the dense layout's run does."""
    over = {"sparsity.dense_finetune_start": 3}
    _, dense, dense_losses, _ = run(config("dense", **over))
    c = config("compact", **over)
    p, state, losses, _ = run(c, n=3)
    phase = plan_lib.for_step(p, 3)            # what trainer.train switches to at step 3
    model, tx, method = train_lib.build(phase)
    steps = trainer.make_steps(phase, model, tx, method, sharding.make_mesh(
        c.mesh, jax.devices()[:1]), compiler_options=FAST)
    shardings = jax.tree.map(lambda a: a.sharding, jax.eval_shape(steps.init,
                                                                  jax.random.key(0)))
    state = jax.device_put(train_lib.dense_phase_state(p.model, state), shardings)
    for batch in batches(c, 6)[3:]:
        state, metrics = steps.train_step(state, batch)
        losses = np.append(losses, float(metrics["loss"]))
        assert float(metrics["density"]) == 1.0
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-6)
    assert model.cfg.sparse_storage == "dense"
    assert_close_leaves(state, dense)


@pytest.mark.slow
@pytest.mark.parametrize("switch", [5, 4], ids=["after-checkpoint", "at-checkpoint"])
def test_dense_phase_densifies_once_and_resumes_on_either_side(corpus, tmp_path, switch):
    """static 75% with a dense phase from step ``switch``: the compact run, killed at step 6
    and resumed from its step-4 checkpoint (compact before the switch, dense at it), ends as
    the dense layout's uninterrupted run."""
    overrides = {"sparsity.method": "static", "sparsity.density": 0.25, "sparsity.structure":
                 "block", "sparsity.block_size": 16, "sparsity.dense_finetune_start": switch,
                 "model.matmul": "block_sparse"}
    comp = corpus_config(corpus, **overrides, **{"model.sparse_storage": "compact"})
    dense = corpus_config(corpus, **overrides)
    run_dir = str(tmp_path / "run")
    trainer.train(comp, run_dir, stop_after=6)
    resumed = trainer.train(comp, run_dir)
    reference = trainer.train(dense, str(tmp_path / "ref"))
    assert resumed["start_step"] == 4
    # Equal up to float rounding (the two dense phases are differently compiled programs).
    assert_close_leaves(resumed["state"], reference["state"])
    assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert resumed["density"] == 1.0
    # Checkpoints on both sides of the switch restore for evaluation.
    _, _, model, _, state = trainer.load_run(run_dir, step=4)
    assert compact.is_compact(compact.get(state.masks, FC)) == (switch > 4)
    _, _, model, _, state = trainer.load_run(run_dir)
    assert compact.get(state.params, FC).shape == (2, 32, 128)


@pytest.mark.parametrize("overrides, message", [
    ({"model.matmul": "masked"}, "matmul=block_sparse"),
    ({"sparsity.block_balance": "none"}, "column-balanced"),
    ({"sparsity.method": "gmp"}, "dense at the start"),
    ({"sparsity.method": "rigl", "sparsity.grow_grad_steps": 2}, "grow_grad_steps=1"),
    ({"model.sparse_storage": "sparse"}, "use 'dense' or 'compact'"),
])
def test_compact_storage_refuses_what_it_cannot_hold(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_lib.from_config(config(**overrides), num_devices=1)
