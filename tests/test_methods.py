"""Methods end to end on hand-built param trees: build errors, exact counts, AdamW invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.sparsity import masks as M
from sparse_gpt.sparsity import methods
from sparse_gpt.sparsity import regrow as R

N, D, FF = 2, 16, 64
SPARSE = ("blocks/attn/out/kernel", "blocks/attn/qkv/kernel",
          "blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel")


def _config(**sparsity):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=N, d_model=D, n_heads=2)
    c.train.num_steps = 40
    c.sparsity.update(block_size=8, update_every=5)
    c.sparsity.update(**sparsity)
    return c


def _params(seed=0):
    # numpy draws: each jax.random shape would be one more XLA compile on a busy 2-core box.
    rng = np.random.default_rng(seed)
    r = lambda i, *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"wte": {"embedding": r(0, 32, D)},
            "blocks": {"attn": {"qkv": {"kernel": r(1, N, D, 3 * D), "bias": jnp.zeros((N, 3 * D))},
                                "out": {"kernel": r(2, N, D, D), "bias": jnp.zeros((N, D))}},
                       "mlp": {"fc": {"kernel": r(3, N, D, FF), "bias": jnp.zeros((N, FF))},
                               "proj": {"kernel": r(4, N, FF, D), "bias": jnp.zeros((N, D))}}}}


def _counts(masks, paths=SPARSE):
    flat = M.flatten(masks)
    return {p: np.asarray(flat[p]).sum(axis=(-2, -1)) for p in paths}


@pytest.mark.parametrize("overrides,message", [
    (dict(method="magic"), "Unknown sparsity.method"),
    (dict(method="static", density=0.0), r"outside \(0, 1\]"),
    (dict(method="static", density=1.5), r"outside \(0, 1\]"),
    (dict(method="static", density=0.5, distribution="lognormal"), "Unknown sparsity.distr"),
    (dict(method="static", density=0.5, structure="block", block_size=12), "does not divide"),
    (dict(method="static", density=0.5, structure="nm", nm_n=5, nm_m=4), "N <= M"),
    (dict(method="static", density=0.25, structure="nm"), "nm_n/nm_m"),
    (dict(method="dense", density=0.5), "method=dense"),
    (dict(method="set", density=0.5, sparse_layers="attn/qkvv"), "matches no"),
    (dict(method="static", density=0.5, explicit_densities="mlp/*=0.1"), "distribution=expl"),
    (dict(method="gmp", density=0.5, update_start=30, update_end=20), "update_end"),
    (dict(method="static", density=0.5, structure="block", block_balance="rows"),
     "Unknown sparsity.block_balance"),
    (dict(method="gmp", density=0.5, grow_balance="neuron"), "grow_balance=neuron"),
    (dict(method="set", density=0.5, grow_grad_steps=4), "grow_grad_steps=4.*rigl"),
    (dict(method="rigl", density=0.5, grow_grad_steps=6), r"<= update_every \(5\)"),
    (dict(method="rigl", density=0.5, structure="block", grow_balance="neuron"),
     "grow_balance=neuron"),
    (dict(method="rigl", density=0.5, grow_balance="layer"), "Unknown sparsity.grow_bal"),
    (dict(method="gmp", density=0.5, structure="block", prune_scope="global"),
     "block_balance=none"),
])
def test_build_rejects_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_lib.from_config(_config(**overrides)).method


def test_block_sparse_matmul_needs_column_balanced_blocks():
    c = _config(method="static", density=0.5)
    c.model.matmul = "block_sparse"
    with pytest.raises(ValueError, match="column-balanced"):
        plan_lib.from_config(c).method
    c.sparsity.update(structure="block", block_balance="none")
    with pytest.raises(ValueError, match="column-balanced"):
        plan_lib.from_config(c).method
    c.sparsity.block_balance = "column"
    assert plan_lib.from_config(c).method.settings.structure.balance == "column"


def test_build_returns_each_method():
    for name, cls in methods.METHODS.items():
        m = plan_lib.from_config(_config(method=name, density=1.0 if name == "dense" else 0.5)).method
        assert type(m) is cls and hash(m) == hash(m)
    assert methods.RigL.needs_dense_grads and not methods.SET.needs_dense_grads
    assert plan_lib.from_config(_config(method="rigl", density=0.5)).method.settings.update_end == 30


def test_static_uniform_erk_counts_and_seed():
    p = _params()
    for dist in ("uniform", "erk"):
        m = plan_lib.from_config(_config(method="static", density=0.25, distribution=dist)).method
        init = jax.jit(m.init_masks)
        masks = init(p, M.dense_masks(p), jax.random.key(1))
        dens = m.target_densities(masks)
        flat = M.flatten(masks)
        for path, c in _counts(masks).items():
            k, n = flat[path].shape[-2:]
            np.testing.assert_array_equal(c, [M.n_keep(dens[path], k * n)] * N)
        again = init(p, M.dense_masks(p), jax.random.key(1))
        jax.tree.map(np.testing.assert_array_equal, masks, again)
        other = init(p, M.dense_masks(p), jax.random.key(2))
        assert not np.array_equal(flat[SPARSE[0]], M.flatten(other)[SPARSE[0]])
    assert dens["blocks/attn/out/kernel"] > 0.25 > dens["blocks/mlp/fc/kernel"]  # ERK shape


def test_static_respects_sparse_layers_and_structures():
    p = _params()
    m = plan_lib.from_config(_config(method="static", density=0.25, sparse_layers="mlp/*")).method
    masks = jax.jit(m.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    assert bool(masks["blocks"]["attn"]["qkv"]["kernel"].all())  # not sparse: untouched
    assert int(M.nnz(masks["blocks"]["mlp"]["fc"]["kernel"])[0]) == 256
    block = plan_lib.from_config(_config(method="static", density=0.25, structure="block",
                                  sparse_layers="attn/qkv,mlp/proj")).method
    bm = jax.jit(block.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    for path in ("blocks/attn/qkv/kernel", "blocks/mlp/proj/kernel"):
        assert bool(M.is_block_structured(M.flatten(bm)[path], (8, 8))), path
        assert 0 < int(M.flatten(bm)[path].sum()) < M.flatten(bm)[path].size
    nm = plan_lib.from_config(_config(method="static", density=0.5, structure="nm",
                               sparse_layers="attn/out,mlp/fc")).method
    nm_masks = jax.jit(nm.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    for path in ("blocks/attn/out/kernel", "blocks/mlp/fc/kernel"):
        assert bool(jnp.all(M.nm_group_counts(M.flatten(nm_masks)[path], 4) == 2))
    assert bool(nm_masks["blocks"]["mlp"]["proj"]["kernel"].all())


def _loss(params, target):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(target)))


def _run(method, steps, seed=0, wd=0.1):
    """AdamW(wd) loop as train_lib runs it; checks masked weights are zero after every step."""
    p = _params(seed)
    target = _params(seed + 7)
    masks = jax.jit(method.init_masks)(p, M.dense_masks(p), jax.random.key(seed))
    p = M.apply_masks(p, masks)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=wd))
    opt = tx.init(p)
    traces = []

    @jax.jit
    def step(i, p, masks, opt):
        traces.append(1)  # counts compilations
        dense = jax.grad(_loss)(p, target)
        grads = M.apply_masks(dense, masks)
        upd, opt = tx.update(grads, opt, p)
        p = M.apply_masks(optax.apply_updates(p, upd), masks)
        score = dense if method.needs_dense_grads else grads
        new_p, new_m, new_opt, _ = method.update(i, p, masks, score, opt, jax.random.key(9))
        return new_p, new_m, new_opt, masks

    history = [masks]
    updates = np.asarray(jax.jit(jax.vmap(method.is_update_step))(jnp.arange(steps)))
    for i in range(steps):
        p, masks, opt, old = step(jnp.int32(i), p, masks, opt)
        history.append(masks)
        flat_p, flat_o = M.flatten(p), M.flatten(old)
        mu, nu = M.flatten(opt[1][0].mu), M.flatten(opt[1][0].nu)
        for path, m in M.flatten(masks).items():
            m, w = np.asarray(m), np.asarray(flat_p[path])
            assert not np.any(w[~m]), (i, path)               # masked weights exactly zero
            if updates[i]:
                grown = m & ~np.asarray(flat_o[path])
                assert not np.any(w[grown])                   # regrown at zero
                assert not np.any(np.asarray(mu[path])[grown])  # with fresh moments
                assert not np.any(np.asarray(nu[path])[grown])
    assert len(traces) == 1, "topology changes must not recompile"
    return p, masks, opt, history, updates


@pytest.mark.parametrize("name,structure,layers", [
    ("set", "unstructured", "attn/out,mlp/fc"),   # fewer sparse leaves: faster compiles
    ("rigl", "block", "attn/qkv,attn/out,mlp/fc,mlp/proj"),
    ("set", "nm", "attn/qkv,mlp/proj"),
])
def test_dynamic_methods_keep_counts_exact(name, structure, layers):
    density = 0.5 if structure == "nm" else 0.25
    m = plan_lib.from_config(_config(method=name, density=density, structure=structure,
                              distribution="erk" if structure == "block" else "uniform",
                              sparse_layers=layers)).method
    _, masks, _, history, updates = _run(m, 16)
    first = _counts(history[0])
    for h in history[1:]:
        for path, c in _counts(h).items():
            np.testing.assert_array_equal(c, first[path])
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(history[0]), jax.tree.leaves(masks)))
    assert changed > 0, "the topology should have evolved"
    sparse = [M.flatten(masks)[p] for p in m.sparse_paths(masks)]
    assert len(sparse) == len(layers.split(","))
    if structure == "block":  # config default: column-balanced, as the kernels need
        assert m.settings.structure.balance == "column"
        for path, x in zip(m.sparse_paths(masks), sparse):
            assert bool(M.is_block_structured(x, (8, 8)))
            per_col = np.asarray(x).reshape(N, x.shape[1] // 8, 8, -1, 8).all(
                axis=(2, 4)).sum(axis=1)                      # [N, Nb] live blocks per column
            assert (per_col == per_col[0, 0]).all(), path
    if structure == "nm":
        for x in sparse:
            assert bool(jnp.all(M.nm_group_counts(x, 4) == 2))
    # Non-update steps leave the topology alone.
    assert updates.sum() == 4  # steps 0, 5, 10, 15
    for i in range(16):
        if not updates[i]:
            jax.tree.map(np.testing.assert_array_equal, history[i], history[i + 1])


def test_rigl_grows_where_the_dense_gradient_is_largest():
    m = plan_lib.from_config(_config(method="rigl", density=0.25, drop_fraction=0.5,
                              drop_fraction_schedule="constant", sparse_layers="attn/out")).method
    p = _params()
    masks = jax.jit(m.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    live = masks["blocks"]["attn"]["out"]["kernel"]             # [2, 16, 16], 64 live each
    p = M.apply_masks(p, masks)
    # Dense gradient: 1 everywhere, 100 on the first 32 dead entries of each matrix.
    dead_rank = jnp.cumsum(~live.reshape(N, -1), axis=1).reshape(live.shape)
    favourite = ~live & (dead_rank <= 32)
    grads = jax.tree.map(jnp.ones_like, p)
    grads["blocks"]["attn"]["out"]["kernel"] = jnp.where(favourite, 100.0, 1.0)
    opt = optax.adam(1e-3).init(p)
    new_p, new_masks, _, _ = jax.jit(m.update)(0, p, masks, grads, opt, jax.random.key(0))
    new = new_masks["blocks"]["attn"]["out"]["kernel"]
    np.testing.assert_array_equal(R.grown({"k": live}, {"k": new})["k"], favourite)
    np.testing.assert_array_equal(M.nnz(new), [64, 64])
    # The 32 dropped per matrix were the smallest |w| among the live ones.
    w = jnp.abs(p["blocks"]["attn"]["out"]["kernel"])
    kept = live & new
    for i in range(N):
        assert float(w[i][kept[i]].min()) >= float(w[i][live[i] & ~new[i]].max())
    assert not bool(jnp.any(new_p["blocks"]["attn"]["out"]["kernel"][favourite]))


def test_rigl_keeps_q_k_v_counts_of_the_fused_qkv_kernel():
    # The dense gradient of q and k is ~0 at init (uniform attention): pooled in one count,
    # growth would move q's and k's dropped weights into v.
    m = plan_lib.from_config(_config(method="rigl", density=0.25, drop_fraction=0.5,
                              drop_fraction_schedule="constant", sparse_layers="attn/qkv")).method
    p = _params()
    masks = jax.jit(m.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    p = M.apply_masks(p, masks)
    live = np.asarray(masks["blocks"]["attn"]["qkv"]["kernel"])     # [N, D, 3D]
    w = np.abs(np.asarray(p["blocks"]["attn"]["qkv"]["kernel"]))
    v_live = live & (np.arange(3 * D) >= 2 * D)
    # v's weakest live half is what the drop removes; the largest gradients sit there, so
    # those units come straight back and must be unchanged (RigL's reference keeps them).
    weak = np.stack([v_live[i] & (w[i] <= np.sort(w[i][v_live[i]])[
        int(np.round(0.5 * v_live[i].sum())) - 1]) for i in range(N)])
    grads = jax.tree.map(jnp.ones_like, p)
    grads["blocks"]["attn"]["qkv"]["kernel"] = jnp.asarray(np.where(
        weak, 1e3, np.where(np.arange(3 * D) >= 2 * D, 1e2, 1e-4)), jnp.float32)
    opt = optax.adam(1e-3).init(p)
    new_p, new_masks, _, _ = jax.jit(m.update)(0, p, masks, grads, opt, jax.random.key(0))
    new = np.asarray(new_masks["blocks"]["attn"]["qkv"]["kernel"])
    thirds = lambda x: x.reshape(N, D, 3, D).sum(axis=(1, 3))  # noqa: E731
    np.testing.assert_array_equal(thirds(new), thirds(live))         # per part, per layer
    assert (new & ~live)[..., :2 * D].any()                          # q and k did evolve
    np.testing.assert_array_equal(new[..., 2 * D:], live[..., 2 * D:])
    w_old, w_new = (np.asarray(t["blocks"]["attn"]["qkv"]["kernel"]) for t in (p, new_p))
    np.testing.assert_array_equal(w_new[weak], w_old[weak])
    assert not np.any(w_new[new & ~live])                           # grown at zero


def test_gmp_follows_the_cubic_schedule():
    m = plan_lib.from_config(_config(method="gmp", density=0.2, update_start=0, update_end=20,
                              update_every=5, prune_scope="layer")).method
    _, _, _, history, _ = _run(m, 24)
    jax.tree.map(lambda x: np.testing.assert_(bool(x.all())), history[0])  # starts dense
    for step in (5, 10, 15, 20):
        d = 1 - 0.8 * (1 - (1 - step / 20) ** 3)
        for path, c in _counts(history[step + 1]).items():
            units = 16 * 48 if "qkv" in path else 16 * 16 if "out" in path else 16 * 64
            np.testing.assert_array_equal(c, [M.n_keep(d, units)] * N)
    assert float(M.nnz(history[-1]["blocks"]["mlp"]["fc"]["kernel"])[0]) == 205  # 0.2 * 1024


def test_gmp_global_scope_total_exact():
    m = plan_lib.from_config(_config(method="gmp", density=0.3, update_end=10, prune_scope="global",
                              sparse_layers="mlp/*")).method
    _, masks, _, _, _ = _run(m, 12)
    counts = _counts(masks, ("blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel"))
    assert sum(int(np.sum(c)) for c in counts.values()) == M.n_keep(0.3, N * 2 * 16 * 64)
    assert bool(masks["blocks"]["attn"]["qkv"]["kernel"].all())


def _max_density(c):
    p = plan_lib.from_config(c)
    return p.method.max_density(plan_lib.sparse_shapes(p.method, p.model))


def test_max_layer_density():
    assert _max_density(_config(method="gmp", density=0.1)) == 1.0
    assert _max_density(_config(method="static", density=0.25)) == 0.25
    erk = _max_density(_config(method="rigl", density=0.25, distribution="erk"))
    assert erk > 0.25


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_neuron_grow_balance_keeps_every_hidden_unit_degree(method):
    # grow_balance=neuron: each MLP channel (fc column, proj row) and attention head dim
    # (qkv column, out row) gets back exactly the live weights it lost; RigL picks them by
    # the largest dense gradient among that unit's dead weights.
    m = plan_lib.from_config(_config(method=method, density=0.25, drop_fraction=0.5,
                              drop_fraction_schedule="constant", grow_balance="neuron")).method
    p = _params()
    masks = jax.jit(m.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    p = M.apply_masks(p, masks)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape), jnp.float32), p)
    opt = optax.adam(1e-3).init(p)
    _, new_masks, _, _ = jax.jit(m.update)(0, p, masks, grads, opt, jax.random.key(0))
    flat_old, flat_new = M.flatten(masks), M.flatten(new_masks)
    flat_w, flat_g = M.flatten(p), M.flatten(grads)
    for path in SPARSE:
        old, new = (np.asarray(t[path]) for t in (flat_old, flat_new))
        w, g = np.abs(np.asarray(flat_w[path])), np.asarray(flat_g[path])
        if path.endswith(("out/kernel", "proj/kernel")):    # hidden units are rows here
            old, new, w, g = (np.swapaxes(x, -1, -2) for x in (old, new, w, g))
        np.testing.assert_array_equal(new.sum(axis=-2), old.sum(axis=-2))   # per unit
        assert (new & ~old).any(), path                                     # it did evolve
        for i in range(N):
            # Numpy oracle of one update: per matrix drop half the live weights by |w|
            # (q, k and v separately), then per unit grow back what it lost, best first.
            parts = 3 if "qkv" in path else 1
            kept = np.zeros_like(old[i])
            for c in np.split(np.arange(old.shape[-1]), parts):
                live = old[i][:, c]
                n_keep = live.sum() - int(np.round(0.5 * live.sum()))
                cut = np.sort(w[i][:, c][live])[::-1][n_keep - 1]
                kept[:, c] = live & (w[i][:, c] >= cut)
            for j in range(old.shape[-1]):
                lost = old[i][:, j].sum() - kept[:, j].sum()
                grown = new[i][:, j] & ~kept[:, j]
                assert grown.sum() == lost
                if method == "rigl" and lost:
                    dead_g = g[i][:, j][~kept[:, j]]
                    assert g[i][:, j][grown].min() >= np.sort(dead_g)[::-1][lost - 1]
