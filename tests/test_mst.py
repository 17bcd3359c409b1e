"""MST: phase densities and exact counts by hand, mixed growing's split, restoration, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.sparsity import masks as M
from sparse_gpt.sparsity import methods
from sparse_gpt.sparsity import prune as P
from sparse_gpt.sparsity import regrow as R

N, D, FF = 2, 16, 64
FC, OUT = "blocks/mlp/fc/kernel", "blocks/attn/out/kernel"   # 16x64 = 1024, 16x16 = 256


def _config(**sparsity):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=N, d_model=D, n_heads=2)
    c.train.num_steps = 40
    c.sparsity.update(method="mst", density=0.1, update_every=5, update_start=0,
                      update_end=30, mst_warmup_end=10, mst_ultra_end=20,
                      mst_final_density=0.5, sparse_layers="attn/out,mlp/fc")
    c.sparsity.update(**sparsity)
    return c


def _params(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"blocks": {"attn": {"out": {"kernel": r(N, D, D)}},
                       "mlp": {"fc": {"kernel": r(N, D, FF)}}}}


def _masks(p):
    return M.dense_masks(p, ("attn/out", "mlp/fc"))


def _run(method, steps):
    """AdamW(wd) loop as train_lib runs it (dense grads to the method); checks invariants."""
    p, target = _params(0), _params(7)
    masks = method.init_masks(p, _masks(p), jax.random.key(0))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt = tx.init(p)
    loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in  # noqa: E731
                         zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def step(i, p, masks, opt):
        dense = jax.grad(loss)(p)
        upd, opt = tx.update(M.apply_masks(dense, masks), opt, p)
        p = M.apply_masks(optax.apply_updates(p, upd), masks)
        return (*method.update(i, p, masks, dense, opt, jax.random.key(3))[:3], masks)

    history = [masks]
    for i in range(steps):
        p, masks, opt, old = step(jnp.int32(i), p, masks, opt)
        history.append(masks)
        for path, m in M.flatten(masks).items():
            m, w = np.asarray(m), np.asarray(M.flatten(p)[path])
            grown = m & ~np.asarray(M.flatten(old)[path])
            assert not np.any(w[~m]) and not np.any(w[grown]), (i, path)  # zero, regrown at 0
            assert not np.any(np.asarray(M.flatten(opt[0].mu)[path])[grown])  # fresh moments
    assert step._cache_size() == 1, "phase changes must not recompile"
    return history


def _nnz(masks, path):
    return np.asarray(M.nnz(M.flatten(masks)[path])).tolist()


def test_phase_boundaries_give_hand_computed_counts():
    """update_every=5, warm-up [0, 10), ultra [10, 20), restoration [20, 30], density 0.1->0.5.

    Counts are round-half-even(density * size): fc has 1024 weights, out 256.
    """
    m = plan_lib.from_config(_config()).method
    hist = _run(m, 33)   # hist[s + 1] = masks after the update at step s
    expect = {
        -1: (1024, 256),            # dense start
        0: (1024, 256),             # warm-up begins: density 1
        5: (218, 54),               # 1 - 0.9 (1 - 0.5^3) = 0.2125: 217.6, 54.4
        10: (102, 26),              # ultra-sparse: 0.1 -> 102.4, 25.6
        15: (102, 26),              # evolves at constant count
        20: (102, 26),              # restoration starts at the ultra density
        25: (307, 77),              # linear: 0.3 -> 307.2, 76.8
        30: (512, 128),             # update_end: the final density 0.5
        32: (512, 128),             # frozen afterwards
    }
    for step, (fc, out) in expect.items():
        assert _nnz(hist[step + 1], FC) == [fc] * N, step
        assert _nnz(hist[step + 1], OUT) == [out] * N, step
    for s in range(33):   # only update steps touch the topology
        if not bool(m.is_update_step(s)):
            jax.tree.map(np.testing.assert_array_equal, hist[s], hist[s + 1])
    # Ultra phase evolves: step 15 drops round(0.15 (1 + cos(pi/4)) * 102) = 26 per matrix
    # (some may be regrown at once, at zero) and grows as many.
    old, new = (np.asarray(M.flatten(hist[i])[FC]) for i in (15, 16))
    moved = (old & ~new).sum(axis=(1, 2))
    assert (0 < moved).all() and (moved <= 26).all()
    # Restoration grows more than it prunes: step 25 drops round(0.0439 * 102) = 4 and grows
    # 4 + 205 (307 - 102).
    old, new = (np.asarray(M.flatten(hist[i])[FC]) for i in (25, 26))
    grown, dropped = (new & ~old).sum(axis=(1, 2)), (old & ~new).sum(axis=(1, 2))
    assert (grown - dropped).tolist() == [205, 205] and (dropped <= 4).all()


def test_column_balanced_blocks_keep_structure_and_counts():
    """2x2 blocks, column-balanced (the block-sparse kernels' layout): fc has Kb = 8 blocks
    per output block column, so the per-column counts are round(8 d): 8, 2 (d = 0.2125),
    1 (0.1), 2 (0.3), 4 (0.5)."""
    m = plan_lib.from_config(_config(structure="block", block_size=2, sparse_layers="mlp/fc")).method
    hist = _run(m, 31)
    for step, per_col in {-1: 8, 5: 2, 10: 1, 15: 1, 25: 2, 30: 4}.items():
        mask = np.asarray(M.flatten(hist[step + 1])[FC])                # [2, 16, 64]
        assert bool(M.is_block_structured(jnp.asarray(mask), (2, 2))), step
        blocks = mask.reshape(N, 8, 2, 32, 2).all(axis=(2, 4))           # [2, Kb=8, Nb=32]
        assert (blocks.sum(axis=1) == per_col).all(), step


def test_scheduled_density_curve():
    m = plan_lib.from_config(_config(distribution="erk")).method
    masks = _masks(_params())
    phases = m.phase_densities(masks)
    u, f = phases[FC]
    assert u < 0.1 < phases[OUT][0] and u < f < 0.5 < phases[OUT][1]   # ERK shape
    curve = np.asarray(jax.vmap(m.density_schedule(u, f))(jnp.arange(35)))
    np.testing.assert_allclose(curve[[0, 10, 15, 20, 30, 34]], [1, u, u, u, f, f], rtol=1e-6)
    np.testing.assert_allclose(curve[5], 1 - (1 - u) * (1 - 0.5 ** 3), rtol=1e-6)
    np.testing.assert_allclose(curve[25], (u + f) / 2, rtol=1e-6)
    frac = jax.vmap(m.drop_fraction)(jnp.arange(35))
    assert not np.asarray(frac[:10]).any() and float(frac[10]) == pytest.approx(0.3)
    assert float(frac[30]) == pytest.approx(0.0, abs=1e-7)


def test_mixed_regrow_split_with_constructed_scores():
    # One matrix of 4x8 = 32 units, 8 live; grow 8: 6 by gradient, 2 at random.
    live = np.zeros((1, 4, 8), bool)
    live[0, 0] = True
    grad = np.zeros((1, 4, 8), np.float32)
    grad[0, 1] = np.arange(8, 0, -1)           # row 1: 8, 7, ..., 1 -> grows (1, 0..5)
    grad[0, 0] = 99.0                          # live units are never "grown"
    rand = np.zeros((1, 4, 8), np.float32)
    rand[0, 1, 0] = 5.0                        # already grown by gradient: skipped
    rand[0, 3, 7], rand[0, 2, 2], rand[0, 3, 0] = 4.0, 3.0, 2.0
    new = R.mixed_regrow({"k": jnp.asarray(live)}, {"k": jnp.asarray(grad)},
                         {"k": jnp.asarray(rand)}, 8, 0.25)["k"]
    expect = live.copy()
    expect[0, 1, :6] = True                    # the 6 largest gradients
    expect[0, 3, 7] = expect[0, 2, 2] = True   # the 2 best random scores still dead
    np.testing.assert_array_equal(np.asarray(new), expect)
    # random_fraction 0 and 1 are pure RigL and pure SET growth.
    only_grad = R.mixed_regrow({"k": jnp.asarray(live)}, {"k": jnp.asarray(grad)},
                               {"k": jnp.asarray(rand)}, 3, 0.0)["k"]
    assert np.asarray(only_grad)[0, 1, :3].all() and int(np.asarray(only_grad).sum()) == 11
    only_rand = R.mixed_regrow({"k": jnp.asarray(live)}, {"k": jnp.asarray(grad)},
                               {"k": jnp.asarray(rand)}, 2, 1.0)["k"]
    assert bool(np.asarray(only_rand)[0, 1, 0]) and bool(np.asarray(only_rand)[0, 3, 7])


def test_mst_update_grows_three_quarters_by_gradient():
    """Ultra phase, constant prune fraction 0.5 on out (26 live): 13 dropped, 13 grown =
    round(0.25 * 13) = 3 at random + 10 by gradient."""
    m = plan_lib.from_config(_config(drop_fraction=0.5, drop_fraction_schedule="constant",
                              sparse_layers="attn/out")).method
    p = _params()
    masks = m.sparse_masks(_masks(p))
    masks = P.prune(masks, P.magnitude(p, masks), {OUT: 0.1})   # the ultra-sparse topology
    p = M.apply_masks(p, masks)
    live = np.asarray(M.flatten(masks)[OUT])                     # [2, 16, 16], 26 live
    # Dense gradient: distinct large values on 40 dead units per matrix, the rest tiny.
    rank = np.cumsum(~live.reshape(N, -1), axis=1).reshape(live.shape)
    favourite = ~live & (rank <= 40)
    grads = np.where(favourite, 1000.0 - rank, 1e-3 * np.random.default_rng(0).random(live.shape))
    top10 = favourite & (rank <= 10)
    grads = {"blocks": {"attn": {"out": {"kernel": jnp.asarray(grads, jnp.float32)}}}}
    opt = optax.adam(1e-3).init(p)
    _, new, _, _ = jax.jit(m.update)(15, p, masks, grads, opt, jax.random.key(0))
    new = np.asarray(M.flatten(new)[OUT])
    # The 13 smallest |w| of each matrix are dropped (and may be regrown, at random).
    w = np.where(live, np.abs(np.asarray(p["blocks"]["attn"]["out"]["kernel"])), np.inf)
    order = np.argsort(w.reshape(N, -1), axis=1, kind="stable")[:, :13]
    survivors = live.reshape(N, -1).copy()
    np.put_along_axis(survivors, order, False, axis=1)
    grown = new & ~survivors.reshape(live.shape)
    assert M.nnz(jnp.asarray(new)).tolist() == [26, 26]
    assert grown.sum(axis=(1, 2)).tolist() == [13, 13]
    assert (grown & top10).sum(axis=(1, 2)).tolist() == [10, 10]   # all 10 by gradient
    assert (grown & ~top10).sum(axis=(1, 2)).tolist() == [3, 3]    # plus 3 at random


@pytest.mark.parametrize("overrides,message", [
    (dict(mst_warmup_end=0), "update_start < mst_warmup_end"),
    (dict(mst_warmup_end=25), "mst_warmup_end <= mst_ultra_end"),
    (dict(mst_ultra_end=30), "mst_ultra_end < update_end"),
    (dict(mst_final_density=1.5), r"outside \(0, 1\]"),
    (dict(mst_random_grow_fraction=1.5), r"in \[0, 1\]"),
    (dict(structure="nm", density=0.5, mst_final_density=0.5), "N:M"),
])
def test_build_rejects_bad_mst_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_lib.from_config(_config(**overrides)).method


def test_defaults_registration_and_budget():
    c = _config(mst_warmup_end=-1, mst_ultra_end=-1, update_end=-1)
    m = plan_lib.from_config(c).method
    s = m.settings
    assert type(m) is methods.MST and methods.METHODS["mst"] is methods.MST
    assert m.needs_dense_grads and hash(m) == hash(m)
    assert (s.update_end, m.mst_warmup_end, m.mst_ultra_end) == (30, 8, 22)  # 75% of 40
    assert (m.mst_final_density, m.mst_random_grow_fraction) == (0.5, 0.25)
    assert plan_lib.from_config(c).model.block_density == 1.0   # starts dense: the block budget is full
    p = _params()
    jax.tree.map(np.testing.assert_array_equal, m.init_masks(p, _masks(p), None), _masks(p))
    # A final density below the ultra density means no restoration (never prunes there).
    flat = plan_lib.from_config(_config(mst_final_density=0.05)).method.phase_densities(_masks(p))
    assert flat[FC] == (0.1, 0.1)


@pytest.mark.slow
def test_train_py_run_density_goes_down_then_up(tmp_path):
    """train.py with MST and hybrid attention on a small corpus slice: metrics.jsonl shows
    the phases (dense, warm-up, ultra-sparse, restoration) and the attention window."""
    import gzip
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with gzip.open(os.path.join(root, "sparse_gpt", "corpus", "shakespeare.jsonl.gz")) as f:
        (tmp_path / "doc.txt").write_text(json.loads(f.readline())["text"][:20_000])
    flags = {"data.path": tmp_path / "doc.txt", "data.data_dir": tmp_path / "tfds",
             "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2, "data.seq_len": 64,
             "train.batch_size": 4, "train.num_steps": 60, "train.log_every": 5,
             "train.eval_every": 60, "train.checkpoint_every": 60, "train.sample_tokens": 8,
             "train.progress_bar": False, "sparsity.method": "mst", "sparsity.density": 0.1,
             "sparsity.distribution": "erk", "sparsity.update_every": 10,
             "sparsity.update_end": 50, "sparsity.mst_warmup_end": 20,
             "sparsity.mst_ultra_end": 30, "sparsity.mst_final_density": 0.5,
             "attention.sparse_start": 10, "attention.sparse_end": 30,
             "attention.window": 16, "attention.stride": 32, "attention.block_size": 16}
    cmd = [sys.executable, os.path.join(root, "train.py"), "--workdir", str(tmp_path / "run"),
           "--config", os.path.join(root, "sparse_gpt", "config.py") + ":tiny"]
    cmd += [f"--config.{k}={v}" for k, v in flags.items()]
    subprocess.run(cmd, check=True, cwd=root, capture_output=True)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    density = {r["step"]: r["density"] for r in rows}
    # Logged at step s: the masks step s - 1 ran with (updates at 0, 10, ..., 50).
    assert density[5] == density[10] == 1.0
    assert density[15] == pytest.approx(0.2125, abs=2e-3)       # warm-up, cubic at 1/2
    assert density[25] == density[30] == pytest.approx(0.1, abs=2e-3)
    assert density[45] == pytest.approx(0.3, abs=2e-3)           # restoration, linear
    assert density[60] == pytest.approx(0.5, abs=2e-3)
    assert [r["sparse_attention"] for r in rows][:7] == [0, 0, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("k", [1, 3])
def test_dense_gradient_only_before_the_updates_that_grow(k):
    # Updates at 0, 5, ..., 30 (update_every=5, update_end=30); warm-up ends at 10, so the
    # updates at 0 and 5 only prune and need no dense gradient. With grow_grad_steps=k the
    # k steps ending at each growing update compute it.
    m = plan_lib.from_config(_config(grow_grad_steps=k)).method
    dense = [s for s in range(40) if bool(m.dense_grad_step(jnp.asarray(s)))]
    assert dense == [u - j for u in (10, 15, 20, 25, 30) for j in reversed(range(k))]


def test_mst_evolves_q_k_v_of_the_fused_qkv_kernel_as_three_matrices():
    # MST is SET with other hooks, so like SET/RigL it splits the fused qkv kernel: with
    # gradient growth only (random fraction 0), v's huge gradient must not pull q's and k's
    # dropped weights into v; every third keeps its scheduled count in the ultra phase.
    m = plan_lib.from_config(_config(density=0.25, sparse_layers="attn/qkv",
                                     mst_random_grow_fraction=0.0)).method
    rng = np.random.default_rng(0)
    per_part = int(round(0.25 * D * D))                     # scheduled count of each third
    live = np.zeros((N, D, 3 * D), bool)
    for i in range(N):
        for part in range(3):
            idx = rng.choice(D * D, per_part, replace=False)
            block = np.zeros(D * D, bool)
            block[idx] = True
            live[i, :, part * D:(part + 1) * D] = block.reshape(D, D)
    w = rng.standard_normal((N, D, 3 * D)).astype(np.float32)
    p = {"blocks": {"attn": {"qkv": {"kernel": jnp.asarray(np.where(live, w, 0))}}}}
    masks = {"blocks": {"attn": {"qkv": {"kernel": jnp.asarray(live)}}}}
    grads = {"blocks": {"attn": {"qkv": {"kernel": jnp.asarray(
        np.where(np.arange(3 * D) >= 2 * D, 1e2, 1e-4) * np.ones((N, D, 1)), jnp.float32)}}}}
    opt = optax.adam(1e-3).init(p)
    assert bool(m.is_update_step(15)) and bool(m.grows_by_gradient(15))
    _, new, _, _ = jax.jit(m.update)(15, p, masks, grads, opt, jax.random.key(0))
    new = np.asarray(new["blocks"]["attn"]["qkv"]["kernel"])
    thirds = lambda x: x.reshape(N, D, 3, D).sum(axis=(1, 3))  # noqa: E731
    np.testing.assert_array_equal(thirds(new), np.full((N, 3), per_part))
    assert (new & ~live)[..., :2 * D].any()                  # q and k regrew their own
