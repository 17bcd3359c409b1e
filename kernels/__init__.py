"""Block-sparse kernels for sparse_gpt: a matmul over a weight's non-zero blocks and
attention over a static pattern's non-empty blocks.

Public API::

    budget = kernels.block_budget(K, N, block_size, density)          # static, per layer
    meta = kernels.make_block_meta(mask_KxN, block_size, budget)        # jittable
    y = kernels.block_sparse_matmul(x, w, meta, backend="auto", interpret=False)
    y_ref = kernels.reference_matmul(x, w, meta)                        # dense oracle
    kidx = kernels.compact_index(block_mask_KbxNb, T)                   # compact layout
    blocks = kernels.gather_blocks(w, kidx, block_size)                 # [Nb, T, B, B]
    y = kernels.compact_matmul(x, blocks, kidx, backend="auto")         # grads: dx, dblocks
    kernels.available_backends()
    kernels.register_backend("mine", kernels.MatmulBackend(matmul, matmul_t, sddmm,
                             compact=kernels.CompactBackend(c_matmul, c_matmul_t, c_sddmm)))

    out = kernels.block_sparse_attention(q, k, v, mask_fn, block_size=64)  # [batch, L, H, D]
    out_ref = kernels.reference_attention(q, k, v, kernels.element_mask(mask_fn, L))
    kernels.register_attention_backend("mine", kernels.AttentionBackend(forward, backward))

Layout (JAX megablox style: a jnp reference, a ``custom_vjp`` public op, backends per file;
no backend imports another, shared code lives in common.py):

    bsmm/        block-sparse matmul: meta.py (budget and overflow rules), compact.py (the
                 live-blocks-only layout of column-balanced weights), reference.py,
                 ops.py (public op, backend registry), xla.py, pallas_gpu.py, pallas_tpu.py
    attention/   block-sparse attention (static patterns given as a hashable
                 ``mask_fn(q_pos, k_pos)``): meta.py, reference.py, ops.py, xla.py, pallas_gpu.py
    common.py    what both share: backend registry and "auto" resolution, block-size check,
                 block pooling, Pallas helpers

Each module's docstring has its dimension letters; the matmul's ``[K, N]`` is in-features x
out-features, attention backends work on ``[G, L, D]`` (G = batch x heads).
"""

from kernels.attention.meta import AttentionMeta, attention_meta, element_mask
from kernels.attention.ops import (
    ATTENTION_BACKENDS,
    AttentionBackend,
    block_sparse_attention,
    register_attention_backend,
    resolve_attention_backend,
    unregister_attention_backend,
)
from kernels.attention.reference import reference_attention
from kernels.bsmm.compact import (
    CompactMeta,
    compact_index,
    densify_blocks,
    frozen_index,
    gather_blocks,
    index_block_mask,
    make_compact_meta,
)
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
from kernels.bsmm.ops import (
    BACKENDS,
    CompactBackend,
    MatmulBackend,
    available_backends,
    block_sparse_matmul,
    compact_matmul,
    register_backend,
    resolve_backend,
    unregister_backend,
)
from kernels.bsmm.reference import reference_matmul
from kernels.common import check_block_size, expand_blocks, pool_blocks

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMeta",
    "BACKENDS",
    "BlockBudget",
    "BlockMeta",
    "CompactBackend",
    "CompactMeta",
    "FrozenBlockMeta",
    "MatmulBackend",
    "attention_meta",
    "available_backends",
    "block_budget",
    "block_sparse_attention",
    "block_sparse_matmul",
    "check_block_size",
    "column_topk_block_mask",
    "compact_index",
    "compact_matmul",
    "densify_blocks",
    "element_mask",
    "expand_block_mask",
    "expand_blocks",
    "frozen_index",
    "gather_blocks",
    "index_block_mask",
    "make_block_meta",
    "make_compact_meta",
    "pool_block_mask",
    "pool_blocks",
    "reference_attention",
    "reference_matmul",
    "register_attention_backend",
    "register_backend",
    "resolve_attention_backend",
    "resolve_backend",
    "unregister_attention_backend",
    "unregister_backend",
]
