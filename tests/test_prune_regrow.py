"""Pure drop / grow functions against hand-computed masks, and optimizer-moment reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_gpt.sparsity import masks as M
from sparse_gpt.sparsity import prune as P
from sparse_gpt.sparsity import regrow as R

W = jnp.array([[4.0, -1.0, 3.0, 0.5],
               [2.0, -7.0, 1.0, 1.0],
               [0.1, 5.0, -6.0, 2.0],
               [3.0, 3.0, 0.0, -8.0]])
DENSE = {"k": jnp.ones((4, 4), bool)}


def _mask(rows):
    return jnp.array(rows, bool)


def test_layerwise_magnitude_prune_hand_computed():
    # |W| top 8: 8, 7, 6, 5, 4 and the three 3s (the 2s lose).
    got = P.prune(DENSE, P.magnitude({"k": W}, DENSE), 0.5)["k"]
    np.testing.assert_array_equal(got, _mask([[1, 0, 1, 0], [0, 1, 0, 0],
                                              [0, 1, 1, 0], [1, 1, 0, 1]]))
    # Pruning again only drops: 0.25 of 16 = 4 -> 8, 7, 6, 5.
    got2 = P.prune({"k": got}, P.magnitude({"k": W}, DENSE), 0.25)["k"]
    np.testing.assert_array_equal(got2, _mask([[0, 0, 0, 0], [0, 1, 0, 0],
                                               [0, 1, 1, 0], [0, 0, 0, 1]]))


def test_prune_never_grows_and_ties_go_to_lower_index():
    live = _mask([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]])
    flat = jnp.ones((4, 4))  # all scores tie
    got = P.prune_to_count({"k": live}, {"k": flat}, 3)["k"]
    np.testing.assert_array_equal(got, _mask([[0, 1, 0, 1], [1, 0, 0, 0],
                                              [0, 0, 0, 0], [0, 0, 0, 0]]))
    # Asking for more than is live keeps what is live, no more.
    assert int(P.prune_to_count({"k": live}, {"k": flat}, 10)["k"].sum()) == 5


def test_prune_is_per_matrix_on_stacked_leaves_and_jittable():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 16)), jnp.float32)
    masks = {"blocks": {"k": jnp.ones((3, 8, 16), bool)}}
    scores = P.magnitude({"blocks": {"k": w}}, masks)
    prune = jax.jit(lambda d: P.prune(masks, scores, d))
    traced = np.asarray(prune(jnp.float32(0.3))["blocks"]["k"])
    np.testing.assert_array_equal(traced.sum(axis=(1, 2)), [38, 38, 38])  # round(0.3 * 128)
    aw = np.abs(np.asarray(w))
    for i in range(3):  # each matrix keeps its own top-38, not a global top-114
        np.testing.assert_array_equal(traced[i], aw[i] >= np.sort(aw[i].reshape(-1))[-38])
    # A static (Python float) density gives the same masks as the traced one.
    np.testing.assert_array_equal(jax.jit(lambda: P.prune(masks, scores, 0.3))()["blocks"]["k"],
                                  traced)


def test_global_prune_hand_computed():
    masks = {"a": jnp.ones((2, 2), bool), "b": jnp.ones((2, 2), bool)}
    scores = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([[5.0, 6.0], [7.0, 0.0]])}
    got = P.prune_global(masks, scores, 0.5)
    np.testing.assert_array_equal(got["a"], _mask([[0, 0], [0, 1]]))
    np.testing.assert_array_equal(got["b"], _mask([[1, 1], [1, 0]]))


def test_block_prune_hand_computed():
    # 8x8 with 4x4 blocks; block mean |w| = 1, 2, 3, 4 (top-left, top-right, ...).
    w = jnp.kron(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.ones((4, 4)))
    w = w.at[0, 0].set(20.0)  # lifts the top-left block's mean to 2.1875 > 2
    masks = {"k": jnp.ones((8, 8), bool)}
    block = M.Structure("block", (4, 4))
    got = P.prune(masks, {"k": w}, 0.5, block)["k"]
    np.testing.assert_array_equal(got, M.expand(_mask([[0, 0], [1, 1]]), (4, 4)))
    got = P.prune(masks, {"k": w}, 0.75, block)["k"]
    np.testing.assert_array_equal(got, M.expand(_mask([[1, 0], [1, 1]]), (4, 4)))
    assert bool(M.is_block_structured(got, (4, 4)))


def test_column_balanced_block_prune_and_regrow_hand_computed():
    # Block means [[5, 1], [3, 2]] (4x4 blocks). Per matrix, 50% keeps 5 and 3 (both in
    # column 0); column-balanced keeps the best block of *each* output column: 5 and 2.
    w = jnp.kron(jnp.array([[5.0, 1.0], [3.0, 2.0]]), jnp.ones((4, 4)))
    masks = {"k": jnp.ones((8, 8), bool)}
    per_matrix = P.prune(masks, {"k": w}, 0.5, M.Structure("block", (4, 4)))["k"]
    np.testing.assert_array_equal(per_matrix, M.expand(_mask([[1, 0], [1, 0]]), (4, 4)))
    col = M.Structure("block", (4, 4), balance="column")
    assert col.units((8, 8)) == 2 and col.relaxed() == M.Structure("block", (4, 4))
    balanced = P.prune(masks, {"k": w}, 0.5, col)["k"]
    np.testing.assert_array_equal(balanced, M.expand(_mask([[1, 0], [0, 1]]), (4, 4)))
    np.testing.assert_array_equal(P.live_counts({"k": balanced}, col)["k"], [1, 1])
    # Regrow one block per output column: column 0 can only take the bottom block, column 1
    # takes its better dead block (score 2 beats 1).
    live = M.expand(_mask([[1, 0], [0, 0]]), (4, 4))
    g = jnp.kron(jnp.array([[9.0, 1.0], [3.0, 2.0]]), jnp.ones((4, 4)))
    got = R.regrow({"k": live}, {"k": g}, 1, col)["k"]
    np.testing.assert_array_equal(got, M.expand(_mask([[1, 0], [1, 1]]), (4, 4)))
    with pytest.raises(ValueError, match="column-balanced"):
        P.prune_global(masks, {"k": w}, 0.5, col)


def test_nm_prune_hand_computed():
    # 2:4 along the input axis (down each column of the 4x4).
    got = P.prune(DENSE, P.magnitude({"k": W}, DENSE), None, M.Structure("nm", n=2, m=4))["k"]
    np.testing.assert_array_equal(got, _mask([[1, 0, 1, 0], [0, 1, 0, 0],
                                              [0, 1, 1, 1], [1, 0, 0, 1]]))
    np.testing.assert_array_equal(M.nm_group_counts(got, 4), [[2, 2, 2, 2]])


def test_regrow_hand_computed():
    live = _mask([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    scores = {"k": jnp.arange(16.0).reshape(4, 4)}
    got = R.regrow({"k": live}, scores, 3)["k"]  # best dead: 14, 13, 12
    np.testing.assert_array_equal(got, _mask([[0, 0, 0, 0], [0, 1, 0, 0],
                                              [0, 1, 1, 0], [1, 1, 1, 1]]))
    np.testing.assert_array_equal(R.grown({"k": live}, {"k": got})["k"],
                                  _mask([[0] * 4, [0] * 4, [0] * 4, [1, 1, 1, 0]]))
    ties = R.regrow({"k": live}, {"k": jnp.zeros((4, 4))}, 2)["k"]  # ties: lowest index
    np.testing.assert_array_equal(ties[0], [True, True, False, False])
    assert int(ties.sum()) == 6


def test_block_regrow_keeps_blocks():
    live = M.expand(_mask([[1, 0], [0, 0]]), (2, 2))
    g = jnp.kron(jnp.array([[9.0, 1.0], [3.0, 2.0]]), jnp.ones((2, 2)))
    got = R.regrow({"k": live}, {"k": g}, 1, M.Structure("block", (2, 2)))["k"]
    np.testing.assert_array_equal(got, M.expand(_mask([[1, 0], [1, 0]]), (2, 2)))


def test_nm_regrow_refills_groups():
    # Column 0 lost one weight, column 2 lost two; column 1 is full.
    live = _mask([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    scores = {"k": jnp.array([[0.0, 9, 1, 0], [5, 9, 2, 0], [1, 9, 3, 0], [7, 9, 4, 0]])}
    got = R.regrow({"k": live}, scores, None, M.Structure("nm", n=2, m=4))["k"]
    np.testing.assert_array_equal(got, _mask([[1, 1, 0, 0], [0, 1, 0, 1],
                                              [0, 0, 1, 1], [1, 0, 1, 0]]))


def test_random_scores_same_seed_same_scores():
    masks = {"a": jnp.ones((4, 4), bool), "b": jnp.ones((2, 8, 8), bool)}
    s1 = P.random_scores(jax.random.key(3), masks)
    s2 = P.random_scores(jax.random.key(3), masks)
    s3 = P.random_scores(jax.random.key(4), masks)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    assert not np.array_equal(s1["a"], s3["a"])
    assert not np.array_equal(s1["a"], s1["b"][0, :4, :4])  # leaves get distinct keys


@pytest.mark.parametrize("make_tx,n_moments", [
    (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)),
     2),                                                           # mu, nu
    (lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), 2),
    (lambda: optax.sgd(1e-2, momentum=0.9), 1),                    # trace
])
def test_reset_moments_on_any_chain(make_tx, n_moments):
    params = {"blocks": {"k": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))},
              "emb": jnp.ones((4, 4))}
    tx = make_tx()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params)
    reset = {"blocks": {"k": jnp.zeros((2, 4, 4), bool).at[1, 2, 3].set(True)}}
    new = R.reset_moments(state, reset)
    before = jax.tree_util.tree_flatten_with_path(state)[0]
    after = jax.tree_util.tree_flatten_with_path(new)[0]
    n_reset = 0
    for (path, a), (_, b) in zip(before, after):
        name = M.key_path_str(path)
        if name.endswith("blocks/k"):
            n_reset += 1
            assert float(b[1, 2, 3]) == 0.0 and float(a[1, 2, 3]) != 0.0
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a.at[1, 2, 3].set(0.0)))
        else:
            np.testing.assert_array_equal(a, b)  # counts, other params untouched
    assert n_reset == n_moments


def test_reset_moments_adam_mu_nu():
    params = {"w": jnp.ones((3, 3))}
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full((3, 3), 2.0)}, state, params)
    reset = {"w": jnp.eye(3, dtype=bool)}
    new = R.reset_moments(state, reset)
    mu, nu = new[0].mu["w"], new[0].nu["w"]
    np.testing.assert_allclose(mu, jnp.where(jnp.eye(3), 0.0, 0.2))   # (1 - b1) * 2
    np.testing.assert_allclose(nu, jnp.where(jnp.eye(3), 0.0, 0.004), rtol=1e-6)  # (1-b2)*4
    assert int(new[0].count) == 1


def test_select_top_exact_against_python_oracle():
    # Ties, signed zeros, infinities and NaN: the count is exact and the order is
    # (eligible first, score descending, NaN worst, lower index first).
    rng = np.random.default_rng(0)
    select = jax.jit(P.select_top)
    values = np.array([-1.0, 0.0, -0.0, 1.0, 2.0, np.inf, -np.inf, np.nan], np.float32)
    for _ in range(60):
        s = rng.choice(values, 16)
        el = rng.random(16) < 0.6
        k = int(rng.integers(0, 18))
        key = lambda i: (not el[i], np.inf if np.isnan(s[i]) else -s[i] + 0.0, i)  # noqa
        expected = np.zeros(16, bool)
        expected[[i for i in sorted(range(16), key=key)[:k] if el[i]]] = True
        np.testing.assert_array_equal(select(jnp.asarray(s), jnp.asarray(el), k), expected)
