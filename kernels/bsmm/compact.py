"""Compact layout of a column-balanced block-sparse weight: only its live blocks are stored.

Dimension letters as in meta.py (W ``[K, N]``, B the block size, ``Kb = K // B``,
``Nb = N // B``), plus T, the live blocks of every output block column, and R the width of
the row view. A weight with exactly T live blocks in each output block column is held as

    blocks_NbxTxBxB[j, t] = W[kidx[j, t]*B : (kidx[j, t]+1)*B, j*B : (j+1)*B]
    kidx_NbxT             int32, the K-block of slot t of column j

Slots are distinct within a column and may come in any order: the initial order is
ascending (``compact_index``), and a dynamic method that replaces a block overwrites its slot
in place, so the order drifts. Every slot is live (no padding, no counts), so the products
need no masking and their gradients come out in the same ``[Nb, T, B, B]`` shape; a dense
``[K, N]`` copy is never built (``densify_blocks`` gives one for tests and checkpoints).

``CompactMeta`` adds the row view the Pallas dX kernels walk (which slots feed K-block row
i), padded like meta.py's views: entries ``r >= row_count_Kb[i]`` repeat the row's last real
slot (0 for an empty row) and kernels skip or zero them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.bsmm.meta import FrozenBlockMeta
from kernels.common import check_block_size


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def compact_index(block_mask_KbxNb, slots: int) -> jax.Array:
    """Each output block column's live K-blocks in ascending order: ``int32 [Nb, T]``.

    A concrete mask (numpy or a concrete array) must hold exactly ``slots`` live blocks in
    every column. A traced one cannot be checked: each column takes its first ``slots`` live
    K-blocks (lowest index first); a column with fewer is filled up with its lowest-index
    dead K-blocks, so slots stay distinct and ascending (those blocks then become live).

    Args:
      block_mask_KbxNb: ``[Kb, Nb]`` block mask, non-zero means live.
      slots: T, static.

    Returns:
      ``int32 [Nb, T]``, ascending along T.

    Raises:
      ValueError: a concrete mask with a column whose count is not ``slots``, or ``slots``
        outside ``[1, Kb]``.
    """
    kb = block_mask_KbxNb.shape[0]
    if not 1 <= slots <= kb:
        raise ValueError(f"slots={slots} must be in [1, Kb={kb}] (live K-blocks per column).")
    if _is_concrete(block_mask_KbxNb):
        # numpy, then one constant: inside a jit trace jnp ops on constants return tracers.
        return jnp.asarray(_ascending(np.asarray(block_mask_KbxNb) != 0, slots))
    return _first_live(block_mask_KbxNb != 0, slots)


def _ascending(m: np.ndarray, slots: int) -> np.ndarray:
    """``compact_index`` of a numpy mask, as numpy (raises for an unbalanced column)."""
    kb, nb = m.shape
    counts = m.sum(0)
    bad = np.nonzero(counts != slots)[0]
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"the compact layout needs exactly {slots} live blocks in every output block "
            f"column, but column {j} of the {kb}x{nb} block mask has {int(counts[j])} "
            f"({bad.size} columns differ): use column-balanced masks "
            "(sparsity.block_balance=column, or kernels.column_topk_block_mask), or "
            "sparse_storage=dense."
        )
    return np.nonzero(m.T)[1].reshape(nb, slots).astype(np.int32)


@functools.partial(jax.jit, static_argnums=1)
def _first_live(m_KbxNb, t):
    kb = m_KbxNb.shape[0]
    iota = jnp.arange(kb, dtype=jnp.int32)[:, None]
    order_NbxKb = jnp.argsort(jnp.where(m_KbxNb, iota, iota + kb).T, axis=1, stable=True)
    return jnp.sort(order_NbxKb[:, :t].astype(jnp.int32), axis=1)


def gather_blocks(w_KxN: jax.Array, kidx_NbxT: jax.Array, block_size: int) -> jax.Array:
    """Dense ``[K, N]`` -> compact ``[Nb, T, B, B]`` (block ``(kidx[j, t], j)`` of W).

    Args:
      w_KxN: dense weight (or its gradient, an Adam moment: anything of W's shape).
      kidx_NbxT: ``int32 [Nb, T]`` slot index.
      block_size: B.

    Returns:
      ``[Nb, T, B, B]`` of ``w``'s dtype. Use ``jax.vmap`` for stacked layers.
    """
    b = block_size
    kb, nb = w_KxN.shape[0] // b, w_KxN.shape[1] // b
    # Advanced indices split by a slice go first: [Nb, T, B, B].
    return w_KxN.reshape(kb, b, nb, b)[kidx_NbxT, :, jnp.arange(nb)[:, None], :]


def densify_blocks(blocks_NbxTxBxB: jax.Array, kidx_NbxT: jax.Array, k: int) -> jax.Array:
    """Compact ``[Nb, T, B, B]`` -> the dense view ``[K, N]``, exact zeros off the slots.

    One windowed scatter straight into ``[K, N]`` (no ``[Kb, Nb, B, B]`` transpose). Slots
    with ``kidx >= Kb`` are dropped, which is how xla.py places a padded ``BlockMeta``'s dW.
    (``kernels.common.scatter_blocks`` is the ``BlockMeta`` counterpart of the Pallas dW.)

    Args:
      blocks_NbxTxBxB: compact blocks.
      kidx_NbxT: their slot index (distinct within a column).
      k: K, the weight's rows.

    Returns:
      ``[K, Nb*B]`` of the blocks' dtype.
    """
    nb, t, b, _ = blocks_NbxTxBxB.shape
    rows_NbxT = jnp.asarray(kidx_NbxT, jnp.int32) * b
    cols_NbxT = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32)[:, None] * b, (nb, t))
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1)
    )
    return lax.scatter(
        jnp.zeros((k, nb * b), blocks_NbxTxBxB.dtype),
        jnp.stack([rows_NbxT, cols_NbxT], axis=-1).reshape(nb * t, 2),
        blocks_NbxTxBxB.reshape(nb * t, b, b),
        dims,
        unique_indices=True,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )


def index_block_mask(kidx_NbxT: jax.Array, kb: int) -> jax.Array:
    """``bool [Kb, Nb]``: the block mask of a slot index (True at ``(kidx[j, t], j)``)."""
    nb = kidx_NbxT.shape[0]
    m_NbxKb = jnp.zeros((nb, kb), bool).at[jnp.arange(nb)[:, None], kidx_NbxT].set(True)
    return m_NbxKb.T


@dataclasses.dataclass(frozen=True)
class CompactMeta:
    """Traced metadata of one compact weight (a pytree; shapes depend only on K, N, B, T, R).

    Attributes:
      kidx_NbxT: int32, K-block of slot t of output block column j.
      row_slot_KbxR: int32, flattened slot ids ``s = j*T + t`` with ``kidx[j, t] == i``, for
        each K-block row i, ascending in s; entries ``r >= row_count_Kb[i]`` repeat the last
        real one (0 for an empty row).
      row_count_Kb: int32, real entries per row.
      block_size: static B.
      shape: static weight shape (K, N).
    """

    kidx_NbxT: jax.Array
    row_slot_KbxR: jax.Array
    row_count_Kb: jax.Array
    block_size: int
    shape: tuple[int, int]

    @property
    def slots(self) -> int:
        """T, the live blocks per output block column."""
        return self.kidx_NbxT.shape[-1]

    @property
    def row_budget(self) -> int:
        """R, the static width of the row view."""
        return self.row_slot_KbxR.shape[-1]

    @property
    def row_nidx_KbxR(self) -> jax.Array:
        """The output block column of each row-view entry (``slot // T``)."""
        return self.row_slot_KbxR // self.slots

    def block_mask(self) -> jax.Array:
        """``bool [Kb, Nb]`` block mask of the slots."""
        return index_block_mask(self.kidx_NbxT, self.shape[0] // self.block_size)


jax.tree_util.register_dataclass(
    CompactMeta,
    data_fields=["kidx_NbxT", "row_slot_KbxR", "row_count_Kb"],
    meta_fields=["block_size", "shape"],
)


def frozen_index(fmeta: FrozenBlockMeta) -> np.ndarray:
    """A frozen topology's ascending slot index, ``int32 [Nb, T]`` numpy.

    Raises:
      ValueError: its columns do not all hold the same number (>= 1) of live blocks.
    """
    m = fmeta.numpy()
    counts = m.sum(0)
    return _ascending(m, max(int(counts.max(initial=0)), 1))


def _check_index(kidx: np.ndarray, kb: int, b: int) -> None:
    if kidx.size and (kidx.min() < 0 or kidx.max() >= kb):
        raise ValueError(f"slot index has K-blocks outside [0, Kb={kb}) (K={kb * b}, B={b}): "
                         f"min {kidx.min()}, max {kidx.max()}; build it for this weight's K.")
    s = np.sort(kidx, axis=1)
    dup = np.nonzero((s[:, 1:] == s[:, :-1]).any(1))[0]
    if dup.size:
        raise ValueError(f"slot index column {int(dup[0])} repeats a K-block ({kidx[dup[0]]}): "
                         "slots must be distinct within a column.")


def make_compact_meta(
    index, block_size: int | None = None, k: int | None = None, *, row_budget: int | None = None
) -> CompactMeta:
    """Builds ``CompactMeta`` from a slot index; jittable (call it inside the step).

    Args:
      index: ``int32 [Nb, T]`` slot index (traced or concrete), a ``kernels.FrozenBlockMeta``
        of a column-balanced mask (slots = ascending live K-blocks; ``block_size`` and ``k``
        then come from it), or a ``CompactMeta`` (returned as is).
      block_size: B (required for an index array).
      k: K, the weight's rows (required for an index array).
      row_budget: R, the row view's width; default Nb, which always fits (a row has at most
        one slot per column). A smaller R is checked for a concrete index; a traced one that
        overflows keeps each row's first R slots (dX would then be wrong: keep the default).

    Returns:
      ``CompactMeta``.

    Raises:
      ValueError: missing ``block_size``/``k``, a bad block size, K not a multiple of B, or,
        for a concrete index, out-of-range or repeated K-blocks or a row over ``row_budget``.
    """
    if isinstance(index, CompactMeta):
        return index
    if isinstance(index, FrozenBlockMeta):
        block_size, k = index.block_size, index.shape[0]
        index = frozen_index(index)
    if block_size is None or k is None:
        raise ValueError("make_compact_meta(kidx_NbxT, block_size, k): pass the block size and "
                         "K (the weight's rows) with an index array.")
    check_block_size(block_size)
    if k % block_size:
        raise ValueError(f"K={k} is not a multiple of block_size={block_size}.")
    if getattr(index, "ndim", None) != 2:
        raise ValueError(f"kidx must be int32 [Nb, T]; got shape {np.shape(index)}.")
    kb, (nb, t) = k // block_size, index.shape
    r = nb if row_budget is None else int(row_budget)
    if not 1 <= r <= nb:
        raise ValueError(f"row_budget={r} must be in [1, Nb={nb}].")
    if _is_concrete(index):
        kidx = np.asarray(index).astype(np.int32)
        _check_index(kidx, kb, block_size)
        worst = np.bincount(kidx.reshape(-1), minlength=kb).max(initial=0)
        if worst > r:
            raise ValueError(f"a K-block row has {worst} slots, over row_budget={r}: use the "
                             "default row_budget (Nb).")
    kidx = jnp.asarray(index).astype(jnp.int32)
    slot, count = _row_view(kidx, kb, r)
    return CompactMeta(kidx, slot, count, block_size=block_size, shape=(k, nb * block_size))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _row_view(kidx_NbxT, kb, r):
    flat = kidx_NbxT.reshape(-1)
    # Stable sort groups the slots by K-block row, ascending slot id within a row.
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    count = jnp.zeros(kb, jnp.int32).at[flat].add(1)
    start = jnp.cumsum(count) - count
    last = jnp.maximum(count - 1, 0)[:, None]
    pos = start[:, None] + jnp.minimum(jnp.arange(r, dtype=jnp.int32)[None, :], last)
    slot = jnp.where(count[:, None] > 0, order[jnp.minimum(pos, flat.shape[0] - 1)], 0)
    return slot, jnp.minimum(count, r)
