"""Compact storage of block-sparse kernels: only the live blocks (``model.sparse_storage``).

A column-balanced block-sparse kernel keeps the same number T of live ``B x B`` blocks in
each of its Nb output block columns, so its live blocks fit a dense array of static shape.
Stored compact (``model.sparse_storage=compact``), each such kernel of the stacked decoder
blocks is, at the same tree paths as the dense layout:

    params .../kernel  [L, Nb, T, B, B]   block [l, j, t] = W_l[i*B:(i+1)*B, j*B:(j+1)*B]
    masks  .../kernel  [L, Nb, T] int32    i = kidx[l, j, t], distinct within a column

so the mask tree *is* the index tree (4 bytes per block against a byte per weight), and
everything that mirrors params (gradients, Adam's moments, checkpoints) holds live blocks
only. Slots start in ascending K-block order; a dynamic method replaces a dropped block's
slot in place, with a zero block and fresh moments. ``SparseDense`` multiplies the blocks
as they are (``kernels.compact_matmul``), with the gradient in the same shape.

This module converts between the layouts, tree by tree: :func:`to_compact` (a dense-layout
state's params and masks, as ``init_state`` builds them), :func:`densify` (the dense view:
analysis, export, the masked oracle, a dense phase) and :func:`densify_like` for any tree
that mirrors params (optimizer moments). Kernels not stored compact pass through.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Tree = Any


def is_compact(mask: Any) -> bool:
    """Whether a mask leaf is a compact index leaf (integer) rather than a bool mask."""
    return mask is not None and jnp.issubdtype(mask.dtype, jnp.integer)


def compact_paths(cfg) -> dict[str, int]:
    """``{params path: T}`` of the kernels ``cfg`` stores compact."""
    return {f"blocks/{key}/kernel": t for key, t in cfg.compact_slots}


def get(tree: Tree, path: str):
    """The leaf of nested dict ``tree`` at ``/``-joined ``path``."""
    node = tree
    for key in path.split("/"):
        node = node[key]
    return node


def _set(tree: Tree, path: str, value) -> Tree:
    """A copy of nested dict ``tree`` with the leaf at ``path`` replaced."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = _set(tree[key], rest, value) if rest else value
    return out


def to_compact(cfg, params: Tree, masks: Tree) -> tuple[Tree, Tree]:
    """``(params, masks)`` of the dense layout -> the compact layout of ``cfg``.

    Args:
      cfg: the compact ``ModelConfig`` (its ``compact_slots``, ``block_size``).
      params: dense-layout params (masked weights may be anything: only live blocks move).
      masks: their bool masks, column-balanced with exactly T live blocks per output block
        column of each compact kernel.

    Returns:
      Compact params (live blocks in ascending K-block order) and index masks.

    Raises:
      ValueError: (concrete masks) a column whose live-block count is not T.
    """
    import kernels  # local import: the model works without the kernels package loaded

    b = cfg.block_size
    for path, t in compact_paths(cfg).items():
        pooled_LxKbxNb = kernels.pool_blocks(get(masks, path), (b, b), "any")
        # One layer at a time: a concrete mask's column counts are checked per layer.
        kidx_LxNbxT = jnp.stack([kernels.compact_index(pooled_LxKbxNb[i], t)
                                 for i in range(pooled_LxKbxNb.shape[0])])
        masks = _set(masks, path, kidx_LxNbxT)
    return gather(cfg, params, masks), masks


def gather(cfg, tree: Tree, masks: Tree) -> Tree:
    """A dense-layout tree that mirrors params (params, a dense gradient) -> its live blocks
    at the compact kernels' paths, for the index ``masks``; other leaves kept."""
    import kernels

    b = cfg.block_size
    for path in compact_paths(cfg):
        leaf = jax.vmap(lambda w, i: kernels.gather_blocks(w, i, b))(get(tree, path),
                                                                 get(masks, path))
        tree = _set(tree, path, leaf)
    return tree


def block_masks(cfg, masks: Tree) -> dict[str, jax.Array]:
    """``{path: [L, Kb, Nb] bool}`` block masks of the compact kernels' index leaves."""
    import kernels

    shapes = cfg.kernel_shapes()
    return {path: jax.vmap(lambda i: kernels.index_block_mask(
        i, shapes[path][1] // cfg.block_size))(get(masks, path)) for path in compact_paths(cfg)}


def densify(cfg, params: Tree, masks: Tree) -> tuple[Tree, Tree]:
    """The dense view: ``(params, masks)`` of the dense layout (zeros outside live blocks).

    The exact inverse of :func:`to_compact` on live blocks; what ``eval`` of another
    layout, export and the masked oracle read.
    """
    import kernels

    b = cfg.block_size
    dense_masks = {p: kernels.expand_blocks(m, (b, b)) for p, m in block_masks(cfg, masks).items()}
    params = densify_like(cfg, params, masks)
    for path, m in dense_masks.items():
        masks = _set(masks, path, m)
    return params, masks


def densify_like(cfg, tree: Tree, masks: Tree) -> Tree:
    """Any tree whose leaves mirror params (optimizer moments, gradients) in the dense view.

    A leaf is densified when its key path ends with a compact kernel's path and it has the
    blocks' shape (as ``regrow.reset_moments`` finds moments); everything else is kept.
    """
    import kernels

    paths = compact_paths(cfg)
    shapes = cfg.kernel_shapes()

    def one(key_path, x):
        keys = jax.tree_util.keystr(key_path, simple=True, separator="/")
        for path in paths:
            kidx = get(masks, path)
            if keys.endswith(path) and getattr(x, "shape", None) == (
                    *kidx.shape, cfg.block_size, cfg.block_size):
                k = shapes[path][1]
                return jax.vmap(lambda w, i: kernels.densify_blocks(w, i, k))(x, kidx)
        return x

    return jax.tree_util.tree_map_with_path(one, tree)


def live_weights(cfg, kidx: Any) -> float:
    """Live weights of a compact index leaf: its slots times ``B * B``."""
    return float(kidx.size) * cfg.block_size ** 2
