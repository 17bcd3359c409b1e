"""GPT-2 in Hugging Face layout: logits vs an independent numpy GPT-2, errors, init_from."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from sparse_gpt import plan as plan_lib
from sparse_gpt.model import hf_import
from sparse_gpt.training import init_from
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.training.metrics import load_metrics

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_config(**kw):
    c = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100,
             n_inner=None, layer_norm_epsilon=1e-5, activation_function="gelu_new",
             architectures=["GPT2LMHeadModel"])
    c.update(kw)
    return c


def random_gpt2(cfg, seed=0, prefix="transformer."):
    """HF-layout tensors (Conv1D weights are [in, out]) with non-trivial LayerNorms."""
    rng = np.random.default_rng(seed)
    d, v, f = cfg["n_embd"], cfg["vocab_size"], cfg["n_inner"] or 4 * cfg["n_embd"]

    def r(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    t = {"wte.weight": r(v, d), "wpe.weight": r(cfg["n_positions"], d, scale=0.05),
         "ln_f.weight": 1 + r(d), "ln_f.bias": r(d)}
    for i in range(cfg["n_layer"]):
        t.update({f"h.{i}.ln_1.weight": 1 + r(d), f"h.{i}.ln_1.bias": r(d),
                  f"h.{i}.attn.c_attn.weight": r(d, 3 * d), f"h.{i}.attn.c_attn.bias": r(3 * d),
                  f"h.{i}.attn.c_proj.weight": r(d, d), f"h.{i}.attn.c_proj.bias": r(d),
                  f"h.{i}.ln_2.weight": 1 + r(d), f"h.{i}.ln_2.bias": r(d),
                  f"h.{i}.mlp.c_fc.weight": r(d, f), f"h.{i}.mlp.c_fc.bias": r(f),
                  f"h.{i}.mlp.c_proj.weight": r(f, d), f"h.{i}.mlp.c_proj.bias": r(d),
                  # the causal-mask buffers old transformers versions saved
                  f"h.{i}.attn.bias": np.tril(np.ones((cfg["n_positions"],) * 2, np.float32)),
                  f"h.{i}.attn.masked_bias": np.array(-1e4, np.float32)})
    return {prefix + k: v for k, v in t.items()}


def write(folder, cfg, tensors):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return str(folder)


# ---------------------------------------------------------------- independent numpy GPT-2
def np_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_gpt2_logits(t, cfg, ids):
    """GPT-2's forward as transformers' modeling_gpt2 computes it, in float64 numpy."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}
    d, h, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    k = d // h
    seq = len(ids)
    x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(seq)]
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(cfg["n_layer"]):
        def p(name, i=i):
            return t[f"h.{i}.{name}"]
        a = np_layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
        qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, kk, v = (z.reshape(seq, h, k).transpose(1, 0, 2) for z in np.split(qkv, 3, -1))
        s = q @ kk.transpose(0, 2, 1) / math.sqrt(k)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(seq, d)
        x = x + o @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        m = np_layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
        m = np_gelu_new(m @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
        x = x + m @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    x = np_layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps)
    return x @ t["wte.weight"].T


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_logits_match_numpy_gpt2(tmp_path, prefix):
    cfg = hf_config()
    tensors = random_gpt2(cfg, prefix=prefix)
    overrides, params, masks = hf_import.load_gpt2(write(tmp_path / "m", cfg, tensors))
    assert overrides == dict(vocab_size=128, n_layers=2, d_model=32, n_heads=4, d_ff=0,
                             max_len=64, use_rope=False)
    np.testing.assert_array_equal(params["wte"]["embedding"][100:], 0.0)  # zero padding rows
    model = model_lib.GPT(model_lib.ModelConfig(**overrides))
    ids = np.random.default_rng(1).integers(0, 100, size=(2, 64))
    ours = np.asarray(model.apply({"params": params, "masks": masks}, jnp.asarray(ids)))
    assert ours.shape == (2, 64, 128)
    for b in range(2):
        ref = np_gpt2_logits(tensors, cfg, ids[b])
        np.testing.assert_allclose(ours[b, :, :100], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours[b, :, 100:], 0.0, atol=1e-6)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers


def test_non_default_inner_width(tmp_path):
    cfg = hf_config(n_inner=48, n_layer=1)
    tensors = random_gpt2(cfg, seed=3)
    overrides, params, masks = hf_import.load_gpt2(write(tmp_path / "m", cfg, tensors),
                                                   vocab_pad_to=8)
    assert overrides["d_ff"] == 48 and overrides["vocab_size"] == 104
    model = model_lib.GPT(model_lib.ModelConfig(**overrides))
    ids = np.arange(10) % 100
    ours = np.asarray(model.apply({"params": params, "masks": masks}, jnp.asarray(ids[None])))
    np.testing.assert_allclose(ours[0, :, :100], np_gpt2_logits(tensors, cfg, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change, match", [
    (dict(config=dict(activation_function="gelu")), "activation_function='gelu'"),
    (dict(config=dict(activation_function="relu")), "activation_function='relu'"),
    (dict(config=dict(layer_norm_epsilon=1e-6)), "layer_norm_epsilon"),
    (dict(config=dict(scale_attn_by_inverse_layer_idx=True)), "scale_attn_by_inverse_layer_idx"),
    (dict(config=dict(model_type="gpt_neo")), "model_type"),
    (dict(config=dict(n_head=5)), "n_embd=32 is not divisible by n_head=5"),
    (dict(drop="transformer.h.1.mlp.c_fc.bias"), "'h.1.mlp.c_fc.bias'"),
    (dict(add={"transformer.h.0.crossattention.c_attn.weight": np.zeros((2, 2), np.float32)}),
     "'h.0.crossattention.c_attn.weight'"),
    (dict(add={"transformer.h.0.attn.c_attn.weight": np.zeros((96, 32), np.float32)}),
     r"'h.0.attn.c_attn.weight' has shape \(96, 32\), expected \(32, 96\)"),
    (dict(add={"lm_head.weight": np.ones((100, 32), np.float32)}), "untied"),
])
def test_unsupported_or_broken_checkpoints_name_the_key(tmp_path, change, match):
    cfg = hf_config(**change.get("config", {}))
    tensors = random_gpt2(hf_config(n_layer=2))
    tensors.pop(change.get("drop", ""), None)
    tensors.update(change.get("add", {}))
    with pytest.raises(ValueError, match=match):
        hf_import.load_gpt2(write(tmp_path / "m", cfg, tensors))


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        hf_import.load_gpt2(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safe_serialization=True"):
        hf_import.load_gpt2(str(tmp_path))


# ---------------------------------------------------------------- init_from
# Batch 8: one row per fake device.
_HF_RUN = {"train.batch_size": 8, "train.log_every": 1, "train.eval_batches": 1,
           "train.sample_tokens": 4}


def small_config(corpus, **overrides):
    return helpers.small_config(corpus, **{**_HF_RUN, **overrides})


def test_init_from_hf_starts_at_the_imported_models_loss(corpus, tmp_path):
    cfg = hf_config(vocab_size=257, n_positions=32, n_head=2)   # byte vocabulary + eot
    tensors = random_gpt2(cfg, seed=5)
    folder = write(tmp_path / "hf", cfg, tensors)
    config = small_config(corpus, **{"train.init_from": folder})  # model.vocab_size 264
    out = trainer.train(config, str(tmp_path / "run"), stop_after=1)
    first = load_metrics(str(tmp_path / "run"))[0]
    assert first["step"] == 1 and int(out["state"].step) == 1

    _, params, masks = hf_import.load_gpt2(folder, vocab_size=264)
    model = model_lib.GPT(plan_lib.from_config(config).model)
    batch = next(data_lib.make_data(config.data, 8, config.data.seed).train_iterator())
    expected = float(train_lib.loss_fn(params, masks, batch, model))
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    # The same loss from the numpy GPT-2 over its own 257 tokens: the model's padding rows
    # (257..263) never take probability.
    nll = []
    for ids, tgt in zip(batch["inputs"], batch["targets"]):
        logits = np_gpt2_logits(tensors, cfg, ids)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(tgt)), tgt])
    assert first["loss"] == pytest.approx(float(np.mean(nll)), rel=1e-4)


def fake_workdir(config, workdir):
    """A sparse_gpt workdir holding one checkpoint of a freshly initialised model."""
    from sparse_gpt.training import checkpoint
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    state = jax.jit(lambda r: train_lib.init_state(plan_lib.from_config(config), model, tx, method, r))(
        jax.random.key(7))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(3, state, {}, checkpoint.make_meta(model.cfg, state))
    ckpt.close()
    return state


def test_init_from_workdir_prunes_the_loaded_weights(corpus, tmp_path):
    src = str(tmp_path / "src")
    source = fake_workdir(small_config(corpus), src)
    config = small_config(corpus, **{"train.init_from": src, "sparsity.method": "static",
                                     "sparsity.density": 0.5, "sparsity.init": "magnitude"})
    model, _, _ = train_lib.build(plan_lib.from_config(config))
    # Any state of this structure stands for init(rng) (reusing the source's saves compiling
    # a second init); its moments are made stale to see warm_start replace them.
    stale = source.replace(opt_state=jax.tree.map(lambda x: x + 1, source.opt_state))
    state = init_from.warm_start(config, model, stale, jax.random.key(0))
    assert int(state.step) == 0
    np.testing.assert_array_equal(state.params["wte"]["embedding"],
                                  source.params["wte"]["embedding"])
    # Magnitude masks of the loaded weights: kept entries equal the source, the rest zero.
    for name in ("qkv", "out"):
        w = np.asarray(source.params["blocks"]["attn"][name]["kernel"])
        m = np.asarray(state.masks["blocks"]["attn"][name]["kernel"])
        assert m.mean() == 0.5
        np.testing.assert_array_equal(np.asarray(state.params["blocks"]["attn"][name]["kernel"]),
                                      np.where(m, w, 0.0))
        for layer in range(2):  # magnitude selection is per layer matrix
            wl, ml = np.abs(w[layer]), m[layer]
            assert wl[ml].min() >= wl[~ml].max()
    adam = state.opt_state[1][0]
    assert not any(np.asarray(x).any() for x in jax.tree.leaves((adam.mu, adam.nu)))


def test_init_from_shape_errors_name_the_fix(corpus, tmp_path):
    src = str(tmp_path / "src")
    fake_workdir(small_config(corpus), src)
    bad = plan_lib.from_config(small_config(corpus, **{"model.n_layers": 3,
                                                                    "model.d_model": 64})).model
    with pytest.raises(ValueError, match=r"--config.model.n_layers=2 --config.model.d_model=32"):
        init_from.load_params(src, bad)
    cfg = hf_config(n_positions=32, vocab_size=300, n_head=2)
    folder = write(tmp_path / "hf", cfg, random_gpt2(cfg))
    ours = plan_lib.from_config(small_config(corpus)).model       # vocab 264 < 300
    with pytest.raises(ValueError, match=r"--config.model.vocab_size=320"):
        init_from.load_params(folder, ours)
    with pytest.raises(ValueError, match=r"--config.model.n_heads=4"):
        init_from.load_params(write(tmp_path / "hf4", hf_config(n_positions=32, vocab_size=257),
                                    random_gpt2(hf_config(n_positions=32, vocab_size=257))),
                              ours)
    with pytest.raises(ValueError, match="neither a sparse_gpt workdir"):
        init_from.load_params(str(tmp_path), ours)
