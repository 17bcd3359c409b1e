"""Pallas block-sparse attention for GPU (Triton lowering), FlashAttention-2 style.

Dimension letters: ``[G, L, D]`` (G = batch x heads, L sequence length, D head dimension);
B the block size, Lb = L // B. One program per (group, block). As for the matmul
(kernels/bsmm/pallas_gpu.py) the Triton lowering has no scalar prefetch (jax issue 18603), so
the block lists travel as int32 input refs, each program holds the whole ``[L, D]`` panel of the
operand it walks and slices the blocks it needs with ``pl.ds(pl.multiple_of(j * B, B), B)``,
and the loop trip count is the row's (column's) real entry count, so skipped blocks cost
nothing and padding is never touched:

    forward  grid (G, Lb):  online softmax over the row's key blocks -> o_i, lse_i
    dQ       grid (G, Lb):  dq_i  = sum_j (p_ij * (dO_i v_j^T - delta_i)) k_j * scale
    dK, dV   grid (G, Lb):  over the column's query blocks i:
                            dv_j += p_ij^T dO_i,  dk_j += ds_ij^T q_i * scale

``p`` is recomputed in the backward from the saved log-sum-exp; ``delta = rowsum(dO * O)``
is computed by XLA. The in-block mask is recomputed from the pattern on iota positions, so
no element mask is loaded. Triton wants power-of-two tiles: B is one by construction (16 ..
256), D should be one (16, 32, 64, 128) and the index arrays are padded to power-of-two
lengths.

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

from kernels.attention.meta import AttentionMeta
from kernels.common import flat_pow2

_F32 = jnp.float32
_NEG = -1e30


def _params(b: int, d: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=8 if b * d >= 128 * 128 else 4, num_stages=2)


def _positions(start: int | jax.Array, b: int, axis: int) -> jax.Array:
    return start + lax.broadcasted_iota(jnp.int32, (b, b), axis)


def _nt(a, b_):
    """``a @ b^T`` with fp32 accumulation."""
    return lax.dot_general(a, b_, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _tn(a, b_):
    """``a^T @ b`` with fp32 accumulation."""
    return lax.dot_general(a, b_, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _fwd_kernel(kidx_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, b, t, scale,
                mask_fn):
    i = pl.program_id(1)
    q = q_ref[...]
    q_pos = _positions(i * b, b, 0)

    def body(s_, carry):
        m, denom, acc = carry
        kb = kidx_ref[i * t + s_]
        start = pl.multiple_of(kb * b, b)
        s = _nt(q, k_ref[pl.ds(start, b), :]) * scale
        allowed = mask_fn(q_pos, _positions(kb * b, b, 1))
        m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, _NEG), axis=1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(start, b), :]
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)
        return m_new, denom * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((b,), _NEG, _F32), jnp.zeros((b,), _F32), jnp.zeros(o_ref.shape, _F32))
    m, denom, acc = lax.fori_loop(0, count_ref[i], body, init)
    l_safe = jnp.where(denom > 0, denom, 1.0)  # a row with no allowed key outputs zeros
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _dq_kernel(kidx_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, b, t, scale, mask_fn):
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = _positions(i * b, b, 0)

    def body(s_, acc):
        kb = kidx_ref[i * t + s_]
        start = pl.multiple_of(kb * b, b)
        k = k_ref[pl.ds(start, b), :]
        allowed = mask_fn(q_pos, _positions(kb * b, b, 1))
        p = jnp.where(allowed, jnp.exp(_nt(q, k) * scale - lse[:, None]), 0.0)
        ds = p * (_nt(do, v_ref[pl.ds(start, b), :]) - delta[:, None])
        return acc + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

    acc = lax.fori_loop(0, count_ref[i], body, jnp.zeros(dq_ref.shape, _F32))
    dq_ref[...] = (acc * scale).astype(dq_ref.dtype)


def _dkdv_kernel(qidx_ref, count_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, b, s_max, scale, mask_fn):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    k_pos = _positions(j * b, b, 1)

    def body(s_, carry):
        dk, dv = carry
        qb = qidx_ref[j * s_max + s_]
        start = pl.multiple_of(qb * b, b)
        q, do = q_ref[pl.ds(start, b), :], do_ref[pl.ds(start, b), :]
        lse, delta = lse_ref[pl.ds(start, b)], delta_ref[pl.ds(start, b)]
        allowed = mask_fn(_positions(qb * b, b, 0), k_pos)
        p = jnp.where(allowed, jnp.exp(_nt(q, k) * scale - lse[:, None]), 0.0)   # [Bq, Bk]
        dv = dv + _tn(p.astype(do.dtype), do)
        ds = p * (_nt(do, v) - delta[:, None])
        return dk + _tn(ds.astype(q.dtype), q), dv

    zeros = jnp.zeros(dk_ref.shape, _F32)
    dk, dv = lax.fori_loop(0, count_ref[j], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _row_spec(b, d):
    return pl.BlockSpec((None, b, d), lambda g, i: (g, i, 0))


def _panel_spec(seq_len, d):
    return pl.BlockSpec((None, seq_len, d), lambda g, i: (g, 0, 0))


def _index_specs(*arrays):
    return [pl.BlockSpec(a.shape, lambda g, i: (0,)) for a in arrays]


def forward(q_GxLxD, k_GxLxD, v_GxLxD, meta: AttentionMeta, mask_fn, scale, *,
            interpret=False):
    """``(out [G, L, D], lse [G, L] fp32)`` (backend interface)."""
    g, seq_len, d = q_GxLxD.shape
    b, lb = meta.block_size, seq_len // meta.block_size
    kidx, count = flat_pow2(meta.row_kidx_LbxT), flat_pow2(meta.row_count_Lb)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, b=b, t=meta.row_kidx_LbxT.shape[1], scale=scale,
                          mask_fn=mask_fn),
        grid=(g, lb),
        in_specs=[*_index_specs(kidx, count), _row_spec(b, d), _panel_spec(seq_len, d),
                  _panel_spec(seq_len, d)],
        out_specs=[_row_spec(b, d), pl.BlockSpec((None, b), lambda g_, i: (g_, i))],
        out_shape=[jax.ShapeDtypeStruct((g, seq_len, d), q_GxLxD.dtype),
                   jax.ShapeDtypeStruct((g, seq_len), _F32)],
        compiler_params=_params(b, d),
        interpret=interpret,
        name="bsattn_fwd",
    )(kidx, count, q_GxLxD, k_GxLxD, v_GxLxD)


def backward(q_GxLxD, k_GxLxD, v_GxLxD, lse_GxL, do_GxLxD, delta_GxL, meta: AttentionMeta,
             mask_fn, scale, *, interpret=False):
    """``(dq, dk, dv)`` in the input dtypes: a dQ kernel (rows) and a dK/dV kernel (columns)."""
    g, seq_len, d = q_GxLxD.shape
    b, lb = meta.block_size, seq_len // meta.block_size
    do = do_GxLxD.astype(q_GxLxD.dtype)
    vec_row = pl.BlockSpec((None, b), lambda g_, i: (g_, i))
    vec_panel = pl.BlockSpec((None, seq_len), lambda g_, i: (g_, 0))
    kidx, kcount = flat_pow2(meta.row_kidx_LbxT), flat_pow2(meta.row_count_Lb)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, b=b, t=meta.row_kidx_LbxT.shape[1], scale=scale,
                          mask_fn=mask_fn),
        grid=(g, lb),
        in_specs=[*_index_specs(kidx, kcount), _row_spec(b, d), _panel_spec(seq_len, d),
                  _panel_spec(seq_len, d), _row_spec(b, d), vec_row, vec_row],
        out_specs=_row_spec(b, d),
        out_shape=jax.ShapeDtypeStruct((g, seq_len, d), q_GxLxD.dtype),
        compiler_params=_params(b, d),
        interpret=interpret,
        name="bsattn_dq",
    )(kidx, kcount, q_GxLxD, k_GxLxD, v_GxLxD, do, lse_GxL, delta_GxL)
    qidx, qcount = flat_pow2(meta.col_qidx_LbxS), flat_pow2(meta.col_count_Lb)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, b=b, s_max=meta.col_qidx_LbxS.shape[1], scale=scale,
                          mask_fn=mask_fn),
        grid=(g, lb),
        in_specs=[*_index_specs(qidx, qcount), _row_spec(b, d), _row_spec(b, d),
                  _panel_spec(seq_len, d), _panel_spec(seq_len, d), vec_panel, vec_panel],
        out_specs=[_row_spec(b, d), _row_spec(b, d)],
        out_shape=[jax.ShapeDtypeStruct((g, seq_len, d), k_GxLxD.dtype),
                   jax.ShapeDtypeStruct((g, seq_len, d), v_GxLxD.dtype)],
        compiler_params=_params(b, d),
        interpret=interpret,
        name="bsattn_dkdv",
    )(qidx, qcount, k_GxLxD, v_GxLxD, q_GxLxD, do, lse_GxL, delta_GxL)
    return dq, dk, dv
