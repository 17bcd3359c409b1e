"""Column-balanced block masks under SET, RigL, GMP and MST, checked by hand in numpy.

The block-sparse kernels hold a fixed number of live blocks per output block column, so
after every update each column of every sparse matrix must hold exactly the schedule's
count, ``clip(round_half_even(d(step) * Kb), 1, Kb)``, the mask must be whole blocks, and
regrown blocks must start at zero with zero Adam moments. Also: the linear-time selection
that every update ranks with agrees with the sort it replaced, on the platform's own float
comparisons (XLA's CPU flushes denormals to zero).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.sparsity import masks as M
from sparse_gpt.sparsity import prune as P

N, D, FF, BS = 2, 32, 64, 4           # 4x4 blocks: Kb = 8 (D inputs) or 16 (FF inputs)
DENSITY = 0.3                          # 2.4 -> 2 blocks of 8, 4.8 -> 5 of 16 per column
SPARSE = ("blocks/attn/qkv/kernel", "blocks/attn/out/kernel", "blocks/mlp/fc/kernel",
          "blocks/mlp/proj/kernel")


def _config(method, **sparsity):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=N, d_model=D, n_heads=2)
    c.train.num_steps = 40
    c.sparsity.update(method=method, density=DENSITY, distribution="uniform",
                      structure="block", block_balance="column", block_size=BS,
                      update_every=5, update_start=0, update_end=20)
    c.sparsity.update(**sparsity)
    return c


def _params(seed):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {"blocks": {"attn": {"qkv": {"kernel": r(N, D, 3 * D)}, "out": {"kernel": r(N, D, D)}},
                       "mlp": {"fc": {"kernel": r(N, D, FF)}, "proj": {"kernel": r(N, FF, D)}}}}


def _cubic(t, start, end, d_from, d_to, power):
    """Hand copy of the GMP curve: density from ``d_from`` to ``d_to`` over [start, end]."""
    frac = min(max((t - start) / (end - start), 0.0), 1.0)
    return d_to + (d_from - d_to) * (1.0 - frac) ** power


SCHEDULES = {   # method -> (extra config, steps run, density at an update step)
    "set": ({}, 21, lambda t: DENSITY),
    "rigl": ({}, 21, lambda t: DENSITY),
    "gmp": ({}, 21, lambda t: _cubic(t, 0, 20, 1.0, DENSITY, 3.0)),
    # warm-up [0, 10) cubic to 0.3, ultra [10, 20), restoration [20, 30] linear to 0.5.
    "mst": (dict(update_end=30, mst_warmup_end=10, mst_ultra_end=20, mst_final_density=0.5),
            31, lambda t: (_cubic(t, 0, 10, 1.0, DENSITY, 3.0) if t < 10 else DENSITY
                           if t < 20 else _cubic(t, 20, 30, DENSITY, 0.5, 1.0))),
}


def _blocks(mask_LxKxN):
    """[L, K, N] element mask -> ([L, Kb, Nb] all-live blocks, whether every block is whole)."""
    m = np.asarray(mask_LxKxN)
    b = m.reshape(m.shape[0], m.shape[1] // BS, BS, m.shape[2] // BS, BS)
    whole = (b.all(axis=(2, 4)) == b.any(axis=(2, 4))).all()
    return b.all(axis=(2, 4)), bool(whole)


def _loss(params, target):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(target)))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_update_keeps_scheduled_blocks_per_column(name):
    extra, steps, density = SCHEDULES[name]
    method = plan_lib.from_config(_config(name, **extra)).method
    assert method.settings.structure.balance == "column"
    p, target = _params(0), _params(7)
    masks = jax.jit(method.init_masks)(p, M.dense_masks(p), jax.random.key(0))
    p = M.apply_masks(p, masks)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    opt = tx.init(p)

    @jax.jit
    def step(i, p, masks, opt):   # as the train step: masked update, then the method
        dense = jax.grad(_loss)(p, target)
        grads = M.apply_masks(dense, masks)
        upd, opt = tx.update(grads, opt, p)
        p = M.apply_masks(optax.apply_updates(p, upd), masks)
        score = dense if method.needs_dense_grads else grads
        return method.update(i, p, masks, score, opt, jax.random.key(9))[:3]

    moved = 0
    for i in range(steps):
        old = masks
        p, masks, opt = step(jnp.int32(i), p, masks, opt)
        if not bool(method.is_update_step(i)):
            jax.tree.map(np.testing.assert_array_equal, old, masks)
            continue
        flat_p, flat_old = M.flatten(p), M.flatten(old)
        mu, nu = M.flatten(opt[1][0].mu), M.flatten(opt[1][0].nu)
        for path in SPARSE:
            mask = M.flatten(masks)[path]
            live, whole = _blocks(mask)
            assert whole, (name, i, path)
            kb = live.shape[1]
            want = int(np.clip(np.round(density(i) * kb), 1, kb))
            np.testing.assert_array_equal(live.sum(axis=1), want, err_msg=f"{name} {i} {path}")
            m, was = np.asarray(mask), np.asarray(flat_old[path])
            grown = m & ~was
            assert not np.any(np.asarray(flat_p[path])[~m | grown]), (name, i, path)
            assert not np.any(np.asarray(mu[path])[grown]), (name, i, path)
            assert not np.any(np.asarray(nu[path])[grown]), (name, i, path)
            moved += int(grown.sum())
    if name != "gmp":   # GMP only prunes; the others must really have moved blocks
        assert moved > 0


# ----------------------------------------------------------------------------- selection

def _sort_select(scores_S, eligible_S, k):
    """The selection every update used before: sort by (ineligible, -score, index)."""
    neg = -jnp.where(jnp.isnan(scores_S), -jnp.inf, scores_S)
    neg = jnp.where(neg == 0, 0.0, neg)
    dead = (~eligible_S).astype(jnp.int32)
    idx = jnp.arange(scores_S.shape[0], dtype=jnp.int32)
    sd, sn, si = lax.sort((dead, neg, idx), num_keys=3)
    j = jnp.clip(k - 1, 0, scores_S.shape[0] - 1)
    upto = (dead < sd[j]) | ((dead == sd[j]) & ((neg < sn[j]) | ((neg == sn[j]) & (idx <= si[j]))))
    return upto & (k > 0) & eligible_S


def test_selection_matches_the_sort_it_replaced():
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 1e-45,
                        1.17549435e-38, 3.4e38, -3.4e38], np.float32)
    fast = jax.jit(P.select_rows)
    slow = jax.jit(jax.vmap(_sort_select))
    for trial in range(12):
        rows, size = 6, [5, 300, 4096][trial % 3]
        kind = trial // 3
        if kind == 0:      # ties and specials everywhere: the index order decides
            s = rng.choice(special, (rows, size))
        elif kind == 1:    # distinct scores
            s = rng.standard_normal((rows, size)).astype(np.float32)
        elif kind == 2:    # few distinct values, some denormal
            s = (rng.integers(-3, 4, (rows, size)) * rng.choice([1.0, 1e-39], (rows, size))
                 ).astype(np.float32)
        else:              # magnitudes with many exact zeros (masked weights)
            s = np.abs(rng.standard_normal((rows, size))).astype(np.float32)
            s[rng.random((rows, size)) < 0.5] = 0.0
        eligible = rng.random((rows, size)) < rng.uniform(0.1, 1.0)
        k = rng.integers(-1, size + 2, rows).astype(np.int32)
        got = np.asarray(fast(s, eligible, k))
        np.testing.assert_array_equal(got, np.asarray(slow(s, eligible, k)), err_msg=str(trial))
        np.testing.assert_array_equal(got.sum(axis=1),
                                      np.clip(k, 0, eligible.sum(axis=1)), err_msg=str(trial))
