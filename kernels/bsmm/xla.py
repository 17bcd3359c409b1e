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

Small shapes are the exception: there each scan step's GEMM is too small to pay for the
step, so a gathered slab of at most 8 MB (and Kb <= 2B) takes the batched formulation of the
same products instead: one gather of x's blocks, batch-major ``[Nb, M, T*B]``, one batched
GEMM; dX adds each slot's block into its K-block by a one-hot GEMM (at most 2x the product's
FLOPs). Fwd + bwd of one layer's four kernels, M=2048, 2-core CPU: d_model 128 at 75% /
87.5%, scan 30.4 / 26.8 ms, batched 23.1 / 18.2 ms; d_model 512, scan 118 / 135 ms,
batched 169 / 161 ms.

Padding entries (a column with fewer than T blocks) repeat a real K-block; their weight
block is zero (forward, dX) and their dW block is dropped when dW is densified, so they
contribute nothing. A full column budget (T == Kb) falls back to the dense masked products,
which are faster than gathering every block (0.5x dense).

Frozen metadata (``FrozenBlockMeta``): the mask is Python data, so the same products are
written with static slices (kernels/bsmm/xla_frozen.py).

Compact layout (kernels/bsmm/compact.py: ``blocks_NbxTxBxB`` + ``kidx_NbxT``, every slot
live): the core above (scan or batched) serves both layouts. The dense layout gathers W's
blocks into ``[Nb, T*B, B]`` (padding zeroed) and scatters dW's per-column output back into
``[K, N]``; the compact layout hands its blocks to the same scan as a reshape (no gather of
W) and its dblocks are the core's per-column ``[T*B, B]`` output reshaped to
``[Nb, T, B, B]`` (no dense dW).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels.bsmm.compact import CompactMeta, densify_blocks, gather_blocks
from kernels.bsmm.meta import BlockMeta

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


# The core, shared by both layouts: ``w_NbxTBxB`` holds column j's T blocks stacked along K
# (zero blocks contribute nothing), ``kidx_NbxT`` their K-blocks. Two formulations of it:
# the column scan (one GEMM per output block column, Nb sequential steps) and the batched
# one (x's blocks gathered for all columns at once, one batched GEMM); ``_use_batched``
# picks per shape.


def _use_batched(m: int, k: int, kidx_NbxT, b: int) -> bool:
    """Whether the batched formulation runs: when its gathered ``[Nb, M, T*B]`` slab is small
    (at most _BATCHED_MAX_BYTES of fp32), the scan's per-step cost would dominate; and
    Kb <= 2B, so that dX's one-hot GEMM costs at most twice the product."""
    nb, t = kidx_NbxT.shape
    return 4 * m * nb * t * b <= _BATCHED_MAX_BYTES and k // b <= 2 * b


_BATCHED_MAX_BYTES = 8 << 20


def _by_column(a_MxN, b: int) -> jax.Array:
    """``[M, N]`` -> ``[Nb, M, B]``: the block columns as a leading batch axis."""
    m, n = a_MxN.shape
    return a_MxN.reshape(m, n // b, b).transpose(1, 0, 2)


def _from_columns(a_NbxMxB) -> jax.Array:
    """``[Nb, M, B]`` -> ``[M, N]``: the inverse of ``_by_column``."""
    nb, m, b = a_NbxMxB.shape
    return a_NbxMxB.transpose(1, 0, 2).reshape(m, nb * b)


def _x_blocks(x_MxK, kidx_NbxT, b: int) -> jax.Array:
    """x's K-blocks of every (column, slot), batch-major: ``[Nb, M, T*B]``, one gather."""
    m = x_MxK.shape[0]
    nb, t = kidx_NbxT.shape
    g_NbTxMxB = jnp.take(_by_column(x_MxK, b), kidx_NbxT.reshape(-1), axis=0, mode="clip")
    if t == 1:
        return g_NbTxMxB
    return g_NbTxMxB.reshape(nb, t, m, b).transpose(0, 2, 1, 3).reshape(nb, m, t * b)


# Batch-major operands (the batch axis leading in both) keep XLA from adding transposes.
_BATCH_NN = (((2,), (1,)), ((0,), (0,)))    # [n, m, k] x [n, k, c] -> [n, m, c]
_BATCH_NT = (((2,), (2,)), ((0,), (0,)))    # [n, m, c] x [n, k, c] -> [n, m, k]
_BATCH_TN = (((1,), (1,)), ((0,), (0,)))    # [n, m, k] x [n, m, c] -> [n, k, c]


def _batched_matmul(x_MxK, w_NbxTBxB, kidx_NbxT, b: int, out_dtype) -> jax.Array:
    y_NbxMxB = lax.dot_general(_x_blocks(x_MxK, kidx_NbxT, b), w_NbxTBxB, _BATCH_NN,
                               preferred_element_type=_F32)
    return _from_columns(y_NbxMxB).astype(out_dtype)


def _batched_matmul_t(dy_MxN, w_NbxTBxB, kidx_NbxT, b: int, k: int, out_dtype) -> jax.Array:
    m = dy_MxN.shape[0]
    nb, t = kidx_NbxT.shape
    c_NbxMxTB = lax.dot_general(_by_column(dy_MxN, b), w_NbxTBxB, _BATCH_NT,
                                preferred_element_type=_F32)
    c_NbTxMB = c_NbxMxTB.reshape(nb, m, t, b).transpose(0, 2, 1, 3).reshape(nb * t, m * b)
    # Each (column, slot) block adds into its K-block: a one-hot GEMM over the Nb*T slots
    # (XLA:CPU's scatter-add was slower); HIGHEST keeps the fp32 partials unrounded on TPU.
    onehot_KbxNbT = (jnp.arange(k // b)[:, None] == kidx_NbxT.reshape(-1)[None, :]).astype(_F32)
    dx_KbxMB = jnp.dot(onehot_KbxNbT, c_NbTxMB, precision=lax.Precision.HIGHEST,
                       preferred_element_type=_F32)
    return _from_columns(dx_KbxMB.reshape(k // b, m, b)).astype(out_dtype)


def _batched_sddmm(x_MxK, dy_MxN, kidx_NbxT, b: int, out_dtype) -> jax.Array:
    g_NbxTBxB = lax.dot_general(_x_blocks(x_MxK, kidx_NbxT, b), _by_column(dy_MxN, b),
                                _BATCH_TN, preferred_element_type=_F32)
    return g_NbxTBxB.astype(out_dtype)


def _x_cols(x_MxK, kidx_T, b: int) -> jax.Array:
    """``x[:, kidx]`` as ``[M, T*B]``: T dynamic slices (XLA:CPU's gather was 1.1-1.4x slower)."""
    parts = [lax.dynamic_slice_in_dim(x_MxK, kidx_T[i] * b, b, axis=1)
             for i in range(kidx_T.shape[0])]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _cols_matmul(x_MxK, w_NbxTBxB, kidx_NbxT, b: int, out_dtype) -> jax.Array:
    """``y[:, j] = x[:, kidx[j]] @ w[j]``: ``[M, N]``, one GEMM per output block column (or
    the batched formulation, see ``_use_batched``)."""
    m = x_MxK.shape[0]
    nb = kidx_NbxT.shape[0]
    if _use_batched(m, x_MxK.shape[1], kidx_NbxT, b):
        return _batched_matmul(x_MxK, w_NbxTBxB, kidx_NbxT, b, out_dtype)

    def column(y_MxN, j_kidx_w):
        j, kidx_T, w_TBxB = j_kidx_w
        y_MxB = jnp.dot(_x_cols(x_MxK, kidx_T, b), w_TBxB, preferred_element_type=_F32)
        # Written in place into the carry: stacking [Nb, M, B] and transposing cost a copy.
        return lax.dynamic_update_slice_in_dim(y_MxN, y_MxB.astype(out_dtype), j * b, 1), None

    y0 = jnp.zeros((m, nb * b), out_dtype)
    y_MxN, _ = lax.scan(column, y0, (jnp.arange(nb), kidx_NbxT, w_NbxTBxB))
    return y_MxN


def _cols_matmul_t(dy_MxN, w_NbxTBxB, kidx_NbxT, b: int, k: int, out_dtype) -> jax.Array:
    """``dX[:, kidx[j]] += dY[:, j] @ w[j]^T`` scatter-added over the columns: ``[M, K]`` (or
    the batched formulation)."""
    m = dy_MxN.shape[0]
    nb, t = kidx_NbxT.shape
    if _use_batched(m, k, kidx_NbxT, b):
        return _batched_matmul_t(dy_MxN, w_NbxTBxB, kidx_NbxT, b, k, out_dtype)

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
    """``x[:, kidx[j]]^T @ dY[:, j]`` per output block column: ``[Nb, T*B, B]`` (or the
    batched formulation)."""
    nb = kidx_NbxT.shape[0]
    if _use_batched(*x_MxK.shape, kidx_NbxT, b):
        return _batched_sddmm(x_MxK, dy_MxN, kidx_NbxT, b, out_dtype)

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
