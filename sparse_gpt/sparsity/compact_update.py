"""Topology updates of compact kernels: a method's update on the block view, then slots
rewritten in place (``model.sparse_storage=compact``, ``model/compact.py``).

A compact kernel stores T live blocks per output block column, ``[L, Nb, T, B, B]``, with
their K-block indices ``[L, Nb, T]`` as its mask. A method written for element masks runs
unchanged on the *block view*: each kernel seen as its ``[L, Kb, Nb]`` block mask, with
1 x 1 "blocks" (so every count, the relaxed per-matrix drop and the per-column regrowth are
the method's own), block scores in place of weights (the mean ``|w|`` of each live block;
RigL's mean ``|dL/dw|`` of each block of the dense gradient: the very values the element
masks' block pooling gives) and its own random draws per block. The new block mask is then
written back slot by slot: a kept block keeps its slot, value and moments; a dropped
block's slot takes one of its column's grown blocks (ascending), starting at zero with fresh
optimizer moments. Shapes never change, so an update never recompiles. Nothing dense-sized
is made but on RigL's dense-gradient steps (the dense view of the params and its gradient,
as the dense layout makes them too). The method's own ``update`` is not called (only its
``update_topology`` and ``is_update_step``), and it must keep every column's count, which
``plan`` checks (one budget tier).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import kernels
from sparse_gpt.model import compact
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import regrow as regrow_lib

Tree = Any
ONE_BY_ONE = masks_lib.Structure("block", (1, 1), balance="column")


def block_view(method):
    """``method`` acting on block masks: its structure's blocks become 1 x 1."""
    settings = dataclasses.replace(method.settings, structure=ONE_BY_ONE)
    return dataclasses.replace(method, settings=settings)


def _scatter_NbxT(values_LxNbxT: jax.Array, kidx_LxNbxT: jax.Array, kb: int) -> jax.Array:
    """Per-slot values -> ``[L, Kb, Nb]`` at each slot's (K-block, column); zeros elsewhere."""
    l, nb, _ = kidx_LxNbxT.shape
    cols = jnp.broadcast_to(jnp.arange(nb)[None, :, None], kidx_LxNbxT.shape)
    layers = jnp.broadcast_to(jnp.arange(l)[:, None, None], kidx_LxNbxT.shape)
    return jnp.zeros((l, kb, nb), values_LxNbxT.dtype).at[layers, kidx_LxNbxT, cols].set(
        values_LxNbxT)


def block_scores(cfg, blocks: Tree, masks: Tree) -> dict:
    """Mean ``|x|`` of each live block of a compact tree (params or gradients), as
    ``[L, Kb, Nb]`` per compact kernel path (zeros at dead blocks), nested like masks."""
    out, shapes = {}, cfg.kernel_shapes()
    for path in compact.compact_paths(cfg):
        means = jnp.mean(jnp.abs(compact.get(blocks, path)).astype(jnp.float32), (-2, -1))
        out[path] = _scatter_NbxT(means, compact.get(masks, path),
                                  shapes[path][1] // cfg.block_size)
    return masks_lib.unflatten(out)


def no_scores(cfg) -> dict:
    """Zero block scores (``[L, Kb, Nb]`` per compact kernel): the grow scores of a step
    that computes no dense gradient (same shapes as :func:`pooled_scores`)."""
    b, shapes = cfg.block_size, cfg.kernel_shapes()
    return masks_lib.unflatten({p: jnp.zeros((shapes[p][0], shapes[p][1] // b,
                                              shapes[p][2] // b), jnp.float32)
                                for p in compact.compact_paths(cfg)})


def pooled_scores(cfg, dense: Tree) -> dict:
    """Mean ``|x|`` of every block of a dense-layout tree (RigL's dense gradient), as
    ``[L, Kb, Nb]`` per compact kernel path, nested like masks."""
    b = cfg.block_size
    flat = masks_lib.flatten(dense)
    return masks_lib.unflatten({p: masks_lib.pool(jnp.abs(flat[p]).astype(jnp.float32), (b, b))
                                for p in compact.compact_paths(cfg)})


def rewrite_slots(kidx_LxNbxT: jax.Array, new_LxKbxNb: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """New indices for a new block mask holding the same number of blocks per column.

    Returns:
      ``(kidx, changed_LxNbxT)``: kept blocks stay in their slots; the dropped slots of a
      column take its grown K-blocks in ascending order; ``changed`` flags those slots.
    """
    l, kb, nb = new_LxKbxNb.shape
    old_LxKbxNb = jax.vmap(lambda i: kernels.index_block_mask(i, kb))(kidx_LxNbxT)
    grown_LxNbxKb = jnp.swapaxes(new_LxKbxNb & ~old_LxKbxNb, -1, -2)
    iota = jnp.arange(kb, dtype=jnp.int32)
    # Grown K-blocks of each column first, ascending (a stable sort of the key).
    order = jnp.argsort(jnp.where(grown_LxNbxKb, iota, iota + kb), axis=-1, stable=True)
    layers = jnp.arange(l)[:, None, None]
    cols = jnp.arange(nb)[None, :, None]
    freed_LxNbxT = ~new_LxKbxNb[layers, kidx_LxNbxT, cols]
    rank = jnp.cumsum(freed_LxNbxT, axis=-1) - 1
    taken = jnp.take_along_axis(order, jnp.maximum(rank, 0), axis=-1).astype(jnp.int32)
    return jnp.where(freed_LxNbxT, taken, kidx_LxNbxT), freed_LxNbxT


def commit(cfg, params: Tree, masks: Tree, opt_state: Tree, new_blocks: Tree):
    """Applies new block masks to compact params, masks and optimizer state.

    Returns:
      ``(params, masks, opt_state)``: slots rewritten (:func:`rewrite_slots`), their blocks
      zero and every parameter-shaped moment of them zero.
    """
    flat_new = masks_lib.flatten(new_blocks)
    new_params, new_masks, reset = {}, {}, {}
    for path in compact.compact_paths(cfg):
        kidx, changed = rewrite_slots(compact.get(masks, path), flat_new[path])
        blocks = compact.get(params, path)
        where = jnp.broadcast_to(changed[..., None, None], blocks.shape)
        new_masks[path], reset[path] = kidx, where
        new_params[path] = jnp.where(where, jnp.zeros((), blocks.dtype), blocks)
    opt_state = regrow_lib.reset_moments(opt_state, masks_lib.unflatten(reset))
    return (masks_lib.replace(params, new_params), masks_lib.replace(masks, new_masks),
            opt_state)


def updater(cfg, method):
    """``method.update`` for compact kernels (same signature): the update runs on the block
    view on the method's update steps; ``grads`` are block scores (``[L, Kb, Nb]`` per
    kernel: :func:`pooled_scores` of the dense gradient) for a method that grows by them,
    else ignored."""
    view = block_view(method)

    def update(step, params, masks, grads, opt_state, rng, state=None):
        rng = jax.random.fold_in(rng, jnp.asarray(step, jnp.int32))
        bgrads = grads if method.needs_dense_grads else None

        def do(ops):   # the scores and the block view are built on update steps only
            p, m, o = ops
            bmasks = masks_lib.unflatten(compact.block_masks(cfg, m))
            _, new, _ = view.update_topology(step, block_scores(cfg, p, m), bmasks, bgrads,
                                             {}, rng)
            return commit(cfg, p, m, o, new)

        out = lax.cond(method.is_update_step(step), do, lambda ops: ops,
                       (params, masks, opt_state))
        return (*out, state)

    return update
