"""Pure grow functions and the optimizer-moment reset that gives new weights a clean start.

``masks' = regrow(masks, scores, n)`` turns on exactly ``n`` dead units per selection row (a
matrix, an output block column, or an N:M group; fewer only if fewer are dead), chosen by
the best score among dead units with ties going to the lower flat index; live units stay
live. Regrown weights start at zero: callers zero the units of :func:`grown` (dead before the
update, live after) with :func:`zero_entries` and reset the moments of :func:`changed` with
:func:`reset_moments`. A unit dropped and regrown by the same update is in neither, so it
keeps its value and moments, as in RigL's reference code and jaxpruner.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity.masks import UNSTRUCTURED, Structure
from sparse_gpt.sparsity import prune as prune_lib

Tree = Any


def regrow(masks: Tree, scores: Tree, n=None, structure: Structure = UNSTRUCTURED) -> Tree:
    """Turns on the ``n`` best-scoring dead units of every selection row of every scored leaf.

    Args:
      masks: mask tree.
      scores: grow scores (random, ``|grad|``, ...) on (a subset of) the mask paths.
      n: units grown per selection row (one row per matrix, per output block column for
        column-balanced blocks, per group for N:M; see ``prune.to_rows``): int, traced
        scalar, array per matrix or per row, or a path -> count map. ``None`` with ``nm``
        refills every group to ``structure.n`` live weights.
      structure: how the mask is constrained.

    Returns:
      The new mask tree; unscored leaves unchanged.
    """
    if n is None and structure.kind != "nm":
        raise ValueError("regrow needs n (units to grow per row) unless structure is nm.")
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    out = {}
    for p, s in flat_s.items():
        m = flat_m[p]
        live = prune_lib.to_rows(m, structure, "all")
        if n is None:  # N:M refill: each group grows back to n
            k = jnp.maximum(structure.n - jnp.sum(live, axis=-1, dtype=jnp.int32), 0)
        else:
            k = prune_lib.per_row(n[p] if isinstance(n, Mapping) else n, live.shape[0])
        new = prune_lib.select_rows(prune_lib.to_rows(s, structure, "mean"), ~live, k)
        out[p] = prune_lib.from_rows(live | new, m.shape, structure)
    return masks_lib.replace(masks, out)


def mixed_regrow(masks: Tree, grad_scores: Tree, random_scores: Tree, n,
                 random_fraction: float, structure: Structure = UNSTRUCTURED) -> Tree:
    """MST's mixed growing: ``n`` units per row, part by gradient and part at random.

    Per selection row, ``n_rand = round(random_fraction * n)`` and ``n_grad = n - n_rand``.
    The ``n_grad`` dead units with the largest ``grad_scores`` grow first; then the
    ``n_rand`` best ``random_scores`` among the units still dead, so the two parts never
    pick the same unit and the row grows exactly ``n`` (fewer only if fewer are dead).

    Args:
      masks: mask tree.
      grad_scores: ``|dL/dw|`` (dense gradient) on the leaves to grow.
      random_scores: uniform scores on the same leaves (``prune.random_scores``).
      n: units grown per row, as in :func:`regrow` (int, traced, per matrix, per row, or a
        path -> count map).
      random_fraction: share of the growth drawn at random, in [0, 1].
      structure: how the mask is constrained.

    Returns:
      The new mask tree.
    """
    flat = masks_lib.flatten(grad_scores)
    n_all = {p: jnp.asarray(n[p] if isinstance(n, Mapping) else n, jnp.int32) for p in flat}
    n_rand = {p: jnp.round(random_fraction * c).astype(jnp.int32) for p, c in n_all.items()}
    n_grad = {p: c - n_rand[p] for p, c in n_all.items()}
    by_grad = regrow(masks, grad_scores, n_grad, structure)
    return regrow(by_grad, random_scores, n_rand, structure)


def grown(old: Tree, new: Tree) -> Tree:
    """Units live in ``new`` but not in ``old``."""
    return jax.tree.map(lambda a, b: b & ~a, old, new)


def dropped(old: Tree, new: Tree) -> Tree:
    """Units live in ``old`` but not in ``new``."""
    return jax.tree.map(lambda a, b: a & ~b, old, new)


def changed(old: Tree, new: Tree) -> Tree:
    """Units whose state flipped (grown or dropped): the entries whose moments to reset."""
    return jax.tree.map(lambda a, b: a ^ b, old, new)


def zero_entries(tree: Tree, where: Tree) -> Tree:
    """Zeroes ``tree``'s entries where the bool tree ``where`` (on mask paths) is True."""
    flat_w = masks_lib.flatten(where)

    def one(path, x):
        w = flat_w.get(masks_lib.key_path_str(path))
        if w is None or getattr(x, "shape", None) != w.shape:
            return x
        return jnp.where(w, jnp.zeros((), x.dtype), x)

    return jax.tree_util.tree_map_with_path(one, tree)


def reset_moments(opt_state: Tree, reset_masks: Tree) -> Tree:
    """Zeroes the optimizer state of the entries flagged in ``reset_masks``, for any optax chain.

    The state is walked as a pytree. A leaf is a per-parameter moment when its key path *ends
    with* a mask path (``.../mu/blocks/attn/qkv/kernel``) and its shape equals the mask's;
    those leaves get zeros where the mask is True. This finds Adam(W)'s ``mu``/``nu``, SGD
    momentum's ``trace``, Lion's ``mu``, and the same inside ``chain``, ``masked``,
    ``inject_hyperparams`` or ``multi_transform`` wrappers, without a list of optimizer
    types. Scalars (step counts), hyper-parameters and factored statistics (Adafactor's row
    and column vectors, whose shapes differ from the kernel's) are left untouched.

    Args:
      opt_state: any optax state pytree.
      reset_masks: bool tree on mask paths (e.g. :func:`changed`), True = reset.

    Returns:
      ``opt_state`` with the flagged entries of every parameter-shaped moment zeroed.
    """
    flat = masks_lib.flatten(reset_masks)
    lengths = sorted({len(p.split("/")) for p in flat})

    def one(path, x):
        keys = masks_lib.key_path_str(path).split("/")
        for n in lengths:
            m = flat.get("/".join(keys[-n:]))
            if m is not None and getattr(x, "shape", None) == m.shape:
                return jnp.where(m, jnp.zeros((), x.dtype), x)
        return x

    return jax.tree_util.tree_map_with_path(one, opt_state)
