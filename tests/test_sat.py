"""SAT: omitted heads/channels get zero gradient, logits match a zeroed dense oracle, the
scores match numpy, the ladder gives the configured rates, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt.model import omission as omission_lib
from sparse_gpt.model.context import StepContext
from sparse_gpt import plan as plan_lib
from sparse_gpt import flops as flops_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.sparsity import sat
from sparse_gpt.training import step as train_lib

N, D, H, F, L = 2, 32, 4, 128, 16
K = D // H


def _model_and_params(seed=0):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=N, d_model=D, n_heads=H, max_len=L)
    c.data.seq_len = L
    model = model_lib.GPT(plan_lib.from_config(c).model)
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, L), 0, 256)
    params = model.init(jax.random.key(seed), tokens)["params"]
    # Non-zero biases so a missing bias gather would show.
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape),
                          params)
    return model, params, tokens


def _loss(model, omission):
    def fn(params, tokens):
        logits = train_lib.forward(params, None, tokens, model,
                                   StepContext(omission=omission, rng=jax.random.key(5)))
        return jnp.mean(jnp.square(logits[..., :256]))
    return fn


def _magnitude_choice(params, keep_heads, keep_channels):
    """Kept heads / channels per layer by hand (numpy): top sum |W| of each unit."""
    blocks = jax.tree.map(np.asarray, params["blocks"])
    heads, channels = [], []
    for n in range(N):
        qkv = np.abs(blocks["attn"]["qkv"]["kernel"][n]).reshape(D, 3, H, K)
        out = np.abs(blocks["attn"]["out"]["kernel"][n]).reshape(H, K, D)
        s_h = qkv.sum(axis=(0, 1, 3)) + out.sum(axis=(1, 2))
        heads.append(np.sort(np.argsort(-s_h, kind="stable")[:keep_heads]))
        s_c = (np.abs(blocks["mlp"]["fc"]["kernel"][n]).sum(0)
               + np.abs(blocks["mlp"]["proj"]["kernel"][n]).sum(1))
        channels.append(np.sort(np.argsort(-s_c, kind="stable")[:keep_channels]))
    return heads, channels


def test_omitted_units_get_exactly_zero_gradient():
    model, params, tokens = _model_and_params()
    om = omission_lib.Omission(keep_heads=2, keep_channels=48, metric="magnitude")
    grads = jax.grad(_loss(model, om))(params, tokens)
    heads, channels = _magnitude_choice(params, 2, 48)
    g = jax.tree.map(np.asarray, grads["blocks"])
    for n in range(N):
        omitted_h = np.setdiff1d(np.arange(H), heads[n])
        qkv = g["attn"]["qkv"]["kernel"][n].reshape(D, 3, H, K)
        qkv_b = g["attn"]["qkv"]["bias"][n].reshape(3, H, K)
        out = g["attn"]["out"]["kernel"][n].reshape(H, K, D)
        assert np.all(qkv[:, :, omitted_h] == 0) and np.all(qkv_b[:, omitted_h] == 0)
        assert np.all(out[omitted_h] == 0)
        for h in heads[n]:   # kept heads do learn
            assert np.abs(qkv[:, 2, h]).sum() > 0 and np.abs(out[h]).sum() > 0
        omitted_c = np.setdiff1d(np.arange(F), channels[n])
        fc, fc_b = g["mlp"]["fc"]["kernel"][n], g["mlp"]["fc"]["bias"][n]
        proj = g["mlp"]["proj"]["kernel"][n]
        assert np.all(fc[:, omitted_c] == 0) and np.all(fc_b[omitted_c] == 0)
        assert np.all(proj[omitted_c] == 0)
        assert np.all(np.abs(proj[channels[n]]).sum(1) > 0)
    # Everything outside the blocks still trains.
    assert np.abs(np.asarray(grads["wte"]["embedding"])).sum() > 0


def test_omitted_forward_equals_dense_model_with_those_units_zeroed():
    """Oracle: dropping a head's output rows / a channel's proj row from the dense model."""
    model, params, tokens = _model_and_params(seed=2)
    om = omission_lib.Omission(keep_heads=3, keep_channels=40, metric="magnitude")
    got = train_lib.forward(params, None, tokens, model,
                            StepContext(omission=om, rng=jax.random.key(0)))
    heads, channels = _magnitude_choice(params, 3, 40)
    zeroed = jax.tree.map(np.array, params)
    for n in range(N):
        out = zeroed["blocks"]["attn"]["out"]["kernel"][n].reshape(H, K, D)
        out[np.setdiff1d(np.arange(H), heads[n])] = 0
        zeroed["blocks"]["attn"]["out"]["kernel"][n] = out.reshape(D, D)
        zeroed["blocks"]["mlp"]["proj"]["kernel"][n][np.setdiff1d(np.arange(F), channels[n])] = 0
    want = train_lib.forward(jax.tree.map(jnp.asarray, zeroed), None, tokens, model)
    np.testing.assert_allclose(got[..., :256], want[..., :256], rtol=2e-5, atol=2e-5)


def test_scores_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    w_in = rng.standard_normal((6, 4, 3)).astype(np.float32)   # 4 units of 3 columns
    w_out = rng.standard_normal((4, 3, 6)).astype(np.float32)
    key = jax.random.key(0)
    got = {m: np.asarray(omission_lib.unit_scores(m, x, w_in, w_out, key, probe_tokens=7))
           for m in ("magnitude", "wanda", "max_inner_product")}
    np.testing.assert_allclose(got["magnitude"],
                               np.abs(w_in).sum((0, 2)) + np.abs(w_out).sum((1, 2)), rtol=1e-5)
    norms = np.sqrt((x.reshape(-1, 6) ** 2).sum(0))
    np.testing.assert_allclose(got["wanda"], (np.abs(w_in) * norms[:, None, None]).sum((0, 2)),
                               rtol=1e-5)
    probe = x.reshape(-1, 6)[:7]
    mip = np.abs(np.einsum("pd,dus->pus", probe, w_in)).max((0, 2))
    np.testing.assert_allclose(got["max_inner_product"], mip, rtol=1e-5)
    u = np.asarray(omission_lib.unit_scores("uniform", x, w_in, w_out, key, 7))
    assert u.shape == (4,) and np.all((u >= 0) & (u < 1))


def test_topk_selection_and_proportional_sampling():
    scores = jnp.asarray([0.5, 3.0, 1.0, 3.0, 0.0])
    np.testing.assert_array_equal(omission_lib.select(scores, 3, "topk", jax.random.key(0)), [1, 2, 3])
    # keep=1 by Gumbel-top-k picks unit i with probability s_i / sum(s) exactly.
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    keys = jax.random.split(jax.random.key(1), 20000)
    picks = np.asarray(jax.vmap(lambda k: omission_lib.select(jnp.asarray(p), 1, "sample", k))(keys))
    freq = np.bincount(picks[:, 0], minlength=5) / len(keys)
    np.testing.assert_allclose(freq, p, atol=0.015)
    # Sampling without replacement never repeats a unit and avoids zero scores when it can.
    many = np.asarray(jax.vmap(lambda k: omission_lib.select(jnp.asarray(p), 4, "sample", k))(keys[:200]))
    assert all(len(set(row)) == 4 and 4 not in row for row in many)


def test_ladder_rates_and_boundaries():
    assert sat.ladder(0.5, 1000, 0.5, 2) == ((0.5, 0.25, 0.0), (500, 750))
    rates, bounds = sat.ladder(0.6, 90, 1 / 3, 3)
    assert bounds == (30, 50, 70) and np.allclose(rates, (0.6, 0.4, 0.2, 0.0))
    plan = sat.SAT(rates=rates, boundaries=bounds, n_heads=12, d_ff=3072)
    steps = jnp.asarray([0, 29, 30, 49, 50, 69, 70, 89])
    np.testing.assert_allclose(jax.vmap(plan.rate)(steps),
                               [0.6, 0.6, 0.4, 0.4, 0.2, 0.2, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(plan.branch)(steps), [0, 0, 1, 1, 2, 2, 3, 3])
    assert plan.omission(0).keep_heads == 12 - round(0.6 * 12) == 5
    assert plan.omission(1).keep_channels == 3072 - round(0.4 * 3072)
    assert plan.omission(3) is None and plan.kept_fractions(3) == (1.0, 1.0)


def _sat_config(**sat_overrides):
    c = config_lib.get_config("tiny")
    c.unlock()
    c.model.update(n_layers=N, d_model=D, n_heads=H, max_len=L)
    c.data.seq_len = L
    c.train.update(num_steps=8, batch_size=2, warmup_steps=1)
    c.sat.update(omission_rate=0.5, ladder_start=0.5, ladder_stairs=2)
    c.sat.update(**sat_overrides)
    return c


def test_train_step_follows_the_ladder_and_counts_flops():
    c = _sat_config(metric="wanda", selection="sample")
    model, tx, method = train_lib.build(plan_lib.from_config(c))
    plan = plan_lib.from_config(c).sat
    assert plan.rates == (0.5, 0.25, 0.0) and plan.boundaries == (4, 6)
    step = jax.jit(train_lib.make_train_step(model, tx, method, sat=plan))
    state = train_lib.init_state(plan_lib.from_config(c), model, tx, method, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, L + 1), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": jnp.ones((2, L), jnp.float32)}
    seen, flops = [], []
    for _ in range(8):
        before = state
        state, metrics = step(state, batch)
        seen.append(float(metrics["omission_rate"]))
        flops.append(float(state.flops - before.flops))
        assert np.isfinite(float(metrics["loss"]))
    assert seen == [0.5] * 4 + [0.25] * 2 + [0.0] * 2
    assert step._cache_size() == 1   # the ladder never recompiles
    for rate, got in ((0.5, flops[0]), (0.25, flops[4]), (0.0, flops[7])):
        keep_h, keep_c = sat.keep_count(H, rate) / H, sat.keep_count(F, rate) / F
        om = plan_lib.from_config(c).sat.omission(plan.rates.index(rate))
        want = flops_lib.step_flops(model.cfg, state.masks, 2, L,
                                    StepContext(omission=om))["sparse"]
        # By hand: 6 T (kept D*3D + kept D*D) + 6 T (kept 2 D F) + attention + head.
        t = 2 * L
        hand = (6 * t * N * (keep_h * 4 * D * D + keep_c * 2 * D * F)
                + 12 * 2 * D * N * L * L * keep_h + 6 * t * D * 264)
        assert got == pytest.approx(float(want), rel=1e-6)
        assert got == pytest.approx(hand, rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    ({"omission_rate": 1.0}, "omission_rate"),
    ({"metric": "l2"}, "sat.metric"),
    ({"selection": "greedy"}, "sat.selection"),
    ({"targets": "heads,layers"}, "sat.targets"),
    ({"ladder_stairs": 0}, "ladder_stairs"),
])
def test_bad_settings_are_explained(overrides, match):
    with pytest.raises(ValueError, match=match):
        plan_lib.from_config(_sat_config(**overrides)).sat


def test_sat_refuses_dense_gradient_methods_and_block_sparse_matmul():
    c = _sat_config()
    c.sparsity.update(method="rigl", density=0.5)
    with pytest.raises(ValueError, match="dense-gradient"):
        plan_lib.from_config(c)
    model, params, tokens = _model_and_params()
    blocky = model_lib.GPT(model.cfg.__class__(**{**model.cfg.__dict__,
                                                  "matmul": "block_sparse"}))
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool),
                         model.init(jax.random.key(0), tokens)["masks"])
    with pytest.raises(ValueError, match="matmul=masked"):
        train_lib.forward(params, masks, tokens, blocky, StepContext(
            omission=omission_lib.Omission(keep_heads=2), rng=jax.random.key(0)))
