"""Text generation from a trained model: greedy or temperature / top-k sampling.

The model is re-applied to a fixed-size token buffer each step (no KV cache): shapes stay
static, so one compilation serves every prompt length, and for the small models this is used
on (samples at the end of a run, ``eval.py --prompt``) the cost is negligible.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_gpt.sparsity import masks as masks_lib


@partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "vocab_size"))
def _generate(model: nn.Module, params: Any, masks: Any, buffer_L: jax.Array,
              prompt_len: jax.Array, num_tokens: int, temperature: jax.Array, top_k: int,
              vocab_size: int, rng: jax.Array) -> jax.Array:
    def body(i, carry):
        buf_L, rng = carry
        pos = prompt_len + i - 1          # logits at pos predict token pos + 1
        variables = {"params": params} if masks is None else {"params": params, "masks": masks}
        logits_V = model.apply(variables, buf_L[None])[0, pos]
        # Rows past the tokenizer's vocabulary are padding of the embedding table.
        logits_V = jnp.where(jnp.arange(logits_V.shape[0]) < vocab_size, logits_V, -jnp.inf)
        rng, key = jax.random.split(rng)
        if top_k > 0:
            kth = jax.lax.top_k(logits_V, top_k)[0][-1]
            logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
        sampled = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V))
        return buf_L.at[pos + 1].set(token.astype(buf_L.dtype)), rng
    buffer_L, _ = jax.lax.fori_loop(0, num_tokens, body, (buffer_L, rng))
    return buffer_L


def check_request(prompt: list[int], num_tokens: int, max_len: int, *,
                  temperature: float = 0.0, top_k: int = 0, vocab_size: int | None = None,
                  flag: str = "--") -> None:
    """Checks a generation request before any work (``eval.py`` calls it before evaluating).

    Args:
      prompt: the prompt's token ids.
      num_tokens, temperature, top_k: as in :func:`generate`.
      max_len: the model context.
      vocab_size: the tokenizer's vocabulary (``top_k`` may not exceed it); None: unchecked.
      flag: prefix of the option names in messages (``--`` for eval.py's flags).

    Raises:
      ValueError: naming the bad option and its allowed range.
    """
    if not prompt:
        raise ValueError(f"The prompt encodes to no tokens; pass a non-empty {flag}prompt.")
    if num_tokens < 0 or int(num_tokens) != num_tokens:
        raise ValueError(f"{flag}num_tokens={num_tokens} must be an integer >= 0.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{flag}temperature={temperature} must be a finite number >= 0 "
                         "(0: greedy).")
    if top_k < 0 or int(top_k) != top_k or (vocab_size and top_k > vocab_size):
        upto = f" and <= the vocabulary size {vocab_size}" if vocab_size else ""
        raise ValueError(f"{flag}top_k={top_k} must be an integer >= 0{upto} (0: all tokens).")
    if len(prompt) + num_tokens > max_len:
        fix = (f"lower {flag}num_tokens to at most {max_len - len(prompt)} or shorten "
               f"{flag}prompt" if len(prompt) < max_len else
               f"shorten {flag}prompt to fewer than {max_len} tokens")
        raise ValueError(f"Prompt ({len(prompt)} tokens) + {num_tokens} new tokens exceed the "
                         f"model context of {max_len}; {fix}.")


def generate(model: nn.Module, params: Any, masks: Any, prompt: list[int], num_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             vocab_size: int | None = None) -> list[int]:
    """Continues ``prompt`` by ``num_tokens`` tokens.

    Args:
      model: the GPT module.
      params, masks: its variables.
      prompt: token ids, at least one.
      num_tokens: how many tokens to add.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k: sample only among the k most likely tokens (0: all).
      seed: sampling seed.
      vocab_size: the tokenizer's vocabulary; ids at or past it (embedding padding) are never
        produced. Default: the model's vocabulary.

    Returns:
      The generated token ids (without the prompt).

    Raises:
      ValueError: see :func:`check_request`.
    """
    max_len = model.cfg.max_len
    vocab_size = vocab_size or model.cfg.vocab_size
    check_request(prompt, num_tokens, max_len, temperature=temperature, top_k=top_k,
                  vocab_size=vocab_size, flag="")
    if masks is not None and bool(masks_lib.all_live(masks)):
        masks = None   # the dense model (a block-sparse kernel's budget is the sparse one)
    buffer_L = jnp.zeros((max_len,), jnp.int32).at[:len(prompt)].set(jnp.asarray(prompt))
    out_L = _generate(model, params, masks, buffer_L, jnp.int32(len(prompt)), num_tokens,
                      jnp.float32(temperature), top_k, vocab_size,
                      jax.random.key(seed))
    return [int(t) for t in out_L[len(prompt):len(prompt) + num_tokens]]
