"""Pallas block-sparse kernels for TPU (Mosaic), with scalar prefetch.

As in JAX's block-sparse TPU tutorial, the index lists are scalar-prefetched into SMEM and
the BlockSpec index maps read them, so the pipeline DMAs exactly the blocks named by the
metadata; the innermost grid axis walks a column's (row's) budget and accumulates in a VMEM
fp32 scratch:

    forward  grid (M/bm, Nb, T):  x block (i, kidx[j,s]), W block (kidx[j,s], j) -> y (i, j)
    dX       grid (M/bm, Kb, R):  dY block (i, nidx[k,s]), W block (k, nidx[k,s]) -> dx (i, k)
    dW       grid (Nb, T, M/bm):  x block (m, kidx[j,s]), dY block (m, j) -> compact (j, s)

Padding entries repeat the previous block index, so the pipeline sees no change and issues
no copy, and ``pl.when(s < count)`` skips their compute. dW is written compact
(``[Nb*T, B, B]``) and scattered into the dense layout by XLA (shared with the GPU path):
writing straight into dense dW would leave never-visited blocks uninitialised.

On a real TPU, blocks must be lane-aligned: B a multiple of 128 (checked) and ``bm`` a
multiple of 16. In interpret mode (CPU tests) any supported B works.

Status: checked on CPU in interpret mode (values and gradients); not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.bsmm.meta import BlockMeta
from kernels.common import pad_rows, scatter_blocks

_F32 = jnp.float32


def _tile_m(m: int, block_m: int | None) -> int:
    bm = block_m or 256
    return min(bm, -(-m // 16) * 16)


def _check(b: int, interpret) -> None:
    if not interpret and b % 128:
        raise ValueError(
            f"pallas_tpu needs block_size % 128 == 0 on a TPU (got {b}): use "
            "block_size=128 or 256, or backend='xla'."
        )


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _fwd_kernel(kidx_ref, count_ref, x_ref, w_ref, y_ref, acc_ref, *, t: int):
    j, s = pl.program_id(1), pl.program_id(2)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(s < count_ref[j])
    def _():
        acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=_F32)

    @pl.when(s == t - 1)
    def _():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _dx_kernel(nidx_ref, count_ref, dy_ref, w_ref, dx_ref, acc_ref, *, r: int):
    k, s = pl.program_id(1), pl.program_id(2)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(s < count_ref[k])
    def _():
        acc_ref[...] += lax.dot_general(
            dy_ref[...], w_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=_F32
        )

    @pl.when(s == r - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(kidx_ref, count_ref, x_ref, dy_ref, dw_ref, acc_ref, *, n_m: int):
    j, s, mi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    del kidx_ref

    @pl.when(mi == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(s < count_ref[j])
    def _():
        acc_ref[...] += lax.dot_general(
            x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=_F32
        )

    @pl.when(mi == n_m - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def matmul(x_MxK, w_KxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Forward ``x @ W_sparse`` (backend interface)."""
    b = meta.block_size
    _check(b, interpret)
    m = x_MxK.shape[0]
    n = w_KxN.shape[1]
    t = meta.col_kidx_NbxT.shape[1]
    bm = _tile_m(m, block_m)
    x_p = pad_rows(x_MxK, bm)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(x_p.shape[0] // bm, n // b, t),
        in_specs=[
            pl.BlockSpec((bm, b), lambda i, j, s, kidx, cnt: (i, kidx[j * t + s])),
            pl.BlockSpec((b, b), lambda i, j, s, kidx, cnt: (kidx[j * t + s], j)),
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, j, s, kidx, cnt: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, b), _F32)],
    )
    y = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t),
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((x_p.shape[0], n), out_dtype),
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="bsmm_fwd_tpu",
    )(meta.col_kidx_NbxT.reshape(-1), meta.col_count_Nb, x_p, w_KxN)
    return y[:m]


def matmul_t(dy_MxN, w_KxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """dX = ``dY @ W_sparse^T`` over the row view (backend interface)."""
    b = meta.block_size
    _check(b, interpret)
    m = dy_MxN.shape[0]
    k = w_KxN.shape[0]
    r = meta.row_nidx_KbxR.shape[1]
    bm = _tile_m(m, block_m)
    dy_p = pad_rows(dy_MxN, bm)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(dy_p.shape[0] // bm, k // b, r),
        in_specs=[
            pl.BlockSpec((bm, b), lambda i, kk, s, nidx, cnt: (i, nidx[kk * r + s])),
            pl.BlockSpec((b, b), lambda i, kk, s, nidx, cnt: (kk, nidx[kk * r + s])),
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, kk, s, nidx, cnt: (i, kk)),
        scratch_shapes=[pltpu.VMEM((bm, b), _F32)],
    )
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, r=r),
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((dy_p.shape[0], k), out_dtype),
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="bsmm_dx_tpu",
    )(meta.row_nidx_KbxR.reshape(-1), meta.row_count_Kb, dy_p, w_KxN)
    return dx[:m]


def sddmm(x_MxK, dy_MxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Sampled dW on the real blocks only, returned in the dense layout (interface)."""
    b = meta.block_size
    _check(b, interpret)
    m = x_MxK.shape[0]
    n = dy_MxN.shape[1]
    t = meta.col_kidx_NbxT.shape[1]
    bm = _tile_m(m, block_m)
    x_p, dy_p = pad_rows(x_MxK, bm), pad_rows(dy_MxN, bm)
    n_m = x_p.shape[0] // bm

    # Padding entries pin the M index to 0 as well, so after one copy they stop moving data.
    def row(j, s, mi, cnt):
        return jnp.where(s < cnt[j], mi, 0)

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n // b, t, n_m),
        in_specs=[
            pl.BlockSpec(
                (bm, b), lambda j, s, mi, kidx, cnt: (row(j, s, mi, cnt), kidx[j * t + s])
            ),
            pl.BlockSpec((bm, b), lambda j, s, mi, kidx, cnt: (row(j, s, mi, cnt), j)),
        ],
        out_specs=pl.BlockSpec((None, b, b), lambda j, s, mi, kidx, cnt: (j * t + s, 0, 0)),
        scratch_shapes=[pltpu.VMEM((b, b), _F32)],
    )
    blocks = pl.pallas_call(
        functools.partial(_dw_kernel, n_m=n_m),
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(((n // b) * t, b, b), _F32),
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="bsmm_dw_tpu",
    )(meta.col_kidx_NbxT.reshape(-1), meta.col_count_Nb, x_p, dy_p)
    return scatter_blocks(blocks, meta, out_dtype)
