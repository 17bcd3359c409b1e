"""Pure grow functions and the optimizer-moment reset that gives new weights a clean start.

``masks' = regrow(masks, scores, n)`` turns on exactly ``n`` dead units per matrix (fewer only
if fewer are dead), chosen by the best score among dead units with ties going to the lower
flat index; live units stay live. Regrown weights start at zero: callers zero them with
:func:`zero_entries` (a weight that was dropped and regrown in the same update must not keep
its old value) and reset their optimizer moments with :func:`reset_moments`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparse_gpt import masks as masks_lib
from sparse_gpt.masks import UNSTRUCTURED, Structure
from sparse_gpt.prune import from_units, nm_groups, nm_ungroup, select_rows, to_units

Tree = Any


def regrow(masks: Tree, scores: Tree, n=None, structure: Structure = UNSTRUCTURED) -> Tree:
    """Turns on the ``n`` best-scoring dead units of every matrix of every scored leaf.

    Args:
      masks: mask tree.
      scores: grow scores (random, ``|grad|``, ...) on (a subset of) the mask paths.
      n: units grown per matrix: int, traced scalar, array of the leaf's leading (layer)
        shape, or a path -> count map. Units are blocks for ``block``. For ``nm`` pass
        ``None``: every group is refilled to ``structure.n`` live weights.
      structure: how the mask is constrained.

    Returns:
      The new mask tree; unscored leaves unchanged.
    """
    if structure.kind == "nm":
        return regrow_nm(masks, scores, structure.n, structure.m)
    if n is None:
        raise ValueError("regrow needs n (units to grow per matrix) unless structure is nm.")
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    out = {}
    for p, s in flat_s.items():
        m = flat_m[p]
        k = n[p] if isinstance(n, Mapping) else n
        live = to_units(m, structure, "all")
        new = select_rows(to_units(s, structure, "mean"), ~live, jnp.reshape(jnp.asarray(k), (-1,)))
        out[p] = from_units(live | new, m.shape, structure)
    return masks_lib.replace(masks, out)


def regrow_nm(masks: Tree, scores: Tree, n: int, m: int) -> Tree:
    """Refills every group of ``m`` (along the input axis) to ``n`` live weights.

    Groups that already hold ``n`` or more are left as they are; the others gain their best
    dead weights. After an unstructured drop this restores an exact N:M mask, and the number
    grown equals the number dropped.
    """
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    out = {}
    for p, s in flat_s.items():
        live_Gxm = nm_groups(flat_m[p], m)
        need_G = jnp.maximum(n - jnp.sum(live_Gxm, axis=-1, dtype=jnp.int32), 0)
        new = select_rows(nm_groups(s, m), ~live_Gxm, need_G)
        out[p] = nm_ungroup(live_Gxm | new, flat_m[p].shape, m)
    return masks_lib.replace(masks, out)


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
