"""Pure-XLA block-sparse attention: the CPU default (also runs on GPU/TPU).

Layout ``[N, L, D]`` (N = batch x heads). Per query block ``i`` the ``T`` key/value blocks of
its row (``meta.row_kidx_LbxT[i]``, static numpy) are gathered into one ``[T*B, D]`` slab, so
the scores are one batched GEMM of ``[B, D] x [D, T*B]`` per row and nothing outside the
pattern's blocks is computed or stored:

    forward   s = q_i K_row^T * scale   p = softmax(s, in-block mask)   o_i = p V_row
    dQ        dq_i = (p * (dO_i V_row^T - delta_i)) K_row * scale
    dK, dV    the column view: per key block j, its S query blocks gathered ->
              dv_j = p^T dO_col, dk_j = (p * (dO_col v_j^T - delta_col))^T Q_col * scale

The backward recomputes ``p`` from the saved log-sum-exp (FlashAttention-2 style) in two
passes, so dK/dV need no scatter-add: on CPU scatters were the slow part of the gather-based
matmul (see kernels/xla.py). The in-block element masks (padding False) are numpy constants
built at trace time from the static pattern; the work is proportional to the number of
non-empty blocks, ``Lb * T`` (rows) and ``Lb * S`` (columns), not to ``Lb^2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention_meta import AttentionMeta, in_block_mask

_F32 = jnp.float32
_NEG = -1e30  # finite "minus infinity": masked scores never produce inf - inf = nan


def _gather(x_NxLxD: jax.Array, idx_LbxT: np.ndarray, b: int) -> jax.Array:
    """Blocks ``idx`` of every row of blocks: ``[N, Lb, T*B, ...]``."""
    n, seq_len = x_NxLxD.shape[:2]
    lb, t = idx_LbxT.shape
    x_b = x_NxLxD.reshape(n, seq_len // b, b, *x_NxLxD.shape[2:])
    return x_b[:, idx_LbxT].reshape(n, lb, t * b, *x_NxLxD.shape[2:])


def _blocks(x_NxL: jax.Array, b: int) -> jax.Array:
    n, seq_len = x_NxL.shape[:2]
    return x_NxL.reshape(n, seq_len // b, b, *x_NxL.shape[2:])


def forward(q_NxLxD, k_NxLxD, v_NxLxD, meta: AttentionMeta, mask_fn, scale):
    """``(out [N, L, D], lse [N, L] fp32)`` over the row view (backend interface)."""
    b = meta.block_size
    n, seq_len, d = q_NxLxD.shape
    mask = jnp.asarray(in_block_mask(mask_fn, meta.row_kidx_LbxT, meta.row_count_Lb, b))[None]
    k_g = _gather(k_NxLxD, meta.row_kidx_LbxT, b)                    # [N, Lb, TB, D]
    v_g = _gather(v_NxLxD, meta.row_kidx_LbxT, b)
    s = jnp.einsum("nibd,nikd->nibk", _blocks(q_NxLxD, b), k_g,
                   preferred_element_type=_F32) * scale             # [N, Lb, B, TB]
    s = jnp.where(mask, s, _NEG)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    l_safe = jnp.where(denom > 0, denom, 1.0)  # a row with no allowed key outputs zeros
    o = jnp.einsum("nibk,nikd->nibd", p, v_g.astype(_F32)) / l_safe[..., None]
    lse = m + jnp.log(l_safe)
    return o.reshape(n, seq_len, d).astype(q_NxLxD.dtype), lse.reshape(n, seq_len)


def backward(q_NxLxD, k_NxLxD, v_NxLxD, lse_NxL, do_NxLxD, delta_NxL, meta: AttentionMeta,
             mask_fn, scale):
    """``(dq, dk, dv)`` in fp32: dQ over the row view, dK/dV over the column view."""
    b = meta.block_size
    n, seq_len, d = q_NxLxD.shape
    q, k, v = (x.astype(_F32) for x in (q_NxLxD, k_NxLxD, v_NxLxD))
    do = do_NxLxD.astype(_F32)

    # dQ: rows (query blocks) over their key blocks.
    mask_r = jnp.asarray(in_block_mask(mask_fn, meta.row_kidx_LbxT, meta.row_count_Lb, b))[None]
    k_g = _gather(k, meta.row_kidx_LbxT, b)
    v_g = _gather(v, meta.row_kidx_LbxT, b)
    s = jnp.einsum("nibd,nikd->nibk", _blocks(q, b), k_g) * scale
    p = jnp.where(mask_r, jnp.exp(s - _blocks(lse_NxL, b)[..., None]), 0.0)
    dp = jnp.einsum("nibd,nikd->nibk", _blocks(do, b), v_g)
    ds = p * (dp - _blocks(delta_NxL, b)[..., None])
    dq = jnp.einsum("nibk,nikd->nibd", ds, k_g).reshape(n, seq_len, d) * scale

    # dK, dV: columns (key blocks) over the query blocks that attend to them.
    idx, count = meta.col_qidx_LbxS, meta.col_count_Lb
    mask_c = jnp.asarray(in_block_mask(mask_fn, idx, count, b, transpose=True))[None]
    q_g, do_g = _gather(q, idx, b), _gather(do, idx, b)               # [N, Lb, SB, D]
    lse_g, delta_g = _gather(lse_NxL, idx, b), _gather(delta_NxL, idx, b)   # [N, Lb, SB]
    s = jnp.einsum("njqd,njkd->njqk", q_g, _blocks(k, b)) * scale    # [N, Lb, SB, B]
    p = jnp.where(mask_c, jnp.exp(s - lse_g[..., None]), 0.0)
    dv = jnp.einsum("njqk,njqd->njkd", p, do_g)
    dp = jnp.einsum("njqd,njkd->njqk", do_g, _blocks(v, b))
    ds = p * (dp - delta_g[..., None])
    dk = jnp.einsum("njqk,njqd->njkd", ds, q_g) * scale
    return dq, dk.reshape(n, seq_len, d), dv.reshape(n, seq_len, d)
