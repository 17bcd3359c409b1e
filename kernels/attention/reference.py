"""Dense masked attention: the oracle every block-sparse attention backend is tested against.

``reference_attention`` is plain jnp in the model's ``[B, L, H, K]`` layout, so ``jax.grad``
of it (ordinary autodiff) is the independent oracle for the gradients too. ``forward`` and
``backward`` are the same maths written as the backend interface (``[N, L, D]``, N = batch x
heads, with the log-sum-exp carried from forward to backward) so ``backend="reference"`` can
be selected through ``block_sparse_attention`` like any other backend.

A query row with no allowed key outputs zeros (softmax over an empty set), in every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention.meta import AttentionMeta, element_mask

_F32 = jnp.float32


def reference_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_LxL, scale=None) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` with fp32 softmax; empty rows give zeros.

    Args:
      q_BxLxHxK: queries; ``k``, ``v`` the same shape.
      k_BxLxHxK: keys.
      v_BxLxHxK: values.
      mask_LxL: bool ``[L, L]`` (query rows, key columns), True = may attend.
      scale: score scale, default ``K ** -0.5``.

    Returns:
      ``[B, L, H, K]`` in the dtype of ``q``.
    """
    scale = q_BxLxHxK.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxK.astype(_F32), k_BxLxHxK.astype(_F32)) * scale
    mask = jnp.asarray(mask_LxL, bool)[None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v_BxLxHxK.astype(_F32))
    return out.astype(q_BxLxHxK.dtype)


def _scores(q_NxLxD, k_NxLxD, mask_fn, scale):
    mask = jnp.asarray(element_mask(mask_fn, q_NxLxD.shape[1]))[None]
    s = jnp.einsum("nqd,nkd->nqk", q_NxLxD, k_NxLxD, preferred_element_type=_F32) * scale
    return s, mask


def forward(q_NxLxD, k_NxLxD, v_NxLxD, meta: AttentionMeta, mask_fn, scale):
    """``(out [N, L, D], lse [N, L])`` over the full ``[L, L]`` mask (backend interface)."""
    del meta
    s, mask = _scores(q_NxLxD, k_NxLxD, mask_fn, scale)
    m = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    l_safe = jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("nqk,nkd->nqd", p, v_NxLxD.astype(_F32)) / l_safe[..., None]
    return o.astype(q_NxLxD.dtype), m + jnp.log(l_safe)


def backward(q_NxLxD, k_NxLxD, v_NxLxD, lse_NxL, do_NxLxD, delta_NxL, meta, mask_fn, scale):
    """``(dq, dk, dv)`` from the saved log-sum-exp (backend interface)."""
    del meta
    s, mask = _scores(q_NxLxD, k_NxLxD, mask_fn, scale)
    p = jnp.where(mask, jnp.exp(s - lse_NxL[..., None]), 0.0)
    do = do_NxLxD.astype(_F32)
    dv = jnp.einsum("nqk,nqd->nkd", p, do)
    dp = jnp.einsum("nqd,nkd->nqk", do, v_NxLxD.astype(_F32))
    ds = p * (dp - delta_NxL[..., None])
    dq = jnp.einsum("nqk,nkd->nqd", ds, k_NxLxD.astype(_F32)) * scale
    dk = jnp.einsum("nqk,nqd->nkd", ds, q_NxLxD.astype(_F32)) * scale
    return dq, dk, dv
