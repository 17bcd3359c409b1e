"""Block-sparse matmul kernels for sparse_gpt.

Public API::

    budget = kernels.block_budget(K, N, block_size, density)          # static, per layer
    meta = kernels.make_block_meta(mask_KxN, block_size, budget)        # jittable
    y = kernels.block_sparse_matmul(x, w, meta, backend="auto", interpret=False)
    y_ref = kernels.reference_matmul(x, w, meta)                        # dense oracle
    kernels.available_backends()

See ``kernels/block_meta.py`` for the budget and overflow rules and ``kernels/ops.py`` for
the backends.
"""

from kernels.block_meta import (
    BlockBudget,
    BlockMeta,
    FrozenBlockMeta,
    block_budget,
    column_topk_block_mask,
    expand_block_mask,
    make_block_meta,
    pool_block_mask,
)
from kernels.ops import BACKENDS, available_backends, block_sparse_matmul, resolve_backend
from kernels.reference import reference_matmul

__all__ = [
    "BACKENDS",
    "BlockBudget",
    "BlockMeta",
    "FrozenBlockMeta",
    "available_backends",
    "block_budget",
    "block_sparse_matmul",
    "column_topk_block_mask",
    "expand_block_mask",
    "make_block_meta",
    "pool_block_mask",
    "reference_matmul",
    "resolve_backend",
]
