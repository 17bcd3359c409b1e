"""The GPT model: causality, untrained loss, masks, dtypes, RoPE, sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.evaluation import sampling
from sparse_gpt.training import step as train_lib


def tiny_cfg(**overrides) -> model_lib.ModelConfig:
    base = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_len=32)
    base.update(overrides)
    return model_lib.ModelConfig(**base)


def init(cfg, batch=2, length=16, seed=0):
    model = model_lib.GPT(cfg)
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, length), 0, cfg.vocab_size)
    return model, model.init(jax.random.key(seed), tokens), tokens


@pytest.mark.parametrize("use_rope", [False, True])
def test_changing_token_t_never_changes_earlier_logits(use_rope):
    model, variables, tokens = init(tiny_cfg(use_rope=use_rope))
    logits = model.apply(variables, tokens)
    for t in (0, 5, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % 64)
        new = model.apply(variables, changed)
        np.testing.assert_array_equal(new[:, :t], logits[:, :t])
        assert np.abs(new[:, t:] - logits[:, t:]).max() > 1e-4  # and later ones do change


def test_untrained_loss_is_close_to_log_vocab():
    cfg = tiny_cfg(vocab_size=264, d_model=64)
    model, variables, tokens = init(cfg, batch=8, length=32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "weights": jnp.ones(tokens.shape)}
    loss = train_lib.loss_fn(variables["params"], variables["masks"], batch, model)
    assert abs(float(loss) - math.log(264)) < 0.05


def test_masks_mirror_every_projection_kernel_and_start_dense():
    cfg = tiny_cfg()
    _, variables, _ = init(cfg)
    masks = variables["masks"]["blocks"]
    assert set(masks) == {"attn", "mlp"}
    assert set(masks["attn"]) == {"qkv", "out"} and set(masks["mlp"]) == {"fc", "proj"}
    params = variables["params"]["blocks"]
    for group, names in (("attn", ("qkv", "out")), ("mlp", ("fc", "proj"))):
        for name in names:
            m, p = masks[group][name]["kernel"], params[group][name]["kernel"]
            assert m.shape == p.shape and m.dtype == jnp.bool_ and bool(m.all())
    assert p.shape == (cfg.n_layers, 4 * cfg.d_model, cfg.d_model)  # stacked layer axis


def test_masked_forward_equals_dense_model_with_zeroed_weights():
    model, variables, tokens = init(tiny_cfg())
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.3), variables["masks"])
    zeroed = masks_lib.apply_masks(variables["params"], masks)
    # Oracle: the dense model (no masks collection) with masked entries set to zero by hand.
    expected = model.apply({"params": zeroed}, tokens)
    got = model.apply({"params": variables["params"], "masks": masks}, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - model.apply(variables, tokens)).max() > 1e-3


def test_masked_weights_get_zero_gradient():
    model, variables, tokens = init(tiny_cfg())
    masks = jax.tree.map(lambda m: m.at[..., ::2, :].set(False), variables["masks"])
    batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones(tokens.shape)}
    grads = jax.grad(train_lib.loss_fn)(variables["params"], masks, batch, model)
    g = grads["blocks"]["mlp"]["fc"]["kernel"]
    assert float(jnp.abs(g[..., ::2, :]).max()) == 0.0
    assert float(jnp.abs(g[..., 1::2, :]).max()) > 0.0


def test_tiny_model_overfits_one_batch():
    cfg = tiny_cfg()
    model, variables, tokens = init(cfg, batch=4, length=16)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "weights": jnp.ones(tokens.shape)}
    tx = optax.adam(1e-2)
    params, masks = variables["params"], variables["masks"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(train_lib.loss_fn)(params, masks, batch, model)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 3.5 and float(loss) < 0.1


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
    model32, variables, tokens = init(tiny_cfg())
    model16 = model_lib.GPT(tiny_cfg(dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    l32, l16 = model32.apply(variables, tokens), model16.apply(variables, tokens)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.1)


def test_remat_gives_the_same_gradients():
    model, variables, tokens = init(tiny_cfg())
    remat = model_lib.GPT(tiny_cfg(remat=True))
    batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones(tokens.shape)}
    g1 = jax.grad(train_lib.loss_fn)(variables["params"], variables["masks"], batch, model)
    g2 = jax.grad(train_lib.loss_fn)(variables["params"], variables["masks"], batch, remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_rope_matches_rotation_closed_form():
    x = jax.random.normal(jax.random.key(0), (1, 5, 1, 4))
    out = model_lib.rope(x)
    for pos in range(5):
        for i, freq in enumerate((1.0, 1.0 / 100.0)):   # 1 / 10000^(i / half), half = 2
            c, s = math.cos(pos * freq), math.sin(pos * freq)
            a, b = float(x[0, pos, 0, i]), float(x[0, pos, 0, i + 2])
            np.testing.assert_allclose(out[0, pos, 0, i], a * c - b * s, atol=1e-5)
            np.testing.assert_allclose(out[0, pos, 0, i + 2], b * c + a * s, atol=1e-5)


def test_greedy_generation_matches_step_by_step_argmax():
    cfg = tiny_cfg()
    model, variables, _ = init(cfg)
    prompt = [3, 14, 15]
    got = sampling.generate(model, variables["params"], variables["masks"], prompt, 6)
    seq = list(prompt)
    for _ in range(6):   # oracle: full forward on the growing sequence, argmax of the last
        logits = model.apply(variables, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert got == seq[len(prompt):]
    with pytest.raises(ValueError, match="context"):
        sampling.generate(model, variables["params"], variables["masks"], prompt, 40)


def test_bad_model_configs_fail_with_a_fix():
    with pytest.raises(ValueError, match="n_heads"):
        tiny_cfg(n_heads=5).validate()
    model, variables, _ = init(tiny_cfg())
    with pytest.raises(ValueError, match="max_len"):
        model.apply(variables, jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="Unknown preset 'gpt-5'.*tiny"):
        config_lib.get_config("gpt-5")


def test_presets_have_the_documented_sizes():
    # Oracle: 12 * N * D^2 (blocks) + V * D (tied embedding) + T * D (positions), GPT-2 count.
    for preset, expected in (("gpt2-small", 124e6), ("gpt2-medium", 355e6),
                             ("gpt-1.3b", 1.3e9), ("gpt-13b", 12.9e9)):
        c = config_lib.get_config(preset).model
        n = 12 * c.n_layers * c.d_model ** 2 + (c.vocab_size + c.max_len) * c.d_model
        assert abs(n - expected) / expected < 0.05, preset
    cfg = plan_lib.from_config(config_lib.get_config("tiny")).model
    shapes = jax.eval_shape(lambda: model_lib.GPT(cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
    expected = (12 * 4 * 128 ** 2 + 4 * (13 * 128) + 2 * 128 + (264 + 256) * 128)
    assert n_params == expected


def test_padding_rows_of_the_vocabulary_never_take_probability():
    # Oracle: log-softmax over the tokenizer's 60 real tokens only. Zero padding rows (as an
    # imported checkpoint has them) would otherwise score 0 and outrank every real token.
    cfg = tiny_cfg(num_tokens=60)
    model, variables, tokens = init(cfg)
    params = jax.tree.map(lambda x: x, variables["params"])
    params["wte"]["embedding"] = params["wte"]["embedding"].at[60:].set(0.0)
    logits = model.apply({"params": params, "masks": variables["masks"]}, tokens)
    unmasked = model_lib.GPT(tiny_cfg()).apply({"params": params, "masks": variables["masks"]},
                                               tokens)
    expected = jax.nn.log_softmax(unmasked[..., :60], axis=-1)
    np.testing.assert_allclose(jax.nn.log_softmax(logits, axis=-1)[..., :60], expected,
                               atol=1e-5)
    assert float(jax.nn.softmax(logits, axis=-1)[..., 60:].max()) == 0.0
    assert tiny_cfg(num_tokens=0).num_tokens == 0
    assert plan_lib.from_config(config_lib.get_config("tiny")).model.num_tokens == 257
