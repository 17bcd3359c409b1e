"""SparseDense: the one projection layer every attention and MLP matrix goes through.

The layer owns a dense ``kernel`` param and a boolean ``kernel`` leaf in the ``masks``
collection at the same path. How it multiplies is a config choice, never a different
parameter layout:

* ``matmul="masked"``: ``x @ (kernel * mask)``. Exact and simple; the oracle for the rest.
  The gradient of a masked-out weight is exactly zero.
* ``matmul="block_sparse"``: ``kernels.block_sparse_matmul`` over the non-zero blocks of the
  mask, with block metadata built on device from the (traced) mask at a static budget, so a
  topology change never recompiles. Requires a block-structured mask.

A model applied without a ``masks`` collection (or a layer without a mask leaf) is dense.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


class SparseDense(nn.Module):
    """A dense layer whose kernel carries a mask in the ``masks`` collection.

    Attributes:
      features: output width N.
      use_bias: add a (dense, never masked) bias.
      dtype: compute dtype; params are cast to it before the matmul.
      param_dtype: storage dtype of kernel and bias.
      kernel_init: initializer of the [K, N] kernel.
      matmul: "masked" or "block_sparse" (see module docstring).
      block_size: block edge of the block-sparse path.
      block_density: upper bound of this layer's density; sets the static block budget.
      kernel_backend: backend of kernels.block_sparse_matmul ("auto", "xla", ...).
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    matmul: str = "masked"
    block_size: int = 128
    block_density: float = 1.0
    kernel_backend: str = "auto"

    @nn.compact
    def __call__(self, x_xK: jax.Array) -> jax.Array:
        k_in = x_xK.shape[-1]
        kernel_KxN = self.param("kernel", self.kernel_init, (k_in, self.features),
                                self.param_dtype)
        if self.is_initializing() or self.has_variable("masks", "kernel"):
            mask_KxN = self.variable(
                "masks", "kernel", lambda: jnp.ones((k_in, self.features), jnp.bool_)).value
        else:
            mask_KxN = None

        x_xK = x_xK.astype(self.dtype)
        kernel_KxN = kernel_KxN.astype(self.dtype)
        if mask_KxN is None:
            y_xN = x_xK @ kernel_KxN
        elif self.matmul == "masked":
            y_xN = x_xK @ jnp.where(mask_KxN, kernel_KxN, jnp.zeros((), self.dtype))
        elif self.matmul == "block_sparse":
            y_xN = _block_sparse(x_xK, kernel_KxN, mask_KxN, self.block_size,
                                 self.block_density, self.kernel_backend)
        else:
            raise ValueError(f"Unknown matmul {self.matmul!r}: use 'masked' or 'block_sparse' "
                             "(--config.model.matmul).")
        if self.use_bias:
            bias_N = self.param("bias", nn.initializers.zeros, (self.features,),
                                self.param_dtype)
            y_xN = y_xN + bias_N.astype(self.dtype)
        return y_xN


def _block_sparse(x_xK, kernel_KxN, mask_KxN, block_size, block_density, backend):
    """Routes one projection through the block-sparse kernel (metadata built on device)."""
    import kernels  # local import: the model works without the kernels package loaded

    budget = kernels.block_budget(kernel_KxN.shape[0], kernel_KxN.shape[1], block_size,
                                  block_density)
    meta = kernels.make_block_meta(mask_KxN, block_size=block_size, max_blocks=budget)
    return kernels.block_sparse_matmul(x_xK, kernel_KxN, meta, backend=backend)
