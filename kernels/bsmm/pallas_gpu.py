"""Pallas block-sparse kernels for GPU (Triton lowering).

Dimension letters: x ``[M, K]``, W ``[K, N]`` (in-features x out-features), dY ``[M, N]``;
B the block size, Kb = K/B and Nb = N/B, T and R the column and row budgets (meta.py),
bm the row tile of M.

The Triton lowering has no scalar prefetch (jax issue 18603), so the metadata travels as
ordinary int32 input refs read inside the kernel, and each kernel loops over its row or
column's real entries with a data-dependent trip count (padding is never touched):

    forward  grid (M/bm, Nb):  y[i, j]  = sum_{t < count[j]} x[i, kidx[j,t]] @ W[kidx[j,t], j]
    dX       grid (M/bm, Kb):  dx[i, k] = sum_{r < count[k]} dY[i, nidx[k,r]] @ W[k, nidx[k,r]]^T
    dW       grid (Nb, T):     block (j, t) = x[:, kidx[j,t]]^T @ dY[:, j], reduced over M

The forward and dX are one kernel (``_panel_kernel``): both walk one index list per output
block column, and a ``_Walk`` says where step r (entry e of the list) finds its two blocks:
a's block e (or e // T) and W's block at e or at r, taken as is or transposed. Each program
holds a whole x row-panel (``bm x K``) and a W panel as its blocks and slices the needed
B-wide block with ``pl.ds(pl.multiple_of(k * B, B), B)``; only those slices are loaded.
dW comes out compact (``[Nb*T, B, B]``, padding blocks zero) and is scattered into the
dense layout by XLA, because a Triton output BlockSpec cannot depend on a runtime index.
Triton wants power-of-two tiles: B is one by construction, ``bm`` is chosen as one, M is
zero-padded to a multiple of ``bm`` and the index arrays are padded to power-of-two lengths.

Compact weights (kernels/bsmm/compact.py: ``blocks[j, t]`` is W's block (kidx[j,t], j),
every slot live) run the same two kernels on ``blocks`` viewed as ``[Nb*T*B, B]``:

    compact_matmul    forward: panel j is column j's T blocks, step t takes block t of it
    compact_matmul_t  dX: the row view's slot s = j*T + t gives dY's block s // T and the
                      compact block s, transposed
    compact_sddmm     dW: the dW kernel with every slot live; its compact output is the result

Status: checked on CPU in interpret mode (values and gradients) and by lowering to Triton
IR with ``lowering_platforms=("cuda",)``; not yet compiled or timed on a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.bsmm.meta import BlockMeta
from kernels.common import flat_pow2, next_pow2, pad_rows, scatter_blocks

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # dot_general dims of a @ b
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b^T
_TN = (((0,), (0,)), ((), ()))  # dot_general dims of a^T @ b


def _tile_m(m: int, block_m: int | None) -> int:
    bm = block_m or 64
    return max(16, min(bm, next_pow2(m)))


def _params(b: int) -> plgpu.CompilerParams:
    # A bm x B fp32 accumulator: 8 warps keep it in registers for B >= 128.
    return plgpu.CompilerParams(num_warps=8 if b >= 128 else 4, num_stages=2)


class _Walk(NamedTuple):
    """Where step r of an index list (entry e) finds its blocks (static).

    a's block is ``e // a_div``; W's block is B rows (B columns with ``w_cols``) of the W ref
    at block r (``w_step``) or e, multiplied as is or transposed (``nt``).
    """

    a_div: int = 1
    w_step: bool = False
    w_cols: bool = False
    nt: bool = False


_FWD = _Walk()                     # x[:, e] @ W's column panel j, rows e
_DX = _Walk(w_cols=True, nt=True)  # dY[:, e] @ (W's row panel j, columns e)^T
_COMPACT_FWD = _Walk(w_step=True)  # x[:, e] @ compact panel j, block t = r


def _at(e, b: int):
    return pl.ds(pl.multiple_of(e * b, b), b)


def _panel_kernel(idx_ref, count_ref, a_ref, w_ref, out_ref, *, b: int, width: int,
                  walk: _Walk):
    """Output block (i, j) = sum over list j's real entries e of ``a[i, e] @ W_blk``."""
    j = pl.program_id(1)

    def body(r, acc):
        e = idx_ref[j * width + r]
        a_blk = a_ref[:, _at(lax.div(e, walk.a_div) if walk.a_div > 1 else e, b)]
        w_at = _at(r if walk.w_step else e, b)
        w_blk = w_ref[:, w_at] if walk.w_cols else w_ref[w_at, :]
        dims = _NT if walk.nt else _NN
        return acc + lax.dot_general(a_blk, w_blk, dims, preferred_element_type=_F32)

    acc = lax.fori_loop(0, count_ref[j], body, jnp.zeros(out_ref.shape, _F32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _dw_kernel(kidx_ref, count_ref, x_ref, dy_ref, dw_ref, *, b: int, t: int, bm: int, n_m: int):
    j, s = pl.program_id(0), pl.program_id(1)
    start = pl.multiple_of(kidx_ref[j * t + s] * b, b)

    def body(mi, acc):
        rows = pl.ds(pl.multiple_of(mi * bm, bm), bm)
        x_blk = x_ref[rows, pl.ds(start, b)]
        dy_blk = dy_ref[rows, :]
        return acc + lax.dot_general(x_blk, dy_blk, _TN, preferred_element_type=_F32)

    # Padding entries run zero iterations and store a zero block.
    n_iter = jnp.where(s < count_ref[j], n_m, 0)
    acc = lax.fori_loop(0, n_iter, body, jnp.zeros(dw_ref.shape, _F32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _walk(a_MxP, w, w_spec: pl.BlockSpec, idx_QbxW, count_Qb, walk: _Walk, out_dtype, *,
          b: int, name: str, interpret, block_m):
    """``[M, Q]``: program (i, j) sums ``_panel_kernel``'s products over list j of
    ``idx_QbxW`` (``count_Qb[j]`` real entries), holding a's row tile i and W's ``w_spec``."""
    m, p = a_MxP.shape
    q = idx_QbxW.shape[0] * b
    bm = _tile_m(m, block_m)
    a_p = pad_rows(a_MxP, bm)
    idx, count = flat_pow2(idx_QbxW), flat_pow2(count_Qb)
    out = pl.pallas_call(
        functools.partial(_panel_kernel, b=b, width=idx_QbxW.shape[1], walk=walk),
        grid=(a_p.shape[0] // bm, q // b),
        in_specs=[
            pl.BlockSpec(idx.shape, lambda i, j: (0,)),
            pl.BlockSpec(count.shape, lambda i, j: (0,)),
            pl.BlockSpec((bm, p), lambda i, j: (i, 0)),
            w_spec,
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((a_p.shape[0], q), out_dtype),
        compiler_params=_params(b),
        interpret=interpret,
        name=name,
    )(idx, count, a_p, w)
    return out[:m]


def _panels(a_MxP, w_KxN, meta: BlockMeta, out_dtype, *, w_t: bool, interpret=False,
            block_m=None):
    """``a @ W_sparse`` over the column view, or ``a @ W_sparse^T`` over the row view (``w_t``).

    ``a`` is ``[M, P]`` (P = K forward, N for dX) and the result ``[M, Q]`` (Q = N forward,
    K for dX; one index list per output block column); program (i, j) holds a's row tile
    and W's panel j.
    """
    b = meta.block_size
    k, n = w_KxN.shape
    if w_t:  # dX: output block j is W's row panel j
        w_spec = pl.BlockSpec((b, n), lambda i, j: (j, 0))
    else:  # forward: output block j is W's column panel j
        w_spec = pl.BlockSpec((k, b), lambda i, j: (0, j))
    return _walk(a_MxP, w_KxN, w_spec, *meta.view(rows=w_t), _DX if w_t else _FWD, out_dtype,
                 b=b, name="bsmm_dx" if w_t else "bsmm_fwd", interpret=interpret,
                 block_m=block_m)


# The backend interface: the forward walks the column view, dX the row view (W transposed).
matmul = functools.partial(_panels, w_t=False)
matmul_t = functools.partial(_panels, w_t=True)


def _dw_blocks(x_MxK, dy_MxN, kidx_NbxT, count_Nb, b: int, out_dtype, *, name: str,
               interpret, block_m):
    """``[Nb*T, B, B]``: block (j, t) = ``x[:, kidx[j,t]]^T @ dY[:, j]``, zero for padding."""
    m, k = x_MxK.shape
    n = dy_MxN.shape[1]
    t = kidx_NbxT.shape[1]
    bm = _tile_m(m, block_m)
    x_p, dy_p = pad_rows(x_MxK, bm), pad_rows(dy_MxN, bm)  # zero rows add nothing
    mp = x_p.shape[0]
    kidx, count = flat_pow2(kidx_NbxT), flat_pow2(count_Nb)
    return pl.pallas_call(
        functools.partial(_dw_kernel, b=b, t=t, bm=bm, n_m=mp // bm),
        grid=(n // b, t),
        in_specs=[
            pl.BlockSpec(kidx.shape, lambda j, s: (0,)),
            pl.BlockSpec(count.shape, lambda j, s: (0,)),
            pl.BlockSpec((mp, k), lambda j, s: (0, 0)),
            pl.BlockSpec((mp, b), lambda j, s: (0, j)),
        ],
        out_specs=pl.BlockSpec((None, b, b), lambda j, s: (j * t + s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(((n // b) * t, b, b), out_dtype),
        compiler_params=_params(b),
        interpret=interpret,
        name=name,
    )(kidx, count, x_p, dy_p)


def sddmm(x_MxK, dy_MxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Sampled dW on the real blocks only, returned in the dense layout (interface)."""
    blocks = _dw_blocks(x_MxK, dy_MxN, meta.col_kidx_NbxT, meta.col_count_Nb, meta.block_size,
                        _F32, name="bsmm_dw", interpret=interpret, block_m=block_m)
    return scatter_blocks(blocks, meta, out_dtype)


# ----------------------------------------------------------------------------------------
# Compact weights: ``blocks_NbxTxBxB`` and a ``kernels.bsmm.compact.CompactMeta``.


def _flat(blocks_NbxTxBxB):
    """``[Nb, T, B, B]`` -> ``[Nb*T*B, B]``: slot s = j*T + t is rows ``s*B .. s*B+B``."""
    nb, t, b, _ = blocks_NbxTxBxB.shape
    return blocks_NbxTxBxB.reshape(nb * t * b, b)


def compact_matmul(x_MxK, blocks_NbxTxBxB, cmeta, out_dtype, *, interpret=False,
                   block_m=None):
    """``y = x @ W`` for a compact weight: output block j sums its T slots (interface)."""
    b, (nb, t) = cmeta.block_size, cmeta.kidx_NbxT.shape
    w_spec = pl.BlockSpec((t * b, b), lambda i, j: (j, 0))  # column j's T blocks
    return _walk(x_MxK, _flat(blocks_NbxTxBxB), w_spec, cmeta.kidx_NbxT,
                 jnp.full((nb,), t, jnp.int32), _COMPACT_FWD, out_dtype, b=b,
                 name="bsmm_fwd_compact", interpret=interpret, block_m=block_m)


def compact_matmul_t(dy_MxN, blocks_NbxTxBxB, cmeta, out_dtype, *, interpret=False,
                     block_m=None):
    """``dX = dY @ W^T`` for a compact weight, over the row view's slots (interface)."""
    b, t = cmeta.block_size, cmeta.kidx_NbxT.shape[1]
    w = _flat(blocks_NbxTxBxB)
    w_spec = pl.BlockSpec(w.shape, lambda i, j: (0, 0))  # any slot may feed any row
    return _walk(dy_MxN, w, w_spec, cmeta.row_slot_KbxR, cmeta.row_count_Kb,
                 _Walk(a_div=t, nt=True), out_dtype, b=b, name="bsmm_dx_compact",
                 interpret=interpret, block_m=block_m)


def compact_sddmm(x_MxK, dy_MxN, cmeta, out_dtype, *, interpret=False, block_m=None):
    """``dblocks[j, t] = x[:, kidx[j,t]]^T @ dY[:, j]``, written compact (interface)."""
    b, (nb, t) = cmeta.block_size, cmeta.kidx_NbxT.shape
    blocks = _dw_blocks(x_MxK, dy_MxN, cmeta.kidx_NbxT, jnp.full((nb,), t, jnp.int32), b,
                        out_dtype, name="bsmm_dw_compact", interpret=interpret,
                        block_m=block_m)
    return blocks.reshape(nb, t, b, b)
