"""Dense masked oracle: ``x @ (w * expand(block_mask))``, the ground truth for every backend.

``reference_matmul`` is plain jnp, so ``jax.grad`` of it (ordinary autodiff, no custom_vjp)
is the independent oracle for the gradients too: dX = dY @ (w * m)^T and
dW = (x^T @ dY) * m. ``matmul``, ``matmul_t`` and ``sddmm`` are the same maths written as
the backend interface (forward, dX, sampled dW) so ``backend="reference"`` can be selected
through ``block_sparse_matmul`` like any other backend; ``compact_*`` are the same for the
compact layout (kernels/bsmm/compact.py): densify the blocks, run the dense product, and
gather dW back into ``[Nb, T, B, B]``.

Dimension letters: x ``[M, K]``, W ``[K, N]`` (K in-features, N out-features), y and dY
``[M, N]``; m the block mask expanded to ``[K, N]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.bsmm.compact import densify_blocks, gather_blocks
from kernels.bsmm.meta import BlockMeta, FrozenBlockMeta


def reference_matmul(x: jax.Array, w_KxN: jax.Array, mask) -> jax.Array:
    """Dense masked product, the oracle: ``x @ (w * m)`` with fp32 accumulation.

    Args:
      x: ``[..., K]`` activations.
      w_KxN: ``[K, N]`` dense weight.
      mask: a ``BlockMeta``/``FrozenBlockMeta`` (its block mask is expanded), or a ``[K, N]``
        element mask used as is.

    Returns:
      ``[..., N]`` in the promoted dtype of ``x`` and ``w``.
    """
    if isinstance(mask, (BlockMeta, FrozenBlockMeta)):
        m_KxN = mask.dense_mask(w_KxN.dtype)
    else:
        m_KxN = jnp.asarray(mask).astype(w_KxN.dtype)
    out_dtype = jnp.result_type(x, w_KxN)
    y = jnp.matmul(x, w_KxN * m_KxN, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def matmul(x_MxK, w_KxN, meta, out_dtype):
    """Forward through the dense oracle (backend interface)."""
    w = w_KxN * meta.dense_mask(w_KxN.dtype)
    return jnp.dot(x_MxK, w, preferred_element_type=jnp.float32).astype(out_dtype)


def matmul_t(dy_MxN, w_KxN, meta, out_dtype):
    """dX = dY @ (w * m)^T through the dense oracle (backend interface)."""
    w = w_KxN * meta.dense_mask(w_KxN.dtype)
    return jnp.dot(dy_MxN, w.T, preferred_element_type=jnp.float32).astype(out_dtype)


def sddmm(x_MxK, dy_MxN, meta, out_dtype):
    """dW = (x^T @ dY) * m through the dense oracle (backend interface)."""
    dw = jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=jnp.float32)
    return (dw * meta.dense_mask(jnp.float32)).astype(out_dtype)


def compact_matmul(x_MxK, blocks_NbxTxBxB, cmeta, out_dtype):
    """Forward from compact blocks through the dense product (compact backend interface)."""
    w = densify_blocks(blocks_NbxTxBxB, cmeta.kidx_NbxT, cmeta.shape[0])
    return jnp.dot(x_MxK, w, preferred_element_type=jnp.float32).astype(out_dtype)


def compact_matmul_t(dy_MxN, blocks_NbxTxBxB, cmeta, out_dtype):
    """dX = dY @ W^T from compact blocks through the dense product (compact interface)."""
    w = densify_blocks(blocks_NbxTxBxB, cmeta.kidx_NbxT, cmeta.shape[0])
    return jnp.dot(dy_MxN, w.T, preferred_element_type=jnp.float32).astype(out_dtype)


def compact_sddmm(x_MxK, dy_MxN, cmeta, out_dtype):
    """dblocks ``[Nb, T, B, B]``: the dense x^T @ dY gathered at the slots (compact interface)."""
    dw = jnp.dot(x_MxK.T, dy_MxN, preferred_element_type=jnp.float32).astype(out_dtype)
    return gather_blocks(dw, cmeta.kidx_NbxT, cmeta.block_size)
