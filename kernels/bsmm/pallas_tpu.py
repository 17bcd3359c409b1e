"""Pallas block-sparse kernels for TPU (Mosaic), with scalar prefetch.

Dimension letters: x ``[M, K]``, W ``[K, N]`` (in-features x out-features), dY ``[M, N]``;
B the block size, Kb = K/B and Nb = N/B, T and R the column and row budgets (meta.py),
bm the row tile of M.

As in JAX's block-sparse TPU tutorial, the index lists are scalar-prefetched into SMEM and
the BlockSpec index maps read them, so the pipeline DMAs exactly the blocks named by the
metadata; the innermost grid axis walks a column's (row's) budget and accumulates in a VMEM
fp32 scratch:

    forward  grid (M/bm, Nb, T):  x block (i, kidx[j,s]), W block (kidx[j,s], j) -> y (i, j)
    dX       grid (M/bm, Kb, R):  dY block (i, nidx[k,s]), W block (k, nidx[k,s]) -> dx (i, k)
    dW       grid (Nb, T, M/bm):  x block (m, kidx[j,s]), dY block (m, j) -> compact (j, s)

The forward and dX are one kernel (``_panel_kernel``, W's block (e, j) or (j, e)
transposed), and every kernel runs the same zero / accumulate / store steps
(``_accumulate``). Padding entries repeat the previous block index, so the pipeline sees
no change and issues no copy, and ``pl.when(s < count)`` skips their compute. dW is written compact
(``[Nb*T, B, B]``) and scattered into the dense layout by XLA (common.scatter_blocks):
writing straight into dense dW would leave never-visited blocks uninitialised.

Compact weights (kernels/bsmm/compact.py: ``blocks[j, t]`` is W's block (kidx[j,t], j),
every slot live) run the same kernels, with only the index maps changed (``_walk``):

    compact_matmul    grid (M/bm, Nb, T): x block (i, kidx[j,t]), blocks[j, t] -> y (i, j)
    compact_matmul_t  grid (M/bm, Kb, R): slot s = row_slot[k, r]: dY block (i, s // T),
                      blocks slot s transposed -> dx (i, k)
    compact_sddmm     grid (Nb, T, M/bm): the dW kernel, every slot live; its compact
                      output is the result (no scatter, every block visited)

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
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b^T
_TN = (((0,), (0,)), ((), ()))  # dot_general dims of a^T @ b


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


def _accumulate(acc_ref, out_ref, product, *, first, live, last):
    """The reduction every kernel here runs along its innermost grid axis: zero the fp32
    scratch at the ``first`` step, add ``product()`` on ``live`` steps, store at ``last``."""

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
        acc_ref[...] += product()

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _panel_kernel(idx_ref, count_ref, a_ref, w_ref, out_ref, acc_ref, *, width: int, w_t: bool):
    """Output block (i, j) += ``a`` block @ W block (W^T block when ``w_t``: dX) for step s."""
    j, s = pl.program_id(1), pl.program_id(2)
    del idx_ref  # consumed by the index maps

    def product():
        if w_t:
            return lax.dot_general(a_ref[...], w_ref[...], _NT, preferred_element_type=_F32)
        return jnp.dot(a_ref[...], w_ref[...], preferred_element_type=_F32)

    _accumulate(acc_ref, out_ref, product, first=s == 0, live=s < count_ref[j],
                last=s == width - 1)


def _dw_kernel(kidx_ref, count_ref, x_ref, dy_ref, dw_ref, acc_ref, *, n_m: int):
    j, s, mi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    del kidx_ref

    def product():
        return lax.dot_general(x_ref[...], dy_ref[...], _TN, preferred_element_type=_F32)

    # Padding entries never accumulate, so they store a zero block.
    _accumulate(acc_ref, dw_ref, product, first=mi == 0, live=s < count_ref[j],
                last=mi == n_m - 1)


def _walk(a_MxP, w, w_block: tuple, w_at, idx_QbxW, count_Qb, out_dtype, *, b: int,
          w_t: bool, a_div: int = 1, name: str, interpret, block_m):
    """``[M, Q]``: output block (i, j) sums, over step s of list j (entry e = idx[j, s]),
    a's block (i, e // a_div) times W's block ``w_at(j, s, e)`` (of shape ``w_block``),
    transposed when ``w_t``; grid (M/bm, Qb, width), ``count_Qb[j]`` live steps."""
    m = a_MxP.shape[0]
    q, width = idx_QbxW.shape[0] * b, idx_QbxW.shape[1]
    bm = _tile_m(m, block_m)
    a_p = pad_rows(a_MxP, bm)

    def a_block(i, j, s, idx, cnt):
        e = idx[j * width + s]
        return i, (lax.div(e, a_div) if a_div > 1 else e)

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(a_p.shape[0] // bm, q // b, width),
        in_specs=[
            pl.BlockSpec((bm, b), a_block),
            pl.BlockSpec(w_block, lambda i, j, s, idx, cnt: w_at(j, s, idx[j * width + s])),
        ],
        out_specs=pl.BlockSpec((bm, b), lambda i, j, s, idx, cnt: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, b), _F32)],
    )
    out = pl.pallas_call(
        functools.partial(_panel_kernel, width=width, w_t=w_t),
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((a_p.shape[0], q), out_dtype),
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name=name,
    )(idx_QbxW.reshape(-1), count_Qb, a_p, w)
    return out[:m]


def _panels(a_MxP, w_KxN, meta: BlockMeta, out_dtype, *, w_t: bool, interpret=False,
            block_m=None):
    """``a @ W_sparse`` over the column view, or ``a @ W_sparse^T`` over the row view (``w_t``).

    ``a`` is ``[M, P]`` (P = K forward, N for dX), the result ``[M, Q]`` (Q = N or K): step
    s of output block j DMAs a's block (i, e) and W's block (e, j), or (j, e) for dX, with
    e = idx[j, s].
    """
    b = meta.block_size
    _check(b, interpret)

    def w_at(j, s, e):
        return (j, e) if w_t else (e, j)

    return _walk(a_MxP, w_KxN, (b, b), w_at, *meta.view(rows=w_t), out_dtype, b=b, w_t=w_t,
                 name="bsmm_dx_tpu" if w_t else "bsmm_fwd_tpu", interpret=interpret,
                 block_m=block_m)


# The backend interface: the forward walks the column view, dX the row view (W transposed).
matmul = functools.partial(_panels, w_t=False)
matmul_t = functools.partial(_panels, w_t=True)


def _dw_blocks(x_MxK, dy_MxN, kidx_NbxT, count_Nb, b: int, out_dtype, *, name: str,
               interpret, block_m):
    """``[Nb*T, B, B]``: block (j, t) = ``x[:, kidx[j,t]]^T @ dY[:, j]``, zero for padding."""
    m = x_MxK.shape[0]
    n = dy_MxN.shape[1]
    t = kidx_NbxT.shape[1]
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
    return pl.pallas_call(
        functools.partial(_dw_kernel, n_m=n_m),
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(((n // b) * t, b, b), out_dtype),
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name=name,
    )(kidx_NbxT.reshape(-1), count_Nb, x_p, dy_p)


def sddmm(x_MxK, dy_MxN, meta: BlockMeta, out_dtype, *, interpret=False, block_m=None):
    """Sampled dW on the real blocks only, returned in the dense layout (interface)."""
    b = meta.block_size
    _check(b, interpret)
    blocks = _dw_blocks(x_MxK, dy_MxN, meta.col_kidx_NbxT, meta.col_count_Nb, b, _F32,
                        name="bsmm_dw_tpu", interpret=interpret, block_m=block_m)
    return scatter_blocks(blocks, meta, out_dtype)


# ----------------------------------------------------------------------------------------
# Compact weights: ``blocks_NbxTxBxB`` and a ``kernels.bsmm.compact.CompactMeta``.


def _all_live(cmeta):
    return jnp.full((cmeta.kidx_NbxT.shape[0],), cmeta.kidx_NbxT.shape[1], jnp.int32)


def compact_matmul(x_MxK, blocks_NbxTxBxB, cmeta, out_dtype, *, interpret=False,
                   block_m=None):
    """``y = x @ W`` for a compact weight: step t of block column j DMAs ``blocks[j, t]``
    (interface)."""
    b = cmeta.block_size
    _check(b, interpret)
    return _walk(x_MxK, blocks_NbxTxBxB, (None, None, b, b), lambda j, s, e: (j, s, 0, 0),
                 cmeta.kidx_NbxT, _all_live(cmeta), out_dtype, b=b, w_t=False,
                 name="bsmm_fwd_compact_tpu", interpret=interpret, block_m=block_m)


def compact_matmul_t(dy_MxN, blocks_NbxTxBxB, cmeta, out_dtype, *, interpret=False,
                     block_m=None):
    """``dX = dY @ W^T`` for a compact weight: step r of K-row k takes slot s of the row
    view, dY's block s // T and ``blocks`` slot s transposed (interface)."""
    b = cmeta.block_size
    _check(b, interpret)
    nb, t = cmeta.kidx_NbxT.shape
    w = blocks_NbxTxBxB.reshape(nb * t, b, b)
    return _walk(dy_MxN, w, (None, b, b), lambda j, s, e: (e, 0, 0), cmeta.row_slot_KbxR,
                 cmeta.row_count_Kb, out_dtype, b=b, w_t=True, a_div=t,
                 name="bsmm_dx_compact_tpu", interpret=interpret, block_m=block_m)


def compact_sddmm(x_MxK, dy_MxN, cmeta, out_dtype, *, interpret=False, block_m=None):
    """``dblocks[j, t] = x[:, kidx[j,t]]^T @ dY[:, j]``, written compact (interface)."""
    b = cmeta.block_size
    _check(b, interpret)
    nb, t = cmeta.kidx_NbxT.shape
    blocks = _dw_blocks(x_MxK, dy_MxN, cmeta.kidx_NbxT, _all_live(cmeta), b, out_dtype,
                        name="bsmm_dw_compact_tpu", interpret=interpret, block_m=block_m)
    return blocks.reshape(nb, t, b, b)
