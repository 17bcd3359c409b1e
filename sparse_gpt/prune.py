"""Scores and pure drop functions: ``masks' = prune(masks, scores, density)``.

Every function here is pure and jittable with static shapes: the number of weights kept may be
a traced scalar (a scheduled density), because selection is done by ranking, never by
``lax.top_k`` with a data-dependent ``k``. Ranking orders by (live first, score descending,
flat index ascending), so ties are broken deterministically towards the lower index and the
kept count is exact: ``min(k, live)`` per matrix, never more, never fewer.

Pruning only drops: a weight that is masked out never comes back through ``prune`` (that is
``regrow``'s job). Scores are trees holding one float array per mask leaf; leaves of
``masks`` without a score are returned unchanged, which is how callers restrict an operation
to the configured sparse layers.

Structures (see masks.py): ``block`` ranks blocks by their mean element score and expands
the block decision back to elements; ``nm`` keeps the ``n`` best live weights of every group
of ``m`` along the input axis.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt import masks as masks_lib
from sparse_gpt.masks import UNSTRUCTURED, Structure

Tree = Any


# ----------------------------------------------------------------------------- scores

def _on_mask_paths(tree: Tree, masks: Tree, fn, paths: Iterable[str] | None) -> dict:
    flat = masks_lib.flatten(tree)
    keep = masks_lib.flatten(masks) if paths is None else list(paths)
    return masks_lib.unflatten({p: fn(flat[p]).astype(jnp.float32) for p in keep})


def magnitude(params: Tree, masks: Tree, paths: Iterable[str] | None = None) -> dict:
    """``|w|`` for every mask leaf (or only ``paths``)."""
    return _on_mask_paths(params, masks, jnp.abs, paths)


def gradient_magnitude(grads: Tree, masks: Tree, paths: Iterable[str] | None = None) -> dict:
    """``|dL/dw|`` for every mask leaf (RigL's grow score when ``grads`` are dense)."""
    return _on_mask_paths(grads, masks, jnp.abs, paths)


def random_scores(rng: jax.Array, masks: Tree, paths: Iterable[str] | None = None) -> dict:
    """Uniform [0, 1) scores, a function of ``rng`` and the sorted mask paths and shapes.

    One draw covers all leaves (sliced by sorted path) because each separate draw is a
    separate threefry computation for XLA to compile.
    """
    flat = masks_lib.flatten(masks)
    keep = sorted(flat if paths is None else paths)
    sizes = [flat[p].size for p in keep]
    u = jax.random.uniform(rng, (sum(sizes),))
    out, start = {}, 0
    for p, n in zip(keep, sizes):
        out[p] = u[start:start + n].reshape(flat[p].shape)
        start += n
    return masks_lib.unflatten(out)


# ----------------------------------------------------------------------------- selection

def select_top(scores_S: jax.Array, eligible_S: jax.Array, k) -> jax.Array:
    """The ``k`` best eligible entries of a vector, as a bool mask.

    Args:
      scores_S: ``[S]`` scores (NaN counts as the worst score).
      eligible_S: ``[S]`` bool, entries that may be selected.
      k: int or traced int scalar; more than the eligible count selects all eligible.

    Returns:
      ``[S]`` bool with exactly ``min(k, sum(eligible))`` True entries.
    """
    s = scores_S.astype(jnp.float32)
    neg = -jnp.where(jnp.isnan(s), -jnp.inf, s)
    # sort orders -0.0 before +0.0 but == does not separate them: canonicalise zeros so the
    # threshold comparison below agrees with the sort.
    neg = jnp.where(neg == 0, 0.0, neg)
    dead = (~eligible_S).astype(jnp.int32)
    idx = jnp.arange(s.shape[0], dtype=jnp.int32)
    # Sort keys (dead, -score, index) are unique, so "key <= the k-th smallest key" selects
    # exactly k entries; no scatter of ranks needed.
    sd, sn, si = lax.sort((dead, neg, idx), num_keys=3)
    j = jnp.clip(k - 1, 0, s.shape[0] - 1)
    td, tn, ti = sd[j], sn[j], si[j]
    upto = (dead < td) | ((dead == td) & ((neg < tn) | ((neg == tn) & (idx <= ti))))
    return upto & (k > 0) & eligible_S


def select_rows(scores_LxS, eligible_LxS, k_L) -> jax.Array:
    """:func:`select_top` on each row, with a per-row (or shared) count."""
    k_L = jnp.broadcast_to(jnp.asarray(k_L, jnp.int32), scores_LxS.shape[:1])
    return jax.vmap(select_top)(scores_LxS, eligible_LxS, k_L)


def to_units(x: jax.Array, structure: Structure, reduce: str) -> jax.Array:
    """``[..., K, N]`` -> ``[L, U]``: one row of selectable units (weights or blocks) per matrix."""
    if structure.kind == "block":
        x = masks_lib.pool(x, structure.block, reduce)
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def from_units(u_LxU: jax.Array, shape: tuple[int, ...], structure: Structure) -> jax.Array:
    """Inverse of :func:`to_units` for masks: back to an element mask of ``shape``."""
    if structure.kind == "block":
        bk, bn = structure.block
        u = u_LxU.reshape(*shape[:-2], shape[-2] // bk, shape[-1] // bn)
        return masks_lib.expand(u, structure.block)
    return u_LxU.reshape(shape)


def nm_groups(x_KxN: jax.Array, m: int) -> jax.Array:
    """``[..., K, N]`` -> ``[G, m]``: each row one N:M group (m consecutive inputs)."""
    *lead, k, n = x_KxN.shape
    x = x_KxN.reshape(*lead, k // m, m, n)
    return jnp.swapaxes(x, -1, -2).reshape(-1, m)


def nm_ungroup(g_Gxm: jax.Array, shape: tuple[int, ...], m: int) -> jax.Array:
    """Inverse of :func:`nm_groups`."""
    *lead, k, n = shape
    return jnp.swapaxes(g_Gxm.reshape(*lead, k // m, n, m), -1, -2).reshape(shape)


def matrix_keep_counts(masks: Tree, density, structure: Structure = UNSTRUCTURED) -> dict:
    """path -> units each matrix keeps at ``density`` (a float, traced scalar or path map)."""
    flat = masks_lib.flatten(masks)
    dens = masks_lib.flatten(density) if isinstance(density, Mapping) else None
    return {p: masks_lib.n_keep(density if dens is None else dens[p], structure.units(m.shape))
            for p, m in flat.items() if dens is None or p in dens}


# ----------------------------------------------------------------------------- prune

def prune_to_count(masks: Tree, scores: Tree, keep, structure: Structure = UNSTRUCTURED) -> Tree:
    """Keeps the ``keep`` best live units of every matrix of every scored leaf.

    Args:
      masks: mask tree.
      scores: score tree on (a subset of) the mask paths.
      keep: units kept per matrix: an int, a traced scalar, an array of the leaf's leading
        (layer) shape, or a path -> count map of those. Units are weights, or blocks for
        ``structure.kind == "block"``.
      structure: ``unstructured`` or ``block`` (use :func:`prune_nm` for N:M).

    Returns:
      The new mask tree; unscored leaves unchanged.
    """
    if structure.kind == "nm":
        raise ValueError("prune_to_count keeps a count per matrix; N:M keeps n per group: "
                         "use prune_nm (or prune with the nm structure).")
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    keep_map = keep if isinstance(keep, Mapping) else None
    out = {}
    for p, s in flat_s.items():
        m = flat_m[p]
        k = keep if keep_map is None else keep_map[p]
        rows = select_rows(to_units(s, structure, "mean"), to_units(m, structure, "all"),
                           jnp.reshape(jnp.asarray(k), (-1,)))
        out[p] = from_units(rows, m.shape, structure)
    return masks_lib.replace(masks, out)


def prune_nm(masks: Tree, scores: Tree, n: int, m: int) -> Tree:
    """Keeps the ``n`` best live weights in every group of ``m`` along the input axis."""
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    out = {p: nm_ungroup(select_rows(nm_groups(s, m), nm_groups(flat_m[p], m), n),
                         flat_m[p].shape, m) for p, s in flat_s.items()}
    return masks_lib.replace(masks, out)


def prune(masks: Tree, scores: Tree, density, structure: Structure = UNSTRUCTURED) -> Tree:
    """Layer-wise drop: each matrix keeps ``n_keep(density, units)`` of its best live units.

    Args:
      masks: mask tree.
      scores: score tree (e.g. :func:`magnitude`) on the leaves to prune.
      density: float, traced scalar, or a path -> density map (e.g. ERK densities).
        Ignored for ``nm``, whose density is ``n / m`` by construction.
      structure: how the mask is constrained.

    Returns:
      The new mask tree.
    """
    if structure.kind == "nm":
        return prune_nm(masks, scores, structure.n, structure.m)
    keep = matrix_keep_counts(masks_lib.subtree(masks, scores), density, structure)
    return prune_to_count(masks, scores, keep, structure)


def prune_global(masks: Tree, scores: Tree, density,
                 structure: Structure = UNSTRUCTURED) -> Tree:
    """Global drop: the best units over *all* scored leaves survive, ``density`` of them.

    Per-layer counts float; the total count is exact. Scores must be comparable across
    layers (raw magnitudes are; use layer-wise :func:`prune` otherwise).
    """
    if structure.kind == "nm":
        raise ValueError("Global pruning has no N:M form (N:M is per group); use "
                         "--config.sparsity.prune_scope=layer with structure=nm.")
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    paths = sorted(flat_s)
    units_s = [to_units(flat_s[p], structure, "mean").reshape(-1) for p in paths]
    units_m = [to_units(flat_m[p], structure, "all").reshape(-1) for p in paths]
    total = sum(u.shape[0] for u in units_s)
    chosen = select_top(jnp.concatenate(units_s), jnp.concatenate(units_m),
                        masks_lib.n_keep(density, total))
    out, start = {}, 0
    for p, u in zip(paths, units_s):
        rows = chosen[start:start + u.shape[0]].reshape(-1, u.shape[0] // _rows(flat_m[p]))
        out[p] = from_units(rows, flat_m[p].shape, structure)
        start += u.shape[0]
    return masks_lib.replace(masks, out)


def _rows(x: jax.Array) -> int:
    """Number of matrices in a leaf (product of its leading axes)."""
    n = 1
    for d in x.shape[:-2]:
        n *= d
    return n
