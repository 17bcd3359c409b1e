"""Pure-XLA block-sparse attention: the CPU default (also runs on GPU/TPU).

Dimension letters: ``[G, L, D]`` (G = batch x heads, L sequence length, D head dimension);
B the block size, Lb = L // B, R the rows of one row group and ``w`` its width in blocks
(WB = w * B gathered positions). Per query block ``i`` the key/value blocks of its
row (``meta.row_kidx_LbxT[i]``, static numpy) are gathered into one ``[w*B, D]`` slab, so the
scores are one batched GEMM of ``[B, D] x [D, w*B]`` per row and nothing outside the
pattern's blocks is computed or stored:

    forward   s = q_i K_row^T * scale   p = softmax(s, in-block mask)   o_i = p V_row
    dQ        dq_i = (p * (dO_i V_row^T - delta_i)) K_row * scale
    dK, dV    the column view: per key block j, its query blocks gathered ->
              dv_j = p^T dO_col, dk_j = (p * (dO_col v_j^T - delta_col))^T Q_col * scale

Rows are bucketed by their block count (``meta.row_groups``: at most 8 static
widths ``w``), because causal strided patterns have counts growing from 1 to T and one
budget for all rows would compute about twice the blocks. The backward recomputes ``p`` from
the saved log-sum-exp (FlashAttention-2 style) in two passes, so dK/dV need no scatter-add:
on CPU scatters were the slow part of the gather-based matmul (see kernels/bsmm/xla.py). The
in-block element masks (padding False) are numpy constants built at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention.meta import AttentionMeta, in_block_mask, row_groups

_F32 = jnp.float32
_NEG = -1e30  # finite "minus infinity": masked scores never produce inf - inf = nan


def _blocks(x_GxL: jax.Array, b: int) -> jax.Array:
    """``[G, L, ...]`` -> ``[G, Lb, B, ...]``."""
    g, seq_len = x_GxL.shape[:2]
    return x_GxL.reshape(g, seq_len // b, b, *x_GxL.shape[2:])


def _gather(x_GxLbxB: jax.Array, idx_RxW: np.ndarray) -> jax.Array:
    """Blocks ``idx`` of each of R rows, concatenated: ``[G, R, W*B, ...]``."""
    sel = x_GxLbxB[:, idx_RxW]
    return sel.reshape(sel.shape[0], sel.shape[1], sel.shape[2] * sel.shape[3], *sel.shape[4:])


def _by_groups(fn, idx_LbxT, count_Lb, mask_fn, b, transpose, *operands):
    """Runs ``fn(rows, idx, mask, *operands)`` per row group and restores the row order.

    ``fn`` returns a tuple of ``[G, R, ...]`` arrays for its R rows; the results come back as
    ``[G, Lb, ...]``.
    """
    outs, order = [], []
    for rows, width in row_groups(count_Lb):
        idx = idx_LbxT[rows, :width]
        mask = in_block_mask(mask_fn, idx, count_Lb[rows], b, transpose, rows)
        outs.append(fn(rows, idx, jnp.asarray(mask)[None], *operands))
        order.append(rows)
    inverse = np.argsort(np.concatenate(order), kind="stable")
    return tuple(jnp.concatenate(parts, axis=1)[:, inverse] for parts in zip(*outs))


def forward(q_GxLxD, k_GxLxD, v_GxLxD, meta: AttentionMeta, mask_fn, scale):
    """``(out [G, L, D], lse [G, L] fp32)`` over the row view (backend interface)."""
    b = meta.block_size
    g, seq_len, d = q_GxLxD.shape

    def rows_fwd(rows, idx, mask, q_b, k_b, v_b):
        k_row, v_row = _gather(k_b, idx), _gather(v_b, idx)             # [G, R, WB, D]
        s = jnp.einsum("gibd,gikd->gibk", q_b[:, rows], k_row,
                       preferred_element_type=_F32) * scale             # [G, R, B, WB]
        s = jnp.where(mask, s, _NEG)
        m = jnp.max(s, axis=-1)
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        denom = jnp.sum(p, axis=-1)
        l_safe = jnp.where(denom > 0, denom, 1.0)  # a row with no allowed key outputs zeros
        o = jnp.einsum("gibk,gikd->gibd", p, v_row.astype(_F32)) / l_safe[..., None]
        return o, m + jnp.log(l_safe)

    o, lse = _by_groups(rows_fwd, meta.row_kidx_LbxT, meta.row_count_Lb, mask_fn, b, False,
                        *(_blocks(x, b) for x in (q_GxLxD, k_GxLxD, v_GxLxD)))
    return o.reshape(g, seq_len, d).astype(q_GxLxD.dtype), lse.reshape(g, seq_len)


def backward(q_GxLxD, k_GxLxD, v_GxLxD, lse_GxL, do_GxLxD, delta_GxL, meta: AttentionMeta,
             mask_fn, scale):
    """``(dq, dk, dv)`` in fp32: dQ over the row view, dK/dV over the column view."""
    b = meta.block_size
    g, seq_len, d = q_GxLxD.shape
    q_b, k_b, v_b, do_b = (_blocks(x.astype(_F32), b)
                           for x in (q_GxLxD, k_GxLxD, v_GxLxD, do_GxLxD))
    lse_b, delta_b = _blocks(lse_GxL, b), _blocks(delta_GxL, b)

    def rows_dq(rows, idx, mask):
        k_row, v_row = _gather(k_b, idx), _gather(v_b, idx)
        s = jnp.einsum("gibd,gikd->gibk", q_b[:, rows], k_row) * scale
        p = jnp.where(mask, jnp.exp(s - lse_b[:, rows][..., None]), 0.0)
        dp = jnp.einsum("gibd,gikd->gibk", do_b[:, rows], v_row)
        ds = p * (dp - delta_b[:, rows][..., None])
        return (jnp.einsum("gibk,gikd->gibd", ds, k_row) * scale,)

    def cols_dkdv(cols, idx, mask):
        q_col, do_col = _gather(q_b, idx), _gather(do_b, idx)           # [G, R, WB, D]
        lse_col, delta_col = _gather(lse_b, idx), _gather(delta_b, idx) # [G, R, WB]
        s = jnp.einsum("gjqd,gjkd->gjqk", q_col, k_b[:, cols]) * scale  # [G, R, WB, B]
        p = jnp.where(mask, jnp.exp(s - lse_col[..., None]), 0.0)
        dv = jnp.einsum("gjqk,gjqd->gjkd", p, do_col)
        ds = p * (jnp.einsum("gjqd,gjkd->gjqk", do_col, v_b[:, cols]) - delta_col[..., None])
        return jnp.einsum("gjqk,gjqd->gjkd", ds, q_col) * scale, dv

    (dq,) = _by_groups(rows_dq, meta.row_kidx_LbxT, meta.row_count_Lb, mask_fn, b, False)
    dk, dv = _by_groups(cols_dkdv, meta.col_qidx_LbxS, meta.col_count_Lb, mask_fn, b, True)
    return tuple(x.reshape(g, seq_len, d) for x in (dq, dk, dv))
