"""Scores and pure drop functions: ``masks' = prune(masks, scores, density)``.

Every function here is pure and jittable with static shapes: the number of weights kept may be
a traced scalar (a scheduled density), because selection is done by ranking, never by
``lax.top_k`` with a data-dependent ``k``. Ranking orders by (live first, score descending,
flat index ascending), so ties are broken deterministically towards the lower index and the
kept count is exact: ``min(k, live)`` per selection row (a matrix, an output block column
of a column-balanced block mask, or an N:M group; see :func:`to_rows`). It costs 32 counting
passes over a row (a bitwise search for its ``k``-th best score, :func:`kth_largest`), not a
sort: ranking the 12.6M weights of a 4 x 512 model's sparse layers once takes ~0.3 s instead
of ~5 s on 2 CPU cores (benchmarks/update_cost.py times whole update steps).

Pruning only drops: a weight that is masked out never comes back through ``prune`` (that is
``regrow``'s job). Scores are trees holding one float array per mask leaf; leaves of
``masks`` without a score are returned unchanged, which is how callers restrict an operation
to the configured sparse layers.

Structures (see masks.py and :func:`to_rows`): ``block`` ranks blocks by their mean element
score and expands the block decision back to elements (per matrix, or per output block
column when column-balanced); ``nm`` keeps the ``n`` best live weights of every group of
``m`` along the input axis.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity.masks import UNSTRUCTURED, Structure

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

def _float_order_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values ``x`` (no NaN) are, -0.0 just below +0.0."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_key(u: jax.Array) -> jax.Array:
    """Inverse of :func:`_float_order_key`."""
    bits = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
    return lax.bitcast_convert_type(bits, jnp.float32)


def kth_largest(scores_RxS: jax.Array, eligible_RxS: jax.Array, k_R) -> jax.Array:
    """``[R]``: each row's ``k``-th largest eligible score (``1 <= k <=`` its eligible count).

    A bitwise search over the float32 order, one counting pass over the rows per bit (32 in
    all): linear in ``S`` where a sort is ``S log S`` (on three keys, ~15x slower on CPU at
    ``S = 2^20``). Candidates are clipped to ``[-inf, +inf]`` so they are never NaN, and
    counted with float comparisons, as the sort ranked them: a platform that flushes
    denormals to zero (XLA's CPU does) ranks them as zero in both. Scores must not be NaN.
    """
    lo, hi = (_float_order_key(jnp.float32(v)) for v in (-jnp.inf, jnp.inf))
    s = jnp.where(eligible_RxS, scores_RxS, jnp.nan)   # NaN >= x is False: one array to scan

    def bit(i, t_R):
        cand_R = t_R | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        value_R = _from_order_key(jnp.clip(cand_R, lo, hi))
        ok_R = jnp.sum(s >= value_R[:, None], axis=-1, dtype=jnp.int32) >= k_R
        return jnp.where(ok_R, cand_R, t_R)

    t_R = lax.fori_loop(0, 32, bit, jnp.zeros(scores_RxS.shape[:1], jnp.uint32))
    return _from_order_key(jnp.clip(t_R, lo, hi))


def select_rows(scores_RxS, eligible_RxS, k_R) -> jax.Array:
    """The ``k`` best eligible entries of every row, as a bool mask.

    Order: score descending (NaN counts as the worst score, ``-0.0 == 0.0``), ties to the
    lower index. Each row's ``k``-th best score ``T`` comes from :func:`kth_largest`; every
    entry above ``T`` is kept and the ties at ``T`` fill the rest in index order, so a row is
    what sorting it by (ineligible, -score, index) and taking the first ``k`` gives.

    Args:
      scores_RxS: ``[R, S]`` scores.
      eligible_RxS: ``[R, S]`` bool, entries that may be selected.
      k_R: per-row count ``[R]`` or one shared count (int or traced); more than a row's
        eligible count selects all of them.

    Returns:
      ``[R, S]`` bool with exactly ``min(k, eligible)`` True entries per row.
    """
    s = scores_RxS.astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    k_R = jnp.broadcast_to(jnp.asarray(k_R, jnp.int32), s.shape[:1])
    k_R = jnp.clip(k_R, 0, jnp.sum(eligible_RxS, axis=-1, dtype=jnp.int32))
    t_R = kth_largest(s, eligible_RxS, jnp.maximum(k_R, 1))[:, None]
    above = eligible_RxS & (s > t_R)
    tie = eligible_RxS & (s == t_R)
    need_R = k_R - jnp.sum(above, axis=-1, dtype=jnp.int32)
    # Index order among the ties matters only where they do not all fit (rare with float
    # scores), so the running count is skipped otherwise.
    return above | lax.cond(
        jnp.any(jnp.sum(tie, axis=-1, dtype=jnp.int32) > need_R),
        lambda: tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= need_R[:, None]),
        lambda: tie)


def select_top(scores_S: jax.Array, eligible_S: jax.Array, k) -> jax.Array:
    """:func:`select_rows` of one vector: ``[S]`` bool, ``min(k, sum(eligible))`` True."""
    return select_rows(scores_S[None], eligible_S[None], k)[0]


def to_rows(x: jax.Array, structure: Structure, reduce: str) -> jax.Array:
    """``[..., K, N]`` -> ``[R, U]``: the selection rows of a leaf under ``structure``.

    Counts (kept, grown) are per row, so a row is the set inside which units compete:

    * ``unstructured``: one row per matrix, ``U = K * N`` weights;
    * ``block``, ``balance="none"``: one row per matrix, ``U = Kb * Nb`` blocks;
    * ``block``, ``balance="column"``: one row per (matrix, output block column),
      ``U = Kb`` blocks - equal work per output column, as the block-sparse kernels'
      per-column budget requires;
    * ``nm``: one row per group of ``m`` consecutive inputs, ``U = m``.

    Element values are pooled into blocks with ``reduce`` (``mean`` for scores, ``all`` for
    masks). Rows are ordered matrix-major, so a per-matrix count ``[L]`` repeats over the
    rows of each matrix.
    """
    if structure.kind == "nm":
        *lead, k, n = x.shape
        x = x.reshape(*lead, k // structure.m, structure.m, n)
        return jnp.swapaxes(x, -1, -2).reshape(-1, structure.m)
    if structure.kind == "block":
        x = masks_lib.pool(x, structure.block, reduce)
        if structure.balance == "column":
            return jnp.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def from_rows(rows_RxU: jax.Array, shape: tuple[int, ...], structure: Structure) -> jax.Array:
    """Inverse of :func:`to_rows` for masks: back to an element mask of ``shape``."""
    *lead, k, n = shape
    if structure.kind == "nm":
        g = rows_RxU.reshape(*lead, k // structure.m, n, structure.m)
        return jnp.swapaxes(g, -1, -2).reshape(shape)
    if structure.kind == "block":
        kb, nb = k // structure.block[0], n // structure.block[1]
        if structure.balance == "column":
            u = jnp.swapaxes(rows_RxU.reshape(*lead, nb, kb), -1, -2)
        else:
            u = rows_RxU.reshape(*lead, kb, nb)
        return masks_lib.expand(u, structure.block)
    return rows_RxU.reshape(shape)


def live_counts(masks: Tree, structure: Structure = UNSTRUCTURED) -> dict:
    """path -> ``[R]`` int32 live units per selection row (see :func:`to_rows`)."""
    return {p: jnp.sum(to_rows(m, structure, "all"), axis=-1, dtype=jnp.int32)
            for p, m in masks_lib.flatten(masks).items()}


def keep_counts(masks: Tree, density, structure: Structure = UNSTRUCTURED) -> dict:
    """path -> units each selection row keeps at ``density`` (float, traced or path map).

    ``nm`` keeps ``structure.n`` per group whatever the density.
    """
    flat = masks_lib.flatten(masks)
    dens = masks_lib.flatten(density) if isinstance(density, Mapping) else None
    out = {}
    for p, m in flat.items():
        if dens is not None and p not in dens:
            continue
        d = density if dens is None else dens[p]
        out[p] = structure.n if structure.kind == "nm" else masks_lib.n_keep(
            d, structure.units(m.shape))
    return out


def per_row(count, rows: int) -> jax.Array:
    """A count (scalar, per matrix ``[L, ...]`` or per row ``[R]``) broadcast to ``[R]``."""
    c = jnp.reshape(jnp.asarray(count, jnp.int32), (-1,))
    if c.shape[0] == 1:
        return jnp.broadcast_to(c, (rows,))
    if rows % c.shape[0]:
        raise ValueError(f"{c.shape[0]} counts do not map onto {rows} selection rows.")
    return jnp.repeat(c, rows // c.shape[0])


# ----------------------------------------------------------------------------- fused kernels

def split_fused(tree: Tree, parts: Mapping[str, int]) -> Tree:
    """Views each fused leaf ``[..., K, P * N]`` as ``P`` stacked matrices ``[..., P, K, N]``.

    A fused kernel holds ``P`` matrices side by side in its output columns (the attention's
    ``qkv`` kernel is q, k and v). Stacked leading axes are separate selection rows for
    every function here, so on this view each part keeps its own counts, as separate
    layers would. Leaves not in ``parts`` (and ``None``) pass through; :func:`join_fused`
    is the inverse.

    Args:
      tree: params, masks, scores or gradients (nested dicts).
      parts: path -> number of column parts ``P`` (must divide the output axis).

    Returns:
      The tree with the fused leaves reshaped.
    """
    if not parts or tree is None:
        return tree

    def one(x, p):
        *lead, k, n = x.shape
        return jnp.moveaxis(x.reshape(*lead, k, p, n // p), -2, -3)

    flat = masks_lib.flatten(tree)
    return masks_lib.replace(tree, {q: one(flat[q], p) for q, p in parts.items() if q in flat})


def join_fused(tree: Tree, parts: Mapping[str, int]) -> Tree:
    """Inverse of :func:`split_fused`: ``[..., P, K, N]`` back to ``[..., K, P * N]``."""
    if not parts or tree is None:
        return tree

    def one(x):
        x = jnp.moveaxis(x, -3, -2)
        *lead, k, p, n = x.shape
        return x.reshape(*lead, k, p * n)

    flat = masks_lib.flatten(tree)
    return masks_lib.replace(tree, {q: one(flat[q]) for q in parts if q in flat})


def swap_last_axes(tree: Tree, paths: Iterable[str]) -> Tree:
    """Transposes the ``[..., K, N]`` leaves at ``paths`` to ``[..., N, K]`` (its own inverse).

    Selection rows run over output columns (see :func:`to_rows`); on this view they run over
    the input rows of those leaves instead.
    """
    flat = masks_lib.flatten(tree)
    return masks_lib.replace(tree, {p: jnp.swapaxes(flat[p], -1, -2) for p in paths
                                    if p in flat})


# ----------------------------------------------------------------------------- prune

def prune_to_count(masks: Tree, scores: Tree, keep, structure: Structure = UNSTRUCTURED) -> Tree:
    """Keeps the ``keep`` best live units of every selection row of every scored leaf.

    Args:
      masks: mask tree.
      scores: score tree on (a subset of) the mask paths.
      keep: units kept per row (see :func:`to_rows`): an int, a traced scalar, an array
        per matrix (the leaf's leading shape; repeated over the matrix's rows), an array per
        row, or a path -> count map of those.
      structure: how the mask is constrained.

    Returns:
      The new mask tree; unscored leaves unchanged.
    """
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    out = {}
    for p, s in flat_s.items():
        m = flat_m[p]
        live = to_rows(m, structure, "all")
        k = keep[p] if isinstance(keep, Mapping) else keep
        rows = select_rows(to_rows(s, structure, "mean"), live, per_row(k, live.shape[0]))
        out[p] = from_rows(rows, m.shape, structure)
    return masks_lib.replace(masks, out)


def prune(masks: Tree, scores: Tree, density, structure: Structure = UNSTRUCTURED) -> Tree:
    """Layer-wise drop: each row keeps ``n_keep(density, units)`` of its best live units.

    Args:
      masks: mask tree.
      scores: score tree (e.g. :func:`magnitude`) on the leaves to prune.
      density: float, traced scalar, or a path -> density map (e.g. ERK densities).
        Ignored for ``nm``, which keeps ``n`` of every ``m``.
      structure: how the mask is constrained.

    Returns:
      The new mask tree.
    """
    keep = keep_counts(masks_lib.subtree(masks, scores), density, structure)
    return prune_to_count(masks, scores, keep, structure)


def prune_global(masks: Tree, scores: Tree, density,
                 structure: Structure = UNSTRUCTURED) -> Tree:
    """Global drop: the best units over *all* scored leaves survive, ``density`` of them.

    Per-layer counts float; the total count is exact. Scores must be comparable across
    layers (raw magnitudes are; use layer-wise :func:`prune` otherwise). Unstructured or
    unbalanced blocks only: N:M and column balance fix per-row counts, which global
    ranking cannot keep.
    """
    if structure.kind == "nm" or structure.balance == "column":
        raise ValueError("Global pruning cannot keep N:M or column-balanced counts; use "
                         "--config.sparsity.prune_scope=layer (or block_balance=none).")
    flat_m, flat_s = masks_lib.flatten(masks), masks_lib.flatten(scores)
    paths = sorted(flat_s)
    rows_s = [to_rows(flat_s[p], structure, "mean") for p in paths]
    rows_m = [to_rows(flat_m[p], structure, "all") for p in paths]
    total = sum(r.size for r in rows_s)
    chosen = select_top(jnp.concatenate([r.reshape(-1) for r in rows_s]),
                        jnp.concatenate([r.reshape(-1) for r in rows_m]),
                        masks_lib.n_keep(density, total))
    out, start = {}, 0
    for p, r in zip(paths, rows_s):
        out[p] = from_rows(chosen[start:start + r.size].reshape(r.shape), flat_m[p].shape,
                           structure)
        start += r.size
    return masks_lib.replace(masks, out)
