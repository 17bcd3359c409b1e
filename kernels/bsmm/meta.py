"""Block mask -> static-shape metadata for the block-sparse matmul kernels.

Dimension letters (``W`` is ``[K, N]``: K in-features, N out-features; ``x`` is ``[M, K]``,
M tokens; ``B`` the block size):

    Kb = K // B        block rows of W (x's K-blocks)
    Nb = N // B        block columns of W (y's N-blocks)
    T  = budget.max_per_col   non-zero K-blocks kept per output block column
    R  = budget.max_per_row   non-zero N-blocks kept per K block row

A block mask ``mask_KbxNb`` becomes two padded index lists with static shapes:

* the column view ``col_kidx_NbxT`` (which K-blocks feed output column j; used by the
  forward pass and by the sampled dW), and
* the row view ``row_nidx_KbxR`` (which N-blocks each K-row feeds; used by dX = dY @ W^T).

Entry ``t`` of column ``j`` is real when ``t < col_count_Nb[j]``; padding entries repeat the
last real index (or 0 for an empty column) so a TPU pipeline sees an unchanged block index and
skips the copy, and every kernel gives them zero contribution (XLA zeroes their weight block,
Pallas skips them). Shapes depend only on (K, N, B, budget), never on the mask, so a
prune/regrow step inside ``jax.jit`` changes the topology without recompiling.

Choosing the budget: the cost of the XLA path is proportional to ``Nb * T`` blocks whatever
the mask, so ``T`` should be the mask's largest column count. A mask layer that keeps the
same number of blocks in every output column (``column_topk_block_mask``) makes
``block_budget(K, N, B, density)`` exact. Pallas kernels skip padding, so a generous row
budget only costs them grid steps; the default row budget is therefore "all of Nb".

Overflow (more blocks in a column/row than the budget): with a concrete mask (numpy or a
concrete jax array, i.e. outside jit) ``make_block_meta`` raises ``ValueError``. Under jit it
cannot raise, so it truncates: each column keeps its lowest-index K-blocks, then each row its
lowest-index N-blocks; ``meta.n_dropped`` counts what was dropped (log it or assert on it) and
``meta.block_mask_KbxNb`` is the mask actually multiplied, so every backend stays consistent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import check_block_size, expand_blocks, pool_blocks


class BlockBudget(NamedTuple):
    """Static per-layer capacity of the metadata.

    Attributes:
      max_per_col: T, the most non-zero K-blocks any output block column may hold.
      max_per_row: R, the most non-zero N-blocks any K block row may hold.
    """

    max_per_col: int
    max_per_row: int


def check_divisible(shape_KxN: tuple[int, int], block_size: int, what: str = "weight") -> None:
    """Raises ValueError naming the shape, the block size and the fix if B does not divide it."""
    K, N = shape_KxN
    if K % block_size or N % block_size:
        pad = (-(-K // block_size) * block_size, -(-N // block_size) * block_size)
        divs = [b for b in (256, 128, 64, 32, 16) if K % b == 0 and N % b == 0]
        hint = f"use block_size={divs[0]}" if divs else "no supported block size divides it"
        extra = " If this is a [Kb, Nb] block mask, pass block_mask=True." if what == "mask" else ""
        raise ValueError(
            f"{what} shape (K={K}, N={N}) is not a multiple of block_size={block_size}: pad the "
            f"{what} to {pad} (zero rows/columns) or pick a block size dividing both dims "
            f"({hint}).{extra}"
        )


def block_budget(
    K: int,
    N: int,
    block_size: int,
    density: float,
    *,
    col_slack: int = 0,
    row_slack: int | None = None,
) -> BlockBudget:
    """Static budget for a layer whose block mask has at most ``density`` per column.

    Args:
      K: weight rows (input features).
      N: weight columns (output features).
      block_size: block size B.
      density: fraction of non-zero blocks per output block column, in [0, 1].
      col_slack: extra blocks per column above ``ceil(density * Kb)``, for masks that are only
        roughly column-balanced.
      row_slack: ``None`` (default) allows any row count (R = Nb, always safe: only Pallas
        kernels use the row view and they skip padding). An int gives
        ``R = ceil(density * Nb) + row_slack`` for masks that are also row-balanced.

    Returns:
      A ``BlockBudget`` clipped to [1, Kb] x [1, Nb].

    Raises:
      ValueError: bad block size, non-divisible shape, or density outside [0, 1].
    """
    check_block_size(block_size)
    check_divisible((K, N), block_size)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density} must be in [0, 1].")
    kb, nb = K // block_size, N // block_size
    # round() first so 0.1 * 30 = 3.0000000000000004 does not become 4.
    per_col = math.ceil(round(density * kb, 6)) + col_slack
    per_row = nb if row_slack is None else math.ceil(round(density * nb, 6)) + row_slack
    return BlockBudget(int(min(max(per_col, 1), kb)), int(min(max(per_row, 1), nb)))


@dataclasses.dataclass(frozen=True)
class BlockMeta:
    """Traced, static-shape metadata of one block-sparse weight (a pytree).

    Attributes:
      col_kidx_NbxT: int32, K-block index of the t-th non-zero block of output column j.
      col_count_Nb: int32, number of real entries per column.
      row_nidx_KbxR: int32, N-block index of the r-th non-zero block of K-row i.
      row_count_Kb: int32, number of real entries per row.
      block_mask_KbxNb: bool, the block mask actually computed (after any truncation).
      n_dropped: int32 scalar, blocks of the input mask dropped because of the budget.
      block_size: static block size B.
      shape: static weight shape (K, N).
    """

    col_kidx_NbxT: jax.Array
    col_count_Nb: jax.Array
    row_nidx_KbxR: jax.Array
    row_count_Kb: jax.Array
    block_mask_KbxNb: jax.Array
    n_dropped: jax.Array
    block_size: int
    shape: tuple[int, int]

    @property
    def budget(self) -> BlockBudget:
        return BlockBudget(self.col_kidx_NbxT.shape[-1], self.row_nidx_KbxR.shape[-1])

    def view(self, rows: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(index lists, real counts)``: the column view, or the row view with ``rows``."""
        if rows:
            return self.row_nidx_KbxR, self.row_count_Kb
        return self.col_kidx_NbxT, self.col_count_Nb

    def dense_mask(self, dtype) -> jax.Array:
        """The computed block mask expanded to a ``[K, N]`` element mask of ``dtype``."""
        return expand_block_mask(jnp.asarray(self.block_mask_KbxNb).astype(dtype), self.block_size)


jax.tree_util.register_dataclass(
    BlockMeta,
    data_fields=[
        "col_kidx_NbxT",
        "col_count_Nb",
        "row_nidx_KbxR",
        "row_count_Kb",
        "block_mask_KbxNb",
        "n_dropped",
    ],
    meta_fields=["block_size", "shape"],
)


@dataclasses.dataclass(frozen=True)
class FrozenBlockMeta:
    """Trace-time ("frozen topology") metadata: the block mask as static Python data.

    Hashable and leaf-less, so it can be closed over or passed through ``jax.jit``; every
    distinct mask compiles its own program of static slices. Use it only for masks that never
    change (static sparsity); anything that prunes or regrows should use ``BlockMeta``.

    Attributes:
      block_mask: tuple of Kb tuples of Nb bools.
      block_size: block size B.
      shape: weight shape (K, N).
    """

    block_mask: tuple[tuple[bool, ...], ...]
    block_size: int
    shape: tuple[int, int]

    def numpy(self) -> np.ndarray:
        """Returns the block mask as a ``[Kb, Nb]`` numpy bool array."""
        return np.array(self.block_mask, dtype=bool).reshape(
            self.shape[0] // self.block_size, self.shape[1] // self.block_size
        )

    def dense_mask(self, dtype) -> jax.Array:
        """The block mask expanded to a ``[K, N]`` element mask of ``dtype``."""
        return expand_block_mask(jnp.asarray(self.numpy()).astype(dtype), self.block_size)

    def to_traced(self) -> BlockMeta:
        """Returns the equivalent ``BlockMeta`` with the exact (tightest) budget."""
        return make_block_meta(self.numpy(), self.block_size, block_mask=True)


jax.tree_util.register_dataclass(
    FrozenBlockMeta, data_fields=[], meta_fields=["block_mask", "block_size", "shape"]
)


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def pool_block_mask(mask_KxN: jax.Array, block_size: int) -> jax.Array:
    """``[K, N]`` element mask -> ``[Kb, Nb]`` bool block mask (a block is on if any element is)."""
    check_divisible(mask_KxN.shape, block_size, what="mask")
    return pool_blocks(jnp.asarray(mask_KxN), (block_size, block_size), "any")


def expand_block_mask(mask_KbxNb: jax.Array, block_size: int) -> jax.Array:
    """``[Kb, Nb]`` block mask -> ``[K, N]`` element mask of the same dtype."""
    return expand_blocks(mask_KbxNb, (block_size, block_size))


def column_topk_block_mask(scores_KbxNb: jax.Array, per_col: int) -> jax.Array:
    """Keeps the ``per_col`` highest-scoring blocks of every output block column.

    A mask built this way never overflows ``block_budget(..., density=per_col / Kb)``, which
    is what makes the XLA path fast; a mask layer can use it for its prune/regrow top-k.

    Args:
      scores_KbxNb: block scores (e.g. pooled |w| or |grad|).
      per_col: blocks to keep per column (static int, 0..Kb).

    Returns:
      bool ``[Kb, Nb]`` mask with exactly ``per_col`` True entries per column.
    """
    kb = scores_KbxNb.shape[0]
    if per_col <= 0:
        return jnp.zeros(scores_KbxNb.shape, bool)
    order_NbxKb = jnp.argsort(-scores_KbxNb.T, axis=1, stable=True)
    keep_NbxKb = jnp.zeros((scores_KbxNb.shape[1], kb), bool)
    rows = jnp.arange(scores_KbxNb.shape[1])[:, None]
    return keep_NbxKb.at[rows, order_NbxKb[:, : min(per_col, kb)]].set(True).T


def _first_true_indices(keep_AxC: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Per column c of ``keep_AxC``: the first ``width`` True row indices, padded, and counts."""
    a = keep_AxC.shape[0]
    iota = jnp.arange(a, dtype=jnp.int32)[:, None]
    # Stable sort key puts kept rows first, each group in increasing row order.
    order_CxA = jnp.argsort(jnp.where(keep_AxC, iota, iota + a).T, axis=1, stable=True)
    idx_CxW = order_CxA[:, :width].astype(jnp.int32)
    count_C = jnp.sum(keep_AxC, axis=0, dtype=jnp.int32)
    last_C = jnp.take_along_axis(idx_CxW, jnp.maximum(count_C - 1, 0)[:, None], axis=1)
    real = jnp.arange(width, dtype=jnp.int32)[None, :] < count_C[:, None]
    return jnp.where(real, idx_CxW, last_C), count_C


def make_block_meta(
    mask: jax.Array | np.ndarray,
    block_size: int,
    budget: BlockBudget | int | None = None,
    *,
    block_mask: bool = False,
    frozen: bool = False,
    on_overflow: str = "raise",
) -> BlockMeta | FrozenBlockMeta:
    """Builds block-sparse metadata from a mask; jittable, shapes fixed by the budget.

    Call it inside the jitted step, right where the (traced) mask is available, with a static
    ``budget`` (e.g. ``block_budget(K, N, B, density)``): topology changes then never recompile.

    Args:
      mask: ``[K, N]`` element mask (pooled: a block is on if any element is) or
        ``[Kb, Nb]`` block mask; any dtype, non-zero means kept.
      block_size: block size B (power of two in [16, 256]).
      budget: static ``BlockBudget`` (use ``block_budget``). An int is a per-layer total of
        non-zero blocks: always enough for any placement (T = min(Kb, int), R = min(Nb, int)),
        but the XLA path then pays T blocks in every column. ``None`` means the tightest
        budget for a concrete mask (its largest column/row counts; each new count compiles
        anew) or the full (Kb, Nb) budget for a traced one (exact, no speed-up on XLA).
      block_mask: ``True`` if ``mask`` is a ``[Kb, Nb]`` block mask; default ``[K, N]``.
      frozen: return a ``FrozenBlockMeta`` (static slices at trace time); ``mask`` must then be
        concrete and ``budget`` is ignored.
      on_overflow: ``"raise"`` (default) raises for a concrete mask that exceeds the budget;
        ``"truncate"`` truncates it as a traced mask always is (e.g. an eager ``init`` with an
        all-ones mask under a sparse budget).

    Returns:
      ``BlockMeta`` (or ``FrozenBlockMeta`` when ``frozen``).

    Raises:
      ValueError: bad block size, shape not divisible by the block size, a traced mask with
        ``frozen=True``, or (concrete mask only) more blocks in a column or row than the budget.
    """
    check_block_size(block_size)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D ([K, N] or [Kb, Nb]); got shape {mask.shape}.")
    if on_overflow not in ("raise", "truncate"):
        raise ValueError(f"on_overflow={on_overflow!r}: use 'raise' or 'truncate'.")
    if block_mask:
        kb, nb = mask.shape
    else:
        check_divisible(mask.shape, block_size, what="mask")
        kb, nb = mask.shape[0] // block_size, mask.shape[1] // block_size
    shape = (kb * block_size, nb * block_size)
    concrete = _is_concrete(mask)

    if frozen and not concrete:
        raise ValueError(
            "frozen=True needs a mask known at trace time (numpy or a concrete "
            "array); for a traced mask use frozen=False (traced metadata)."
        )
    if concrete:
        # Checked in numpy: inside a jit trace even jnp ops on constants return tracers.
        m_np = np.asarray(mask) != 0
        if not block_mask:
            m_np = pool_blocks(m_np, (block_size, block_size), "any")
        if frozen:
            return FrozenBlockMeta(tuple(map(tuple, m_np.tolist())), block_size, shape)
        cols, rows = m_np.sum(0), m_np.sum(1)
        if budget is None:
            budget = BlockBudget(max(int(cols.max(initial=0)), 1), max(int(rows.max(initial=0)), 1))
    elif budget is None:
        budget = BlockBudget(kb, nb)
    if isinstance(budget, (int, np.integer)):
        budget = BlockBudget(int(budget), int(budget))
    t, r = int(min(max(budget[0], 1), kb)), int(min(max(budget[1], 1), nb))
    if concrete and on_overflow == "raise":
        over = []
        if cols.max(initial=0) > t:
            over.append(f"output block column {int(cols.argmax())} has {int(cols.max())} blocks")
        if rows.max(initial=0) > r:
            over.append(f"block row {int(rows.argmax())} has {int(rows.max())} blocks")
        if over:
            raise ValueError(
                f"block mask ({kb}x{nb} blocks of {block_size}) exceeds the budget "
                f"BlockBudget(max_per_col={t}, max_per_row={r}): {' and '.join(over)}. Raise "
                f"the budget (block_budget(..., col_slack=..., row_slack=None)) or cap the mask "
                f"per column (column_topk_block_mask), or pass on_overflow='truncate'."
            )
    if concrete:
        m_KbxNb = jnp.asarray(m_np)
    else:
        m_KbxNb = (mask != 0) if block_mask else pool_block_mask(mask, block_size)

    return BlockMeta(*_build_views(m_KbxNb, t, r), block_size=block_size, shape=shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _build_views(m_KbxNb: jax.Array, t: int, r: int):
    # Truncate columns first (forward/dW view), then rows, so both views describe one mask.
    keep = m_KbxNb & (jnp.cumsum(m_KbxNb, axis=0) <= t)
    keep = keep & (jnp.cumsum(keep, axis=1) <= r)
    col_kidx, col_count = _first_true_indices(keep, t)
    row_nidx, row_count = _first_true_indices(keep.T, r)
    n_dropped = jnp.sum(m_KbxNb, dtype=jnp.int32) - jnp.sum(keep, dtype=jnp.int32)
    return col_kidx, col_count, row_nidx, row_count, keep, n_dropped
