"""SparseDense: the one projection layer every attention and MLP matrix goes through.

The layer owns a dense ``kernel`` param and a boolean ``kernel`` leaf in the ``masks``
collection at the same path. How it multiplies is a config choice, never a different
parameter layout:

* ``matmul="masked"``: ``x @ (kernel * mask)``. Exact and simple; the oracle for the rest.
  The gradient of a masked-out weight is exactly zero.
* ``matmul="block_sparse"``: ``kernels.block_sparse_matmul`` over the non-zero blocks of the
  mask, with block metadata built on device from the (traced) mask at a static budget, so a
  topology change never recompiles. Requires a block-structured mask. A fixed topology
  given as ``frozen`` (per-layer ``FrozenBlockMeta`` from ``StepContext.topology``, and the
  layer index) replaces the traced metadata: the mask is then trace-time data and the
  kernel's static form runs (``lax.switch`` over the layers picks the layer's).
* ``slots=T > 0`` (``model.sparse_storage=compact``): the kernel is stored compact, only its
  live blocks: the ``kernel`` param is ``[Nb, T, B, B]`` (block ``[j, t]`` is W's block at
  K-block row ``mask[j, t]``, output block column ``j``) and the ``masks`` leaf is the int32
  ``[Nb, T]`` of their K-block indices; ``kernels.compact_matmul`` reads the blocks as they
  are and returns their gradient in the same shape (``sparse_gpt/model/compact.py``).

A model applied without a ``masks`` collection (or a layer without a mask leaf) is dense.

Sharding: every param names its logical axes where it is created (``kernel_axes`` here, the
embeddings and LayerNorms in model.py) through :func:`logical_init`. Plain ``init`` returns
plain arrays; under :func:`boxed_axes` the same initializers return
``nn.LogicallyPartitioned`` boxes, which is how ``sharding.py`` reads the names with
``jax.eval_shape`` (masks get their kernel's names, so they always shard like their params).
The block-sparse kernel is a custom call XLA cannot partition, so on a mesh it runs inside
``shard_map``: rows split over the batch axes, the weight and mask whole on every device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Initializer = Callable[..., jax.Array]
LogicalAxes = Sequence[str | None]

_BOXED = contextvars.ContextVar("sparse_gpt_boxed_axes", default=False)


@contextlib.contextmanager
def boxed_axes() -> Iterator[None]:
    """While active, :func:`logical_init` initializers return ``nn.LogicallyPartitioned``.

    Used (under ``jax.eval_shape``) to read every variable's logical axis names; outside it
    ``init`` returns plain arrays, so no other code ever sees a box.
    """
    token = _BOXED.set(True)
    try:
        yield
    finally:
        _BOXED.reset(token)


def logical_init(init: Initializer, names: LogicalAxes) -> Initializer:
    """Tags an initializer with the logical axis names of the array it makes."""
    def init_fn(*args, **kwargs):
        value = init(*args, **kwargs)
        return nn.LogicallyPartitioned(value, tuple(names)) if _BOXED.get() else value
    return init_fn


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
      block_tiers: budget tiers (densities, ascending, the last ``block_density``) for a
        density that changes during training; the call's ``tier`` picks one.
      kernel_backend: backend of kernels.block_sparse_matmul ("auto", "xla", ...).
      slots: compact storage: live blocks per output block column (T); 0 stores the kernel
        dense ([K, N] and a [K, N] mask).
      kernel_axes: logical axis names of the [K, N] kernel (and of its mask; the bias gets
        the N name). A compact kernel's blocks split like the kernel: N's name on the Nb
        axis, K's on each block's rows (its indices take the leading two).
      in_features: K; None takes it from the input (must be set when ``in_index`` slices
        the input).
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)
    matmul: str = "masked"
    block_size: int = 128
    block_density: float = 1.0
    block_tiers: tuple[float, ...] = ()
    slots: int = 0
    kernel_backend: str = "auto"
    kernel_axes: tuple[str | None, str | None] = (None, None)

    in_features: int | None = None

    @nn.compact
    def __call__(self, x_xK: jax.Array, in_index: jax.Array | None = None,
                 out_index: jax.Array | None = None, frozen: tuple | None = None,
                 tier: jax.Array | None = None) -> jax.Array:
        """``x @ kernel + bias``; with indices, only the gathered part (SAT's omission).

        Args:
          x_xK: input; with ``in_index`` its last dim holds only those kernel rows.
          in_index: kernel rows (input features) to use, or None for all.
          out_index: kernel columns (output features) to compute, or None for all.
          frozen: ``(metas, layer)``: this kernel's ``FrozenBlockMeta`` per stacked layer and
            the traced layer index (``StepContext.frozen``); used by ``matmul=block_sparse``
            in place of the mask's traced metadata. The caller guarantees it describes the
            mask.
          tier: traced index into ``block_tiers`` (``gpt.kernel_tier`` of the masks): the
            block budget of this call, one ``lax.switch`` branch per tier; None: the top.
        """
        if self.slots:
            if in_index is not None or out_index is not None:
                raise ValueError("SAT's neuron omission slices dense kernels; it needs "
                                 "--config.model.sparse_storage=dense.")
            return self._compact(x_xK, frozen)
        k_in = self.in_features or x_xK.shape[-1]
        kernel_KxN = self.param("kernel", logical_init(self.kernel_init, self.kernel_axes),
                                (k_in, self.features), self.param_dtype)
        if self.is_initializing() or self.has_variable("masks", "kernel"):
            ones = logical_init(lambda: jnp.ones((k_in, self.features), jnp.bool_),
                                self.kernel_axes)
            mask_KxN = self.variable("masks", "kernel", ones).value
        else:
            mask_KxN = None

        # Products run on [M, K] rows (M = all leading dims): XLA:CPU fuses the GELU of a
        # [B, L, F] product (and its derivative) into a 3-D dot as a slow loop, 2.6x the
        # 2-D GEMMs' time (tiny's MLP, fwd + bwd).
        lead = x_xK.shape[:-1]
        x_MxK = x_xK.astype(self.dtype).reshape(-1, x_xK.shape[-1])
        kernel_KxN = kernel_KxN.astype(self.dtype)
        sliced = in_index is not None or out_index is not None
        if sliced:
            # Gather the kept rows/columns: the matmul shrinks and the gradient of every other
            # entry is exactly zero (the gather's transpose scatters into zeros).
            if mask_KxN is not None and self.matmul != "masked":
                raise ValueError("SAT's neuron omission slices dense kernels; it needs "
                                 "--config.model.matmul=masked (not block_sparse).")
            kernel_KxN = _take(kernel_KxN, in_index, out_index)
            mask_KxN = None if mask_KxN is None else _take(mask_KxN, in_index, out_index)
        if mask_KxN is None:
            y_MxN = x_MxK @ kernel_KxN
        elif self.matmul == "masked" or self.is_initializing():
            # At init the masks are still all True, which no sparse block budget holds.
            y_MxN = x_MxK @ jnp.where(mask_KxN, kernel_KxN, jnp.zeros((), self.dtype))
        elif self.matmul == "block_sparse" and frozen is not None:
            y_MxN = _frozen_block_sparse(x_MxK, kernel_KxN, *frozen, self.kernel_backend)
        elif self.matmul == "block_sparse":
            tiers = self.block_tiers if tier is not None else ()
            y_MxN = _block_sparse(x_MxK, kernel_KxN, mask_KxN, self.block_size,
                                 tiers or (self.block_density,), tier, self.kernel_backend)
        else:
            raise ValueError(f"Unknown matmul {self.matmul!r}: use 'masked' or 'block_sparse' "
                             "(--config.model.matmul).")
        y_MxN = self._bias(y_MxN, out_index)
        return y_MxN.reshape(*lead, y_MxN.shape[-1])

    def _compact(self, x_xK: jax.Array, frozen: tuple | None) -> jax.Array:
        """The product of a compact kernel: blocks ``[Nb, T, B, B]``, indices ``[Nb, T]``."""
        import kernels  # local import: the model works without the kernels package loaded

        b, t, n = self.block_size, self.slots, self.features
        nb = n // b
        # Blocks split like the kernel: columns (Nb) by N's name, each block's rows by K's.
        axes = (self.kernel_axes[1], None, self.kernel_axes[0], None)
        blocks_NbxTxBxB = self.param("kernel", logical_init(self.kernel_init, axes),
                                     (nb, t, b, b), self.param_dtype)
        first = logical_init(lambda: jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (nb, t)),
                             axes[:2])  # shapes only: init_state builds the real indices
        if not (self.is_initializing() or self.has_variable("masks", "kernel")):
            raise ValueError("A compact kernel (model.sparse_storage=compact) needs its block "
                             "indices: apply the model with its masks collection, or densify "
                             "the params first (sparse_gpt.model.compact.densify).")
        kidx_NbxT = self.variable("masks", "kernel", first).value
        lead = x_xK.shape[:-1]
        x_MxK = x_xK.astype(self.dtype).reshape(-1, x_xK.shape[-1])
        blocks_NbxTxBxB = blocks_NbxTxBxB.astype(self.dtype)
        backend = self.kernel_backend

        if frozen is not None:
            def at(meta):
                return lambda x, w: kernels.compact_matmul(x, w, meta, backend=backend)
            y_MxN = _switched(at, frozen[0], frozen[1], (x_MxK, blocks_NbxTxBxB), (True, False))
        else:
            y_MxN = over_batch_shards(
                lambda x, w, i: kernels.compact_matmul(x, w, i, backend=backend),
                (x_MxK, blocks_NbxTxBxB, kidx_NbxT), (True, False, False))
        return self._bias(y_MxN).reshape(*lead, n)

    def _bias(self, y_MxN: jax.Array, out_index: jax.Array | None = None) -> jax.Array:
        """``y + bias`` (only the ``out_index`` columns of it), or ``y`` without a bias."""
        if not self.use_bias:
            return y_MxN
        bias_N = self.param("bias", logical_init(nn.initializers.zeros, self.kernel_axes[1:]),
                            (self.features,), self.param_dtype)
        if out_index is not None:
            bias_N = bias_N[out_index]
        return y_MxN + bias_N.astype(self.dtype)


def _take(w_KxN: jax.Array, rows: jax.Array | None, cols: jax.Array | None) -> jax.Array:
    if rows is not None:
        w_KxN = jnp.take(w_KxN, rows, axis=0)
    if cols is not None:
        w_KxN = jnp.take(w_KxN, cols, axis=1)
    return w_KxN


def _block_sparse(x_xK, kernel_KxN, mask_KxN, block_size, tiers, tier, backend):
    """Routes one projection through the block-sparse kernel (metadata built on device), at
    the block budget of ``tiers[tier]`` (one ``lax.switch`` branch per distinct budget)."""
    import kernels  # local import: the model works without the kernels package loaded

    k, n = kernel_KxN.shape

    def at(budget):
        def product(x_xK, kernel_KxN, mask_KxN):
            meta = kernels.make_block_meta(mask_KxN, block_size=block_size, budget=budget)
            return kernels.block_sparse_matmul(x_xK, kernel_KxN, meta, backend=backend)
        return product

    budgets = [kernels.block_budget(k, n, block_size, t) for t in tiers]
    return _switched(at, budgets, tier, (x_xK, kernel_KxN, mask_KxN), (True, False, False))


def _frozen_block_sparse(x_xK, kernel_KxN, metas: tuple, layer: jax.Array, backend: str):
    """The block-sparse product with a trace-time topology: the layer's ``metas`` entry."""
    import kernels  # local import: the model works without the kernels package loaded

    def at(meta):
        return lambda x_xK, kernel_KxN: kernels.block_sparse_matmul(x_xK, kernel_KxN, meta,
                                                                     backend=backend)

    return _switched(at, metas, layer, (x_xK, kernel_KxN), (True, False))


def _switched(product_at: Callable, choices: Sequence, index: jax.Array | None, args: tuple,
              batched: tuple[bool, ...]) -> jax.Array:
    """``product_at(choices[index])(*args)`` over the batch shards: one ``lax.switch``
    branch per distinct (hashable) choice, none when they are all the same."""
    distinct = list(dict.fromkeys(choices))

    def local(*args_and_index):
        *args, index = args_and_index
        if len(distinct) == 1:
            return product_at(distinct[0])(*args)
        branch = jnp.asarray([distinct.index(c) for c in choices], jnp.int32)[index]
        return jax.lax.switch(branch, [product_at(c) for c in distinct], *args)

    index = jnp.zeros((), jnp.int32) if index is None else index
    return over_batch_shards(local, (*args, index), (*batched, False))


def over_batch_shards(fn: Callable, args: tuple, batched: tuple[bool, ...]) -> jax.Array:
    """``fn(*args)``; on a mesh, inside ``shard_map`` over the axes of the "batch" rule.

    A Pallas kernel is opaque to XLA's partitioner: each device runs ``fn`` on its own rows
    of the ``batched`` args (the leading axis of ``args[0]`` is the batch) and whole copies
    of the others (all-gathered, as FSDP does anyway); the output is split like the rows.
    Tensor-parallel block-sparse kernels (split K or N with per-shard metadata) are not
    implemented: a tensor axis repeats work.
    """
    axes = _batch_axes(args[0].shape[0])
    if axes is None:
        return fn(*args)
    rows = P(axes)
    return jax.shard_map(fn, in_specs=tuple(rows if b else P() for b in batched),
                         out_specs=rows, axis_names=set(axes), check_vma=False)(*args)


def _batch_axes(batch: int) -> tuple[str, ...] | None:
    """Auto mesh axes of the context mesh that the logical "batch" axis maps to.

    None off a mesh, when those axes have size 1 or when they do not divide ``batch``
    (then XLA keeps the kernel's operands whole).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = nn.logical_to_mesh_axes(("batch",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    auto = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Auto}
    names = tuple(n for n in names if n in auto and mesh.shape[n] > 1)
    size = 1
    for n in names:
        size *= mesh.shape[n]
    return names if names and batch % size == 0 else None
