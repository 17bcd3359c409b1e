"""Block-sparse matmul kernels for sparse_gpt.

Public API::

    budget = kernels.block_budget(K, N, block_size, density)          # static, per layer
    meta = kernels.make_block_meta(mask_KxN, block_size, budget)        # jittable
    y = kernels.block_sparse_matmul(x, w, meta, backend="auto", interpret=False)
    y_ref = kernels.reference_matmul(x, w, meta)                        # dense oracle
    kernels.available_backends()

    out = kernels.block_sparse_attention(q, k, v, mask_fn, block_size=64)  # [B, L, H, K]
    out_ref = kernels.reference_attention(q, k, v, kernels.element_mask(mask_fn, L))

Layout (JAX megablox style: a jnp reference, a ``custom_vjp`` public op, backends per file):

    bsmm/        block-sparse matmul: meta.py (budget and overflow rules), reference.py,
                 ops.py (public op, backend dispatch), xla.py, pallas_gpu.py, pallas_tpu.py
    attention/   block-sparse attention (static patterns given as a hashable
                 ``mask_fn(q_pos, k_pos)``): meta.py, reference.py, ops.py, xla.py, pallas_gpu.py
    common.py    what both share: backend resolution, block-size checks, block pooling,
                 Pallas helpers
"""

from kernels.bsmm.meta import (
    BlockBudget,
    BlockMeta,
    FrozenBlockMeta,
    block_budget,
    column_topk_block_mask,
    expand_block_mask,
    make_block_meta,
    pool_block_mask,
)
from kernels.attention.meta import AttentionMeta, attention_meta, element_mask
from kernels.attention.ops import (
    ATTENTION_BACKENDS,
    block_sparse_attention,
    resolve_attention_backend,
)
from kernels.attention.reference import reference_attention
from kernels.bsmm.ops import BACKENDS, available_backends, block_sparse_matmul, resolve_backend
from kernels.bsmm.reference import reference_matmul

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMeta",
    "BACKENDS",
    "BlockBudget",
    "BlockMeta",
    "FrozenBlockMeta",
    "attention_meta",
    "available_backends",
    "block_budget",
    "block_sparse_attention",
    "block_sparse_matmul",
    "column_topk_block_mask",
    "element_mask",
    "expand_block_mask",
    "make_block_meta",
    "pool_block_mask",
    "reference_attention",
    "reference_matmul",
    "resolve_attention_backend",
    "resolve_backend",
]
