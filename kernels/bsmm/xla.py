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

Compact layout (kernels/bsmm/compact.py: ``blocks_NbxTxBxB`` + ``kidx_NbxT``, every slot
live): the column scan above is the core of both layouts. The dense layout gathers W's
blocks into ``[Nb, T*B, B]`` (padding zeroed) and scatters dW's per-column output back into
``[K, N]``; the compact layout hands its blocks to the same scan as a reshape (no gather of
W) and its dblocks are the scan's per-column ``[T*B, B]`` output reshaped to
``[Nb, T, B, B]`` (no dense dW). ``frozen_compact_*`` are the static-slice products of a
frozen compact topology.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.bsmm.compact import CompactMeta, densify_blocks, gather_blocks
from kernels.bsmm.meta import BlockMeta, FrozenBlockMeta

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b^T
_TN = (((0,), (0,)), ((), ()))  # dot_general dims of a^T @ b


def _gather_w_cols(w_KxN: jax.Array, meta: BlockMeta) -> jax.Array:
    """W's blocks in column-view order, padding zeroed: ``[Nb, T*B, B]``."""
    b, t = meta.block_size, meta.col_kidx_NbxT.shape[1]
    w_NbxTxBxB = gather_blocks(w_KxN, meta.col_kidx_NbxT, b)
    real_NbxT = jnp.arange(t)[None, :] < meta.col_count_Nb[:, None]
    w_NbxTxBxB = jnp.where(real_NbxT[:, :, None, None], w_NbxTxBxB, 0)
    return w_NbxTxBxB.reshape(-1, t * b, b)


def _full_budget(meta: BlockMeta) -> bool:
    # Gathering every block costs more than the dense masked GEMM (0.5x dense), so a full
    # column budget runs the dense masked products below instead.
    return meta.col_kidx_NbxT.shape[1] == meta.shape[0] // meta.block_size


# The column-scan core, shared by both layouts: ``w_NbxTBxB`` holds column j's T blocks
# stacked along K (zero blocks contribute nothing), ``kidx_NbxT`` their K-blocks.


def _x_cols(x_MxK, kidx_T, b: int) -> jax.Array:
    """``x[:, kidx]`` as ``[M, T*B]``: T dynamic slices (XLA:CPU's gather was 1.1-1.4x slower)."""
    parts = [lax.dynamic_slice_in_dim(x_MxK, kidx_T[i] * b, b, axis=1)
             for i in range(kidx_T.shape[0])]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _cols_matmul(x_MxK, w_NbxTBxB, kidx_NbxT, b: int, out_dtype) -> jax.Array:
    """``y[:, j] = x[:, kidx[j]] @ w[j]``, one GEMM per output block column: ``[M, N]``."""
    m = x_MxK.shape[0]
    nb = kidx_NbxT.shape[0]

    def column(y_MxN, j_kidx_w):
        j, kidx_T, w_TBxB = j_kidx_w
        y_MxB = jnp.dot(_x_cols(x_MxK, kidx_T, b), w_TBxB, preferred_element_type=_F32)
        # Written in place into the carry: stacking [Nb, M, B] and transposing cost a copy.
        return lax.dynamic_update_slice_in_dim(y_MxN, y_MxB.astype(out_dtype), j * b, 1), None

    y0 = jnp.zeros((m, nb * b), out_dtype)
    y_MxN, _ = lax.scan(column, y0, (jnp.arange(nb), kidx_NbxT, w_NbxTBxB))
    return y_MxN


def _cols_matmul_t(dy_MxN, w_NbxTBxB, kidx_NbxT, b: int, k: int, out_dtype) -> jax.Array:
    """``dX[:, kidx[j]] += dY[:, j] @ w[j]^T`` scatter-added over the columns: ``[M, K]``."""
    m = dy_MxN.shape[0]
    nb, t = kidx_NbxT.shape

    def column(dx_MxK, j_kidx_w):
        j, kidx_T, w_TBxB = j_kidx_w
        dy_MxB = lax.dynamic_slice_in_dim(dy_MxN, j * b, b, axis=1)
        c_MxTB = lax.dot_general(dy_MxB, w_TBxB, _NT, preferred_element_type=_F32)
        for i in range(t):  # T is static and small; zero blocks add zeros
            start = kidx_T[i] * b
            old = lax.dynamic_slice_in_dim(dx_MxK, start, b, axis=1)
            dx_MxK = lax.dynamic_update_slice_in_dim(
                dx_MxK, old + c_MxTB[:, i * b : (i + 1) * b], start, axis=1
            )
        return dx_MxK, None

    dx0 = jnp.zeros((m, k), _F32)  # fp32 carry: a block gets up to Nb adds
    dx_MxK, _ = lax.scan(column, dx0, (jnp.arange(nb), kidx_NbxT, w_NbxTBxB))
    return dx_MxK.astype(out_dtype)


def _cols_sddmm(x_MxK, dy_MxN, kidx_NbxT, b: int, out_dtype) -> jax.Array:
    """``x[:, kidx[j]]^T @ dY[:, j]`` per output block column: ``[Nb, T*B, B]``."""
    nb = kidx_NbxT.shape[0]

    def column(_, j_kidx):
        j, kidx_T = j_kidx
        x_MxTB = _x_cols(x_MxK, kidx_T, b)
        dy_MxB = lax.dynamic_slice_in_dim(dy_MxN, j * b, b, axis=1)
        g_TBxB = lax.dot_general(x_MxTB, dy_MxB, _TN, preferred_element_type=_F32)
        return None, g_TBxB.astype(out_dtype)

    _, g_NbxTBxB = lax.scan(column, None, (jnp.arange(nb), kidx_NbxT))
    return g_NbxTBxB


def matmul(x_MxK: jax.Array, w_KxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """Forward ``x @ W_sparse`` over the column view (backend interface)."""
    if _full_budget(meta):
        w_KxN = w_KxN * meta.dense_mask(w_KxN.dtype)
        return jnp.dot(x_MxK, w_KxN, preferred_element_type=_F32).astype(out_dtype)
    w_NbxTBxB = _gather_w_cols(w_KxN, meta)
    return _cols_matmul(x_MxK, w_NbxTBxB, meta.col_kidx_NbxT, meta.block_size, out_dtype)


def matmul_t(dy_MxN: jax.Array, w_KxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """dX = ``dY @ W_sparse^T`` as a scatter-add over the column view (backend interface)."""
    if _full_budget(meta):
        w_KxN = w_KxN * meta.dense_mask(w_KxN.dtype)
        return jnp.dot(dy_MxN, w_KxN.T, preferred_element_type=_F32).astype(out_dtype)
    w_NbxTBxB = _gather_w_cols(w_KxN, meta)
    k = w_KxN.shape[0]
    return _cols_matmul_t(dy_MxN, w_NbxTBxB, meta.col_kidx_NbxT, meta.block_size, k, out_dtype)


def sddmm(x_MxK: jax.Array, dy_MxN: jax.Array, meta: BlockMeta, out_dtype) -> jax.Array:
    """dW = ``(x^T @ dY) * m`` computed only on the real blocks, dense layout (interface)."""
    if _full_budget(meta):
        dw_KxN = jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=_F32)
        return (dw_KxN * meta.dense_mask(_F32)).astype(out_dtype)
    b, (k, _) = meta.block_size, meta.shape
    t = meta.col_kidx_NbxT.shape[1]
    g_NbxTBxB = _cols_sddmm(x_MxK, dy_MxN, meta.col_kidx_NbxT, b, out_dtype)
    real_NbxT = jnp.arange(t)[None, :] < meta.col_count_Nb[:, None]
    kidx_NbxT = jnp.where(real_NbxT, meta.col_kidx_NbxT, k // b)  # out of range: dropped
    return densify_blocks(g_NbxTBxB.reshape(-1, t, b, b), kidx_NbxT, k)


# ----------------------------------------------------------------------------------------
# Compact layout, traced index: the core without any gather of W.


def _full_slots(cmeta: CompactMeta) -> bool:
    return cmeta.slots == cmeta.shape[0] // cmeta.block_size  # every block live: dense GEMM


def compact_matmul(x_MxK, blocks_NbxTxBxB, cmeta: CompactMeta, out_dtype) -> jax.Array:
    """Forward ``x @ W`` from the compact blocks (compact backend interface)."""
    b, k = cmeta.block_size, cmeta.shape[0]
    if _full_slots(cmeta):
        w_KxN = densify_blocks(blocks_NbxTxBxB, cmeta.kidx_NbxT, k)
        return jnp.dot(x_MxK, w_KxN, preferred_element_type=_F32).astype(out_dtype)
    w_NbxTBxB = blocks_NbxTxBxB.reshape(-1, cmeta.slots * b, b)
    return _cols_matmul(x_MxK, w_NbxTBxB, cmeta.kidx_NbxT, b, out_dtype)


def compact_matmul_t(dy_MxN, blocks_NbxTxBxB, cmeta: CompactMeta, out_dtype) -> jax.Array:
    """dX = ``dY @ W^T`` from the compact blocks (compact backend interface)."""
    b, k = cmeta.block_size, cmeta.shape[0]
    if _full_slots(cmeta):
        w_KxN = densify_blocks(blocks_NbxTxBxB, cmeta.kidx_NbxT, k)
        return jnp.dot(dy_MxN, w_KxN.T, preferred_element_type=_F32).astype(out_dtype)
    w_NbxTBxB = blocks_NbxTxBxB.reshape(-1, cmeta.slots * b, b)
    return _cols_matmul_t(dy_MxN, w_NbxTBxB, cmeta.kidx_NbxT, b, k, out_dtype)


def compact_sddmm(x_MxK, dy_MxN, cmeta: CompactMeta, out_dtype) -> jax.Array:
    """dblocks ``[Nb, T, B, B]``: the scan's per-column output, no dense dW (interface)."""
    b, t = cmeta.block_size, cmeta.slots
    if _full_slots(cmeta):
        dw_KxN = jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=_F32).astype(out_dtype)
        return gather_blocks(dw_KxN, cmeta.kidx_NbxT, b)
    g_NbxTBxB = _cols_sddmm(x_MxK, dy_MxN, cmeta.kidx_NbxT, b, out_dtype)
    return g_NbxTBxB.reshape(-1, t, b, b)


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


# ----------------------------------------------------------------------------------------
# Compact layout, frozen topology (``FrozenBlockMeta``: slots are the ascending live
# K-blocks). Column j's slots stacked along K are the panel ``[T*B, N]``, so a column
# group's weight is a static slice of it, and its dblocks come out in the same panel.


def _panel(blocks_NbxTxBxB: jax.Array) -> jax.Array:
    """``[Nb, T, B, B]`` -> ``[T*B, N]``: column j's slots stacked along K."""
    nb, t, b, _ = blocks_NbxTxBxB.shape
    return blocks_NbxTxBxB.transpose(1, 2, 0, 3).reshape(t * b, nb * b)


def frozen_compact_matmul(x_MxK, blocks_NbxTxBxB, fmeta: FrozenBlockMeta, out_dtype):
    """Forward from compact blocks with a trace-time topology: one GEMM per column group."""
    b, mask = fmeta.block_size, fmeta.numpy()
    p_TBxN = _panel(blocks_NbxTxBxB)
    pieces = {}
    for rows, cols in _grouped(mask).items():
        out = jnp.dot(
            _take(x_MxK, rows, b, axis=1), _take(p_TBxN, cols, b, axis=1),
            preferred_element_type=_F32,
        ).astype(out_dtype)
        pieces.update({c: (out, p) for p, c in enumerate(cols)})
    return _assemble(pieces, mask.shape[1], b, x_MxK.shape[0], out_dtype)


def frozen_compact_matmul_t(dy_MxN, blocks_NbxTxBxB, fmeta: FrozenBlockMeta, out_dtype):
    """dX with a trace-time topology: ``dY[:, ns] @ W[is, ns]^T`` per row group.

    A row group's blocks sit in different slots of different columns, so one static
    permutation of the (small) weight puts every group's blocks next to each other; the
    activations are only ever sliced.
    """
    b, mask = fmeta.block_size, fmeta.numpy()
    nb, t = blocks_NbxTxBxB.shape[:2]
    slot_KbxNb = np.arange(mask.shape[1])[None, :] * t + np.cumsum(mask, axis=0) - 1
    groups = [(ns, is_) for ns, is_ in _grouped(mask.T).items() if ns]
    perm = [slot_KbxNb[i, j] for ns, is_ in groups for i in is_ for j in ns]
    flat = blocks_NbxTxBxB.reshape(nb * t, b, b)
    if perm != list(range(nb * t)):
        flat = flat[np.asarray(perm, np.int32)]
    pieces, off = {}, 0
    for ns, is_ in groups:
        size = len(is_) * len(ns)
        w4 = flat[off : off + size].reshape(len(is_), len(ns), b, b)
        off += size
        w_sub = w4.transpose(0, 2, 1, 3).reshape(len(is_) * b, len(ns) * b)
        out = lax.dot_general(
            _take(dy_MxN, ns, b, axis=1), w_sub, _NT, preferred_element_type=_F32
        ).astype(out_dtype)
        pieces.update({i: (out, p) for p, i in enumerate(is_)})
    return _assemble(pieces, mask.shape[0], b, dy_MxN.shape[0], out_dtype)


def frozen_compact_sddmm(x_MxK, dy_MxN, fmeta: FrozenBlockMeta, out_dtype):
    """dblocks ``[Nb, T, B, B]`` with a trace-time topology: one GEMM per column group."""
    b, mask = fmeta.block_size, fmeta.numpy()
    t, nb = int(mask[:, 0].sum()), mask.shape[1]
    pieces = {}
    for rows, cols in _grouped(mask).items():
        g = jnp.dot(
            _take(x_MxK, rows, b, axis=1).T, _take(dy_MxN, cols, b, axis=1),
            preferred_element_type=_F32,
        ).astype(out_dtype)  # [T*B, len(cols)*B], the group's slice of the panel
        pieces.update({c: (g, p) for p, c in enumerate(cols)})
    p_TBxN = _assemble(pieces, nb, b, t * b, out_dtype)
    return p_TBxN.reshape(t, b, nb, b).transpose(2, 0, 1, 3)
