"""GPT-2 checkpoints in Hugging Face layout, read from a local folder (no torch, no network).

    overrides, params, masks = load_gpt2("path/to/gpt2")     # config.json + model.safetensors
    model = GPT(ModelConfig(**overrides))
    logits = model.apply({"params": params, "masks": masks}, tokens)

The folder is what ``GPT2LMHeadModel.save_pretrained`` writes: ``config.json`` and
``model.safetensors`` (or a sharded ``model.safetensors.index.json`` with its shards). Keys
may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not (``GPT2Model``);
``attn.bias`` / ``attn.masked_bias`` are causal-mask buffers and are ignored. GPT-2's
``Conv1D`` stores weights as ``[in, out]`` (``y = x @ W + b``), which is already our
``SparseDense`` kernel layout, so weights are copied, never transposed; the per-layer arrays
are stacked on the leading layer axis N of our ``nn.scan`` blocks.

Only what our model computes is accepted: pre-LayerNorm blocks with eps 1e-5, learned
positions, attention scaled by 1/sqrt(K), the tanh-approximate GELU (``gelu_new``, flax's
``nn.gelu`` default) and a head tied to the token embedding. Anything else raises
``ValueError`` naming the key, because a silently different function would train or score
something else.

The vocabulary is padded with zero rows to a multiple of ``vocab_pad_to`` (50257 -> 50304).
A zero row has logit exactly 0; GPT-2's real logits are usually far below 0, so any softmax
over the padded vocabulary must exclude ids >= the tokenizer's ``vocab_size`` (``sampling``
and ``mc_eval`` do; see the README for the training loss).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from sparse_gpt.model import gpt

PyTree = Any

# Activations equal to 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), i.e. nn.gelu's default.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
# Our name (under blocks/) <- GPT-2's name (under h.{i}.), and whether it is a LayerNorm.
_BLOCK_KEYS = {
    ("ln1", "scale"): "ln_1.weight", ("ln1", "bias"): "ln_1.bias",
    ("attn", "qkv", "kernel"): "attn.c_attn.weight", ("attn", "qkv", "bias"): "attn.c_attn.bias",
    ("attn", "out", "kernel"): "attn.c_proj.weight", ("attn", "out", "bias"): "attn.c_proj.bias",
    ("ln2", "scale"): "ln_2.weight", ("ln2", "bias"): "ln_2.bias",
    ("mlp", "fc", "kernel"): "mlp.c_fc.weight", ("mlp", "fc", "bias"): "mlp.c_fc.bias",
    ("mlp", "proj", "kernel"): "mlp.c_proj.weight", ("mlp", "proj", "bias"): "mlp.c_proj.bias",
}


def read_config(folder: str, vocab_pad_to: int = 64) -> dict[str, Any]:
    """Reads ``config.json`` and returns the matching ``ModelConfig`` fields.

    Args:
      folder: the checkpoint folder.
      vocab_pad_to: the vocabulary is rounded up to a multiple of this.

    Returns:
      ``{vocab_size, n_layers, d_model, n_heads, d_ff, max_len, use_rope}``, plus
      ``hf_vocab_size`` (the unpadded vocabulary) for the caller's information.

    Raises:
      ValueError: a missing file or key, or an architecture our model does not compute.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json; pass a folder written by "
                         "GPT2LMHeadModel.save_pretrained (config.json + model.safetensors).")
    with open(path) as f:
        hf = json.load(f)
    where = f"{path}:"
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{where} model_type={hf['model_type']!r}; only 'gpt2' is supported.")
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise ValueError(f"{where} missing integer key {key!r}.")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ValueError(f"{where} activation_function={act!r} is not supported: the model "
                         f"uses the tanh-approximate GELU, one of {', '.join(TANH_GELUS)}.")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise ValueError(f"{where} layer_norm_epsilon={eps} is not supported: the model's "
                         "LayerNorms use eps 1e-5.")
    unsupported = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "add_cross_attention": False, "tie_word_embeddings": True}
    for key, ours in unsupported.items():
        if hf.get(key, ours) != ours:
            raise ValueError(f"{where} {key}={hf[key]!r} is not supported (the model computes "
                             f"{key}={ours}).")
    d, n_inner = hf["n_embd"], hf.get("n_inner")
    if d % hf["n_head"]:
        raise ValueError(f"{where} n_embd={d} is not divisible by n_head={hf['n_head']}.")
    if vocab_pad_to < 1:
        raise ValueError(f"vocab_pad_to must be >= 1, got {vocab_pad_to}.")
    vocab = hf["vocab_size"]
    return dict(vocab_size=-(-vocab // vocab_pad_to) * vocab_pad_to, n_layers=hf["n_layer"],
                d_model=d, n_heads=hf["n_head"],
                d_ff=0 if n_inner in (None, 4 * d) else int(n_inner),
                max_len=hf["n_positions"], use_rope=False, hf_vocab_size=vocab)


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of the folder's safetensors file(s), by key.

    Raises:
      ValueError: no safetensors file (e.g. only ``pytorch_model.bin``), or one is unreadable.
    """
    from safetensors.numpy import load_file
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"]
                                                                 .values()))]
    else:
        raise ValueError(f"{folder} has no model.safetensors (or .index.json). A torch "
                         "pytorch_model.bin cannot be read without torch: convert it where "
                         "torch is installed with "
                         "model.save_pretrained(folder, safe_serialization=True).")
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors raises its own error types for bad files
            raise ValueError(f"Cannot read {path} ({type(e).__name__}: {e}).") from e
    return tensors


def _strip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys without the ``transformer.`` prefix, buffers dropped."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        out[key.removeprefix("transformer.")] = value
    return out


def convert(tensors: dict[str, np.ndarray], overrides: dict[str, Any],
            dtype: Any = np.float32) -> PyTree:
    """GPT-2 tensors (by HF key) -> our params tree, vocabulary padded with zero rows.

    Args:
      tensors: key -> array, as in the safetensors file.
      overrides: ``read_config``'s output (shapes to expect).
      dtype: dtype of the returned params.

    Returns:
      The params tree of ``model.GPT`` (``wte``, ``wpe``, ``blocks`` stacked on N, ``ln_f``).

    Raises:
      ValueError: a missing, unexpected or wrongly shaped key (named in the message).
    """
    t = _strip(tensors)
    n, d, v = overrides["n_layers"], overrides["d_model"], overrides["hf_vocab_size"]
    f = overrides["d_ff"] or 4 * d
    shapes = {"wte.weight": (v, d), "wpe.weight": (overrides["max_len"], d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                 "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
                 "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d),
                 "mlp.c_proj.bias": (d,)}
    shapes.update({f"h.{i}.{k}": s for i in range(n) for k, s in per_layer.items()})
    for key, shape in shapes.items():
        if key not in t:
            raise ValueError(f"Missing weight {key!r} (looked for it with and without the "
                             "'transformer.' prefix); the checkpoint is incomplete or not GPT-2.")
        if tuple(t[key].shape) != shape:
            raise ValueError(f"Weight {key!r} has shape {tuple(t[key].shape)}, expected "
                             f"{shape} from config.json.")
    head = t.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, t["wte.weight"]):
        raise ValueError("Weight 'lm_head.weight' differs from 'wte.weight': an untied LM head "
                         "is not supported (the model ties its head to the token embedding).")
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise ValueError(f"Unexpected weight {extra[0]!r} ({len(extra)} unexpected in all); "
                         "the checkpoint has parts the model does not compute.")

    def get(key):
        return np.asarray(t[key], dtype=dtype)

    wte = np.zeros((overrides["vocab_size"], d), dtype)
    wte[:v] = get("wte.weight")
    blocks: dict = {}
    for path, key in _BLOCK_KEYS.items():
        node = blocks
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.stack([get(f"h.{i}.{key}") for i in range(n)])
    return {"wte": {"embedding": wte}, "wpe": {"embedding": get("wpe.weight")},
            "blocks": blocks, "ln_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}}


def load_gpt2(folder: str, vocab_pad_to: int = 64,
              vocab_size: int | None = None) -> tuple[dict[str, Any], PyTree, PyTree]:
    """Loads a Hugging Face GPT-2 folder into our layout.

    Args:
      folder: holds ``config.json`` and ``model.safetensors`` (or a sharded index).
      vocab_pad_to: pad the vocabulary to a multiple of this (GPT-2: 50257 -> 50304).
      vocab_size: pad to exactly this many rows instead (must be >= the checkpoint's).

    Returns:
      ``(overrides, params, masks)``: ``ModelConfig`` fields (``ModelConfig(**overrides)``
      builds the model; the ``hf_vocab_size`` entry is dropped), the params tree (float32
      numpy) and all-True masks.

    Raises:
      ValueError: a missing file, key or weight, a shape mismatch or an unsupported
        architecture; the message names the key.
    """
    overrides = read_config(folder, vocab_pad_to)
    if vocab_size is not None:
        if vocab_size < overrides["hf_vocab_size"]:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the checkpoint's "
                             f"{overrides['hf_vocab_size']} tokens.")
        overrides["vocab_size"] = int(vocab_size)
    params = convert(read_tensors(folder), overrides)
    del overrides["hf_vocab_size"]
    return overrides, params, gpt.live_masks(params)
