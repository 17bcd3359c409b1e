"""Pure-XLA block-sparse matmul: the CPU default (also runs on GPU/TPU).

Dimension letters: x ``[M, K]``, W ``[K, N]`` (in-features x out-features), y and dY
``[M, N]``; B the block size, Kb = K/B and Nb = N/B, T the column budget (meta.py); ``d``
in the costs below is the density.

Traced metadata (``BlockMeta``): everything is driven by the column view, one
``lax.scan`` step per output block column j with its T K-blocks ``kidx = col_kidx_NbxT[j]``:

    forward   y[:, j]      = x[:, kidx] @ W[kidx, j]               [M, T*B] @ [T*B, B]
    dW        dW[kidx, j]  = x[:, kidx]^T @ dY[:, j]              (SDDMM, only real blocks)
    dX        dX[:, kidx] += dY[:, j] @ W[kidx, j]^T              (scatter-add into a carry)

Why this shape: on CPU the work must be a few large GEMMs. Gathering all (column, block)
pairs at once materialises a ``d * M * N * K / B`` intermediate and was slower than dense up
to 75% sparsity; one GEMM per output column keeps the gathered slab at ``d * M * K`` and the
GEMM's inner dimension at ``T * B``. dX reuses the column view (a scatter-add of T blocks per
step) instead of the row view because the row budget is usually loose (R = Nb by default)
and XLA cannot skip padded entries, while the column budget is tight by construction.
Padding entries get a zero weight block (forward, dX) or a zeroed dW block written before
the real ones (dW), so they contribute nothing. A full column budget (T == Kb) falls back
to the dense masked products, which are faster than gathering every block (0.5x dense).

Frozen metadata (``FrozenBlockMeta``): the mask is Python data, so the same products are
written with static slices; columns (rows for dX) with the same K-block set share one GEMM.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.bsmm.meta import BlockMeta, FrozenBlockMeta

_F32 = jnp.float32


def _gather_w_cols(w_KxN: jax.Array, meta: BlockMeta) -> jax.Array:
    """W's blocks in column-view order, padding zeroed: ``[Nb, T*B, B]``."""
    b = meta.block_size
    kb, nb = w_KxN.shape[0] // b, w_KxN.shape[1] // b
    t = meta.col_kidx_NbxT.shape[1]
    w_KbxBxNbxB = w_KxN.reshape(kb, b, nb, b)
    # Advanced indices split by a slice go first: result is [Nb, T, B, B].
    w_NbxTxBxB = w_KbxBxNbxB[meta.col_kidx_NbxT, :, jnp.arange(nb)[:, None], :]
    real_NbxT = jnp.arange(t)[None, :] < meta.col_count_Nb[:, None]
    w_NbxTxBxB = jnp.where(real_NbxT[:, :, None, None], w_NbxTxBxB, 0)
    return w_NbxTxBxB.reshape(nb, t * b, b)


def _full_budget(meta: BlockMeta) -> bool:
    # Gathering every block costs more than the dense masked GEMM (0.5x dense), so a full
    # column budget runs the dense masked products below instead.
    return meta.col_kidx_NbxT.shape[1] == meta.shape[0] // meta.block_size


def matmul(x_MxK: jax.Array, w_KxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """Forward ``x @ W_sparse`` over the column view (backend interface)."""
    if _full_budget(meta):
        w_KxN = w_KxN * meta.dense_mask(w_KxN.dtype)
        return jnp.dot(x_MxK, w_KxN, preferred_element_type=_F32).astype(out_dtype)
    b = meta.block_size
    m, k = x_MxK.shape
    t = meta.col_kidx_NbxT.shape[1]
    x_MxKbxB = x_MxK.reshape(m, k // b, b)
    w_NbxTBxB = _gather_w_cols(w_KxN, meta)

    def column(_, kidx_w):
        kidx_T, w_TBxB = kidx_w
        x_MxTB = x_MxKbxB[:, kidx_T].reshape(m, t * b)
        return None, jnp.dot(x_MxTB, w_TBxB, preferred_element_type=_F32).astype(out_dtype)

    _, y_NbxMxB = lax.scan(column, None, (meta.col_kidx_NbxT, w_NbxTBxB))
    return y_NbxMxB.transpose(1, 0, 2).reshape(m, w_KxN.shape[1])


def matmul_t(dy_MxN: jax.Array, w_KxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """dX = ``dY @ W_sparse^T`` as a scatter-add over the column view (backend interface)."""
    if _full_budget(meta):
        w_KxN = w_KxN * meta.dense_mask(w_KxN.dtype)
        return jnp.dot(dy_MxN, w_KxN.T, preferred_element_type=_F32).astype(out_dtype)
    b = meta.block_size
    m, nb = dy_MxN.shape[0], dy_MxN.shape[1] // b
    t = meta.col_kidx_NbxT.shape[1]
    w_NbxTBxB = _gather_w_cols(w_KxN, meta)

    def column(dx_MxK, j_kidx_w):
        j, kidx_T, w_TBxB = j_kidx_w
        dy_MxB = lax.dynamic_slice_in_dim(dy_MxN, j * b, b, axis=1)
        c_MxTB = lax.dot_general(
            dy_MxB, w_TBxB, (((1,), (1,)), ((), ())), preferred_element_type=_F32
        )
        for i in range(t):  # T is static and small; padded entries add zeros
            start = kidx_T[i] * b
            old = lax.dynamic_slice_in_dim(dx_MxK, start, b, axis=1)
            dx_MxK = lax.dynamic_update_slice_in_dim(
                dx_MxK, old + c_MxTB[:, i * b : (i + 1) * b], start, axis=1
            )
        return dx_MxK, None

    dx0 = jnp.zeros((m, w_KxN.shape[0]), _F32)  # fp32 carry: a block gets up to Nb adds
    dx_MxK, _ = lax.scan(column, dx0, (jnp.arange(nb), meta.col_kidx_NbxT, w_NbxTBxB))
    return dx_MxK.astype(out_dtype)


def sddmm(x_MxK: jax.Array, dy_MxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """dW = ``(x^T @ dY) * m`` computed only on the real blocks, dense layout (interface)."""
    if _full_budget(meta):
        dw_KxN = jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=_F32)
        return (dw_KxN * meta.dense_mask(_F32)).astype(out_dtype)
    b = meta.block_size
    m, k = x_MxK.shape
    nb = dy_MxN.shape[1] // b
    t = meta.col_kidx_NbxT.shape[1]
    x_MxKbxB = x_MxK.reshape(m, k // b, b)
    real_NbxT = jnp.arange(t)[None, :] < meta.col_count_Nb[:, None]

    def column(dw_KxN, j_kidx_real):
        j, kidx_T, real_T = j_kidx_real
        x_MxTB = x_MxKbxB[:, kidx_T].reshape(m, t * b)
        dy_MxB = lax.dynamic_slice_in_dim(dy_MxN, j * b, b, axis=1)
        g_TBxB = lax.dot_general(
            x_MxTB, dy_MxB, (((0,), (0,)), ((), ())), preferred_element_type=_F32
        )
        g_TBxB = (g_TBxB * jnp.repeat(real_T, b)[:, None]).astype(out_dtype)
        # Padding repeats the last real index (or 0 for an empty column, whose dW block must be
        # zero anyway): writing in reverse order lets the real block land last.
        for i in reversed(range(t)):
            dw_KxN = lax.dynamic_update_slice(
                dw_KxN, g_TBxB[i * b : (i + 1) * b], (kidx_T[i] * b, j * b)
            )
        return dw_KxN, None

    dw0 = jnp.zeros((k, nb * b), out_dtype)
    dw_KxN, _ = lax.scan(column, dw0, (jnp.arange(nb), meta.col_kidx_NbxT, real_NbxT.astype(_F32)))
    return dw_KxN


# ----------------------------------------------------------------------------------------
# Frozen topology: static slices.


def _runs(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted block ids -> maximal contiguous [start, stop) runs, so slices coalesce."""
    out: list[tuple[int, int]] = []
    for i in blocks:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _take(a: jax.Array, blocks, b: int, axis: int) -> jax.Array:
    parts = [lax.slice_in_dim(a, s * b, e * b, axis=axis) for s, e in _runs(tuple(blocks))]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _grouped(mask_AxC: np.ndarray):
    """Groups the columns of ``mask_AxC`` by their set of non-zero rows."""
    groups: dict[tuple[int, ...], list[int]] = collections.OrderedDict()
    for c in range(mask_AxC.shape[1]):
        groups.setdefault(tuple(np.nonzero(mask_AxC[:, c])[0].tolist()), []).append(c)
    return groups


def _assemble(
    pieces: dict[int, tuple[jax.Array, int]], n_cols: int, b: int, m: int, dtype
) -> jax.Array:
    """Concatenates per-block-column slices (group output, position) in column order."""
    parts, c = [], 0
    while c < n_cols:
        if c not in pieces:
            e = c
            while e < n_cols and e not in pieces:
                e += 1
            parts.append(jnp.zeros((m, (e - c) * b), dtype))
        else:
            arr, p = pieces[c]
            e = c + 1
            while e < n_cols and e in pieces and pieces[e][0] is arr and pieces[e][1] == p + e - c:
                e += 1
            parts.append(arr[:, p * b : (p + e - c) * b])
        c = e
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _static_matmul(a_MxP, w_PxQ, mask_PbxQb, b, out_dtype, transpose_w=False):
    """``a @ (w * m)`` (or ``a @ (w * m)^T``) with static slices, one GEMM per column group."""
    m = a_MxP.shape[0]
    pieces = {}
    for rows, cols in _grouped(mask_PbxQb).items():
        if not rows:
            continue
        a_sub = _take(a_MxP, rows, b, axis=1)
        w_sub = _take(
            _take(w_PxQ, rows, b, axis=1 if transpose_w else 0),
            cols,
            b,
            axis=0 if transpose_w else 1,
        )
        if transpose_w:
            w_sub = w_sub.T
        out = jnp.dot(a_sub, w_sub, preferred_element_type=_F32).astype(out_dtype)
        pieces.update({c: (out, p) for p, c in enumerate(cols)})
    return _assemble(pieces, mask_PbxQb.shape[1], b, m, out_dtype)


def frozen_matmul(x_MxK, w_KxN, fmeta: FrozenBlockMeta, out_dtype):
    """Forward with a trace-time mask (static slices)."""
    return _static_matmul(x_MxK, w_KxN, fmeta.numpy(), fmeta.block_size, out_dtype)


def frozen_matmul_t(dy_MxN, w_KxN, fmeta: FrozenBlockMeta, out_dtype):
    """dX with a trace-time mask: the row view, ``dY[:, ns] @ W[i, ns]^T`` per row group."""
    return _static_matmul(
        dy_MxN, w_KxN, fmeta.numpy().T, fmeta.block_size, out_dtype, transpose_w=True
    )


def frozen_sddmm(x_MxK, dy_MxN, fmeta: FrozenBlockMeta, out_dtype):
    """Sampled dW with a trace-time mask: ``x[:, ks]^T @ dY[:, cols]`` per column group."""
    b, mask = fmeta.block_size, fmeta.numpy()
    k = x_MxK.shape[1]
    pieces = {}
    for rows, cols in _grouped(mask).items():
        if not rows:
            continue
        g = jnp.dot(
            _take(x_MxK, rows, b, axis=1).T,
            _take(dy_MxN, cols, b, axis=1),
            preferred_element_type=_F32,
        ).astype(out_dtype)  # [len(rows)*B, len(cols)*B]
        # Spread the group's block rows back over all of K (zeros elsewhere): [K, len(cols)*B].
        g_t = g.T
        slab = _assemble(
            {r: (g_t, p) for p, r in enumerate(rows)}, k // b, b, g.shape[1], out_dtype
        ).T
        pieces.update({c: (slab, p) for p, c in enumerate(cols)})
    return _assemble(pieces, mask.shape[1], b, k, out_dtype)
