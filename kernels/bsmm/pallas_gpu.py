"""Pallas block-sparse kernels for GPU (Triton lowering).

The Triton lowering has no scalar prefetch (jax issue 18603), so the metadata travels as
ordinary int32 input refs read inside the kernel, and each kernel loops over its row or
column's real entries with a data-dependent trip count (padding is never touched):

    forward  grid (M/bm, Nb):  y[i, j]  = sum_{t < count[j]} x[i, kidx[j,t]] @ W[kidx[j,t], j]
    dX       grid (M/bm, Kb):  dx[i, k] = sum_{r < count[k]} dY[i, nidx[k,r]] @ W[k, nidx[k,r]]^T
    dW       grid (Nb, T):     block (j, t) = x[:, kidx[j,t]]^T @ dY[:, j], reduced over M

Each program holds a whole x row-panel (``bm x K``) or W column-panel (``K x B``) as its
block and slices the needed B-wide block with ``pl.ds(pl.multiple_of(k * B, B), B)``; only
those slices are loaded. dW comes out compact (``[Nb*T, B, B]``, padding blocks zero) and
is scattered into the dense layout by XLA, because a Triton output BlockSpec cannot depend
on a runtime index. Triton wants power-of-two tiles: B is one by construction, ``bm`` is
chosen as one, M is zero-padded to a multiple of ``bm`` and the index arrays are padded to
power-of-two lengths.

Status: checked on CPU in interpret mode (values and gradients) and by lowering to Triton
IR with ``lowering_platforms=("cuda",)``; not yet compiled or timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.bsmm.meta import BlockMeta
from kernels.common import flat_pow2, next_pow2, pad_rows, scatter_blocks

_F32 = jnp.float32


def _tile_m(m: int, block_m: int | None) -> int:
    bm = block_m or 64
    return max(16, min(bm, next_pow2(m)))


def _params(b: int) -> plgpu.CompilerParams:
    # A bm x B fp32 accumulator: 8 warps keep it in registers for B >= 128.
    return plgpu.CompilerParams(num_warps=8 if b >= 128 else 4, num_stages=2)


def _fwd_kernel(kidx_ref, count_ref, x_ref, w_ref, y_ref, *, b: int, t: int):
    j = pl.program_id(1)

    def body(i, acc):
        start = pl.multiple_of(kidx_ref[j * t + i] * b, b)
        x_blk = x_ref[:, pl.ds(start, b)]
        w_blk = w_ref[pl.ds(start, b), :]
        return acc + jnp.dot(x_blk, w_blk, preferred_element_type=_F32)

    acc = lax.fori_loop(0, count_ref[j], body, jnp.zeros(y_ref.shape, _F32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _dx_kernel(nidx_ref, count_ref, dy_ref, w_ref, dx_ref, *, b: int, r: int):
    k = pl.program_id(1)

    def body(i, acc):
        start = pl.multiple_of(nidx_ref[k * r + i] * b, b)
        dy_blk = dy_ref[:, pl.ds(start, b)]
        w_blk = w_ref[:, pl.ds(start, b)]
        return acc + lax.dot_general(
            dy_blk, w_blk, (((1,), (1,)), ((), ())), preferred_element_type=_F32
        )

    acc = lax.fori_loop(0, count_ref[k], body, jnp.zeros(dx_ref.shape, _F32))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _dw_kernel(kidx_ref, count_ref, x_ref, dy_ref, dw_ref, *, b: int, t: int, bm: int, n_m: int):
    j, s = pl.program_id(0), pl.program_id(1)
    start = pl.multiple_of(kidx_ref[j * t + s] * b, b)

    def body(mi, acc):
        rows = pl.ds(pl.multiple_of(mi * bm, bm), bm)
        x_blk = x_ref[rows, pl.ds(start, b)]
        dy_blk = dy_ref[rows, :]
        return acc + lax.dot_general(
            x_blk, dy_blk, (((0,), (0,)), ((), ())), preferred_element_type=_F32
        )

    # Padding entries run zero iterations and store a zero block.
    n_iter = jnp.where(s < count_ref[j], n_m, 0)
    acc = lax.fori_loop(0, n_iter, body, jnp.zeros(dw_ref.shape, _F32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def matmul(x_MxK, w_KxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Forward ``x @ W_sparse`` (backend interface)."""
    b = meta.block_size
    m, k = x_MxK.shape
    n = w_KxN.shape[1]
    t = meta.col_kidx_NbxT.shape[1]
    bm = _tile_m(m, block_m)
    x_p = pad_rows(x_MxK, bm)
    kidx, count = flat_pow2(meta.col_kidx_NbxT), flat_pow2(meta.col_count_Nb)
    y = pl.pallas_call(
        functools.partial(_fwd_kernel, b=b, t=t),
        grid=(x_p.shape[0] // bm, n // b),
        in_specs=[
            pl.BlockSpec(kidx.shape, lambda i, j: (0,)),
            pl.BlockSpec(count.shape, lambda i, j: (0,)),
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, b), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x_p.shape[0], n), out_dtype),
        compiler_params=_params(b),
        interpret=interpret,
        name="bsmm_fwd",
    )(kidx, count, x_p, w_KxN)
    return y[:m]


def matmul_t(dy_MxN, w_KxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """dX = ``dY @ W_sparse^T`` over the row view (backend interface)."""
    b = meta.block_size
    m, n = dy_MxN.shape
    k = w_KxN.shape[0]
    r = meta.row_nidx_KbxR.shape[1]
    bm = _tile_m(m, block_m)
    dy_p = pad_rows(dy_MxN, bm)
    nidx, count = flat_pow2(meta.row_nidx_KbxR), flat_pow2(meta.row_count_Kb)
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, b=b, r=r),
        grid=(dy_p.shape[0] // bm, k // b),
        in_specs=[
            pl.BlockSpec(nidx.shape, lambda i, kk: (0,)),
            pl.BlockSpec(count.shape, lambda i, kk: (0,)),
            pl.BlockSpec((bm, n), lambda i, kk: (i, 0)),
            pl.BlockSpec((b, n), lambda i, kk: (kk, 0)),
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, kk: (i, kk)),
        out_shape=jax.ShapeDtypeStruct((dy_p.shape[0], k), out_dtype),
        compiler_params=_params(b),
        interpret=interpret,
        name="bsmm_dx",
    )(nidx, count, dy_p, w_KxN)
    return dx[:m]


def sddmm(x_MxK, dy_MxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Sampled dW on the real blocks only, returned in the dense layout (interface)."""
    b = meta.block_size
    m, k = x_MxK.shape
    n = dy_MxN.shape[1]
    t = meta.col_kidx_NbxT.shape[1]
    bm = _tile_m(m, block_m)
    x_p, dy_p = pad_rows(x_MxK, bm), pad_rows(dy_MxN, bm)  # zero rows add nothing
    mp = x_p.shape[0]
    kidx, count = flat_pow2(meta.col_kidx_NbxT), flat_pow2(meta.col_count_Nb)
    blocks = pl.pallas_call(
        functools.partial(_dw_kernel, b=b, t=t, bm=bm, n_m=mp // bm),
        grid=(n // b, t),
        in_specs=[
            pl.BlockSpec(kidx.shape, lambda j, s: (0,)),
            pl.BlockSpec(count.shape, lambda j, s: (0,)),
            pl.BlockSpec((mp, k), lambda j, s: (0, 0)),
            pl.BlockSpec((mp, b), lambda j, s: (0, j)),
        ],
        out_specs=pl.BlockSpec((None, b, b), lambda j, s: (j * t + s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(((n // b) * t, b, b), _F32),
        compiler_params=_params(b),
        interpret=interpret,
        name="bsmm_dw",
    )(kidx, count, x_p, dy_p)
    return scatter_blocks(blocks, meta, out_dtype)
