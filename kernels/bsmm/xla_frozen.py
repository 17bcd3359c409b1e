"""Pure-XLA block-sparse products for a trace-time topology (``FrozenBlockMeta``).

The mask is Python data, so the products of kernels/bsmm/xla.py are written with static
slices: columns (rows for dX) with the same K-block set share one GEMM, and contiguous block
runs coalesce into one slice. ``frozen_compact_*`` are the same for the compact layout
(kernels/bsmm/compact.py), whose slots are then the ascending live K-blocks. Dimension
letters as in kernels/bsmm/xla.py.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.bsmm.meta import FrozenBlockMeta

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b^T


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
    pieces: dict[int, tuple[jax.Array, int]], n_cols: int, b: int, m: int, dtype, axis: int = 1
) -> jax.Array:
    """Concatenates per-block slices (group output, position) in block order along ``axis``
    (1: block columns of ``[m, n_cols*B]``; 0: block rows of ``[n_cols*B, m]``)."""
    parts, c = [], 0
    while c < n_cols:
        if c not in pieces:
            e = c
            while e < n_cols and e not in pieces:
                e += 1
            shape = (m, (e - c) * b) if axis == 1 else ((e - c) * b, m)
            parts.append(jnp.zeros(shape, dtype))
        else:
            arr, p = pieces[c]
            e = c + 1
            while e < n_cols and e in pieces and pieces[e][0] is arr and pieces[e][1] == p + e - c:
                e += 1
            parts.append(lax.slice_in_dim(arr, p * b, (p + e - c) * b, axis=axis))
        c = e
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


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
        # Along axis 0, with no transposes: XLA then computes g as the compact layout does
        # (frozen_compact_sddmm), so the two layouts' dW are equal bit for bit.
        slab = _assemble({r: (g, p) for p, r in enumerate(rows)}, k // b, b, g.shape[1],
                         out_dtype, axis=0)
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
