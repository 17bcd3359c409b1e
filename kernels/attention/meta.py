"""Static block metadata of a sparse attention pattern, for the block-sparse attention kernels.

Dimension letters (``L`` sequence length, ``B`` the block size, square blocks):

    Lb = L // B        query blocks (rows) and key blocks (columns)
    T  = the most key blocks any query block attends to      (row budget)
    S  = the most query blocks that attend to any key block  (column budget)

A pattern is a *mask function* ``mask_fn(q_pos, k_pos) -> bool``: True where query ``q_pos``
may attend to key ``k_pos``. It must be elementwise, broadcasting, and written with
operators that work on numpy arrays (the metadata is built from it at trace time) and on
int32 jax arrays inside the kernels (which recompute the in-block mask instead of loading
it): comparisons, ``+``, ``-``, ``&``, ``|`` and :func:`rem` / :func:`div` for non-negative
operands. It must be hashable (a frozen dataclass), because it is a static argument.

Unlike the matmul's ``BlockMeta`` the pattern is static (a config choice, not learned), so
the metadata is plain numpy, cached per ``(mask_fn, L, B)``, and its budgets are exact:

* the row view ``row_kidx_LbxT`` (key blocks of each query block; forward and dQ),
* the column view ``col_qidx_LbxS`` (query blocks of each key block; dK and dV).

Entry ``t`` of row ``i`` is real when ``t < row_count_Lb[i]``; padding repeats the last real
index (or 0 for an empty row). The XLA path masks padding out; Pallas kernels loop only over
real entries.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from jax import lax

from kernels.common import check_block_size, pool_blocks


def rem(a, b):
    """``a % b`` for non-negative ints: numpy, or ``lax.rem`` (lowers to Triton and Mosaic)."""
    return np.remainder(a, b) if isinstance(a, (np.ndarray, np.integer, int)) else lax.rem(a, b)


def div(a, b):
    """``a // b`` for non-negative ints: numpy, or ``lax.div`` (lowers to Triton and Mosaic)."""
    if isinstance(a, (np.ndarray, np.integer, int)):
        return np.floor_divide(a, b)
    return lax.div(a, b)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionMeta:
    """Row and column views of a pattern's non-empty blocks (numpy, static).

    Attributes:
      seq_len: L.
      block_size: B.
      block_mask_LbxLb: True where a (query block, key block) pair has a live entry.
      row_kidx_LbxT: key blocks of each query block, padded.
      row_count_Lb: real entries per row.
      col_qidx_LbxS: query blocks of each key block, padded.
      col_count_Lb: real entries per column.
    """

    seq_len: int
    block_size: int
    block_mask_LbxLb: np.ndarray
    row_kidx_LbxT: np.ndarray
    row_count_Lb: np.ndarray
    col_qidx_LbxS: np.ndarray
    col_count_Lb: np.ndarray

    @property
    def density(self) -> float:
        """Fraction of the ``Lb x Lb`` blocks computed (what the kernels cost vs dense)."""
        return float(self.block_mask_LbxLb.mean())


def element_mask(mask_fn, seq_len: int) -> np.ndarray:
    """The pattern as a bool ``[L, L]`` numpy array (query rows, key columns)."""
    pos = np.arange(seq_len, dtype=np.int64)
    out = np.asarray(mask_fn(pos[:, None], pos[None, :]), bool)
    return np.broadcast_to(out, (seq_len, seq_len))


def _padded_lists(mask_AxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a bool matrix: its True columns, padded with the last one (or 0)."""
    count = mask_AxC.sum(axis=1).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    idx = np.zeros((mask_AxC.shape[0], width), np.int32)
    for r in range(mask_AxC.shape[0]):
        cols = np.nonzero(mask_AxC[r])[0]
        if cols.size:
            idx[r, : cols.size] = cols
            idx[r, cols.size :] = cols[-1]
    return idx, count


def check_seq_len(seq_len: int, block_size: int) -> None:
    """Raises ValueError unless ``block_size`` is supported and divides ``seq_len``."""
    check_block_size(block_size)
    if seq_len % block_size:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of the attention block size "
            f"{block_size}: choose a block size dividing it (e.g. --config.attention."
            "block_size=64) or pad the sequence."
        )


@functools.lru_cache(maxsize=64)
def attention_meta(mask_fn, seq_len: int, block_size: int) -> AttentionMeta:
    """Builds (and caches) the block metadata of ``mask_fn`` at length ``seq_len``.

    Args:
      mask_fn: hashable pattern ``(q_pos, k_pos) -> bool`` (see the module docstring).
      seq_len: L, a multiple of ``block_size``.
      block_size: B, a power of two in [16, 256].

    Returns:
      An :class:`AttentionMeta` with exact (tight) row and column budgets.

    Raises:
      ValueError: unsupported block size or L not a multiple of it.
    """
    check_seq_len(seq_len, block_size)
    lb, b = seq_len // block_size, block_size
    blocks = pool_blocks(element_mask(mask_fn, seq_len), (b, b), "any")
    row_kidx, row_count = _padded_lists(blocks)
    col_qidx, col_count = _padded_lists(blocks.T)
    for a in (blocks, row_kidx, row_count, col_qidx, col_count):
        a.setflags(write=False)  # cached and shared: never mutated
    return AttentionMeta(seq_len, block_size, blocks, row_kidx, row_count, col_qidx, col_count)


def in_block_mask(mask_fn, idx_RxT: np.ndarray, count_R: np.ndarray, block_size: int,
                  transpose: bool = False, rows_R: np.ndarray | None = None) -> np.ndarray:
    """Element mask of gathered blocks, padding False: ``[R, B, T*B]`` (row view).

    ``rows_R`` are the block indices of the ``R`` rows (default ``0 .. R-1``). With
    ``transpose`` (column view: ``idx`` lists query blocks of each key block) the result is
    ``[R, T*B, B]``, query positions first.
    """
    r, t = idx_RxT.shape
    b = block_size
    rows_R = np.arange(r) if rows_R is None else np.asarray(rows_R)
    own = rows_R[:, None] * b + np.arange(b)[None, :]                          # [R, B]
    other = (idx_RxT[:, :, None] * b + np.arange(b)).reshape(r, t * b)        # [R, T*B]
    real = np.repeat(np.arange(t)[None, :] < count_R[:, None], b, axis=1)     # [R, T*B]
    if transpose:
        allowed = mask_fn(other[:, :, None], own[:, None, :])                  # [R, TB, B]
        return np.asarray(allowed, bool) & real[:, :, None]
    allowed = mask_fn(own[:, :, None], other[:, None, :])                      # [R, B, TB]
    return np.asarray(allowed, bool) & real[:, None, :]


def row_groups(count_Lb: np.ndarray, max_groups: int = 8) -> list[tuple[np.ndarray, int]]:
    """Static buckets of rows by padded width: ``[(rows, width)]`` covering every row once.

    A single static budget pads every row to the longest one; causal strided patterns have
    row counts growing from 1 to T, so that wastes about half the work. Rounding each count
    up to a multiple of ``ceil(T / max_groups)`` leaves at most ``max_groups`` widths, each
    one batched GEMM, with at most ``T / max_groups`` padding per row.
    """
    t = max(int(count_Lb.max(initial=0)), 1)
    step = -(-t // max_groups)
    width = np.clip(-(-count_Lb // step) * step, 1, t)   # an empty row still gets one block
    return [(np.nonzero(width == w)[0], int(w)) for w in np.unique(width)]
