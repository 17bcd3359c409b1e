"""Sparse training through the whole step: the block-sparse kernel path against the masked
oracle, exact zeros and counts across topology updates, and no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import cli, flops
from sparse_gpt import plan as plan_lib
from sparse_gpt.training import step as train_lib
from sparse_gpt.sparsity import masks as masks_lib


def make_config(method="rigl", matmul="masked", **sparsity):
    c, _ = cli.parse_args([])
    overrides = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2,
                 "model.max_len": 32, "data.seq_len": 32, "train.batch_size": 4,
                 "train.num_steps": 40, "train.warmup_steps": 2, "model.matmul": matmul,
                 "sparsity.method": method, "sparsity.density": 0.5,
                 "sparsity.structure": "block", "sparsity.block_size": 16,
                 "sparsity.update_every": 3, "sparsity.distribution": "erk"}
    overrides.update({f"sparsity.{k}": v for k, v in sparsity.items()})
    for key, value in overrides.items():
        cli.apply_override(c, key, str(value))
    return c


def batches(n, vocab=257, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, vocab, (4, 33)).astype(np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "weights": np.ones((4, 32), np.float32)}


def run(config, steps):
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    state = jax.jit(lambda r: train_lib.init_state(plan_lib.from_config(config), model, tx, method, r))(
        jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, method))
    history = []
    for batch in batches(steps):
        state, metrics = step(state, batch)
        history.append((float(metrics["loss"]), masks_lib.flatten(jax.device_get(state.masks))))
    return state, history, step


def test_block_sparse_kernel_path_matches_masked_oracle_in_the_model():
    dense_cfg, kernel_cfg = make_config(), make_config(matmul="block_sparse")
    model, _, method = train_lib.build(plan_lib.from_config(dense_cfg))
    kernel_model, _, _ = train_lib.build(plan_lib.from_config(kernel_cfg))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    masks = method.init_masks(variables["params"], variables["masks"], jax.random.key(1))
    assert 0.45 < float(flops.density(masks)) < 0.55
    batch = next(batches(1))
    grad = jax.jit(jax.value_and_grad(train_lib.loss_fn), static_argnums=3)
    loss_ref, g_ref = grad(variables["params"], masks, batch, model)
    loss, g = grad(variables["params"], masks, batch, kernel_model)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.slow
def test_rigl_on_block_kernels_trains_like_the_masked_model():
    steps = 8   # updates at steps 0, 3, 6
    ref_state, ref_hist, _ = run(make_config(), steps)
    state, hist, _ = run(make_config(matmul="block_sparse"), steps)
    np.testing.assert_allclose([h[0] for h in hist], [h[0] for h in ref_hist], rtol=1e-4)
    for path, m in hist[-1][1].items():
        np.testing.assert_array_equal(m, ref_hist[-1][1][path])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("method, structure", [("rigl", "unstructured"), ("set", "block")])
def test_topology_updates_keep_counts_zeros_and_one_compilation(method, structure):
    state, hist, step = run(make_config(method, structure=structure), 10)
    counts = [{p: np.sum(m, axis=(-2, -1)).tolist() for p, m in h[1].items()} for h in hist]
    assert all(c == counts[0] for c in counts)                 # per-matrix nnz never moves
    assert any(not np.array_equal(hist[0][1][p], hist[-1][1][p]) for p in hist[0][1])
    flat_params = masks_lib.flatten(jax.device_get(state.params))
    for path, m in hist[-1][1].items():
        assert np.all(flat_params[path][~m] == 0.0)            # masked weights exactly zero
    assert step._cache_size() == 1                             # topology changes: no recompile


def test_rigl_grows_by_the_dense_gradient_summed_over_grow_grad_steps():
    # update_every=4, grow_grad_steps=3: updates at steps 0, 4, 8; the update at step 4
    # grows by |g_2 + g_3 + g_4|, each g the dense gradient of that step's batch at that
    # step's (masked) weights, computed here independently.
    config = make_config(structure="unstructured", update_every=4, grow_grad_steps=3,
                         sparse_layers="mlp/fc", drop_fraction=0.5,
                         drop_fraction_schedule="constant")
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    state = jax.jit(lambda r: train_lib.init_state(plan_lib.from_config(config), model, tx, method, r))(
        jax.random.key(0))
    step = jax.jit(train_lib.make_train_step(model, tx, method))
    dense_grad = jax.jit(jax.grad(lambda p, b: train_lib.loss_fn(p, None, b, model)))
    path = "blocks/mlp/fc/kernel"
    summed, dense_flops = 0.0, []
    for i, batch in enumerate(batches(5)):
        g = masks_lib.flatten(dense_grad(masks_lib.apply_masks(state.params, state.masks),
                                         batch))[path]
        old = np.asarray(masks_lib.flatten(state.masks)[path])
        summed = summed + g if i >= 2 else 0.0
        before = state.flops
        state, metrics = step(state, batch)
        acc = np.asarray(masks_lib.flatten(state.sparsity_state)[path])
        if i in (2, 3):      # inside the window: the running sum is carried
            np.testing.assert_allclose(acc, summed, rtol=1e-4, atol=1e-7)
        else:                # after an update, or outside a window: empty
            np.testing.assert_array_equal(acc, 0.0)
        dense_flops.append(float(state.flops - before))
    # Steps 0, 2, 3 and 4 paid the dense weight gradient; step 1 did not.
    assert dense_flops[1] < min(dense_flops[0], dense_flops[2], dense_flops[3], dense_flops[4])
    new = np.asarray(masks_lib.flatten(state.masks)[path])
    score = np.abs(np.asarray(summed))
    grown = new & ~old
    assert grown.sum() > 0
    for layer in range(grown.shape[0]):   # every grown entry beats every entry left dead
        assert score[layer][grown[layer]].min() >= score[layer][~new[layer]].max()
