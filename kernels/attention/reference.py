"""Dense masked attention: the oracle every block-sparse attention backend is tested against.

Dimension letters: ``reference_attention`` takes the model's layout ``[batch, L, heads, D]``
(L sequence length, D head dimension); ``forward`` and ``backward`` take the backends'
``[G, L, D]`` (G = batch x heads).

``reference_attention`` is plain jnp, so ``jax.grad`` of it (ordinary autodiff) is the
independent oracle for the gradients too. ``forward`` and ``backward`` are the same maths
written as the backend interface (with the log-sum-exp carried from forward to backward) so
``backend="reference"`` can be selected through ``block_sparse_attention`` like any other
backend.

A query row with no allowed key outputs zeros (softmax over an empty set), in every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention.meta import AttentionMeta, element_mask

_F32 = jnp.float32


def reference_attention(q, k, v, mask_LxL, scale=None) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` with fp32 softmax; empty rows give zeros.

    Args:
      q: queries ``[batch, L, heads, D]``; ``k``, ``v`` the same shape.
      k: keys.
      v: values.
      mask_LxL: bool ``[L, L]`` (query rows, key columns), True = may attend.
      scale: score scale, default ``D ** -0.5``.

    Returns:
      ``[batch, L, heads, D]`` in the dtype of ``q``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), k.astype(_F32)) * scale
    mask = jnp.asarray(mask_LxL, bool)[None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(_F32))
    return out.astype(q.dtype)


def _scores(q_GxLxD, k_GxLxD, mask_fn, scale):
    mask = jnp.asarray(element_mask(mask_fn, q_GxLxD.shape[1]))[None]
    s = jnp.einsum("gqd,gkd->gqk", q_GxLxD, k_GxLxD, preferred_element_type=_F32) * scale
    return s, mask


def forward(q_GxLxD, k_GxLxD, v_GxLxD, meta: AttentionMeta, mask_fn, scale):
    """``(out [G, L, D], lse [G, L])`` over the full ``[L, L]`` mask (backend interface)."""
    del meta
    s, mask = _scores(q_GxLxD, k_GxLxD, mask_fn, scale)
    m = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    l_safe = jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("gqk,gkd->gqd", p, v_GxLxD.astype(_F32)) / l_safe[..., None]
    return o.astype(q_GxLxD.dtype), m + jnp.log(l_safe)


def backward(q_GxLxD, k_GxLxD, v_GxLxD, lse_GxL, do_GxLxD, delta_GxL, meta, mask_fn, scale):
    """``(dq, dk, dv)`` from the saved log-sum-exp (backend interface)."""
    del meta
    s, mask = _scores(q_GxLxD, k_GxLxD, mask_fn, scale)
    p = jnp.where(mask, jnp.exp(s - lse_GxL[..., None]), 0.0)
    do = do_GxLxD.astype(_F32)
    dv = jnp.einsum("gqk,gqd->gkd", p, do)
    dp = jnp.einsum("gqd,gkd->gqk", do, v_GxLxD.astype(_F32))
    ds = p * (dp - delta_GxL[..., None])
    dq = jnp.einsum("gqk,gkd->gqd", ds, k_GxLxD.astype(_F32)) * scale
    dk = jnp.einsum("gqk,gqd->gkd", ds, q_GxLxD.astype(_F32)) * scale
    return dq, dk, dv
