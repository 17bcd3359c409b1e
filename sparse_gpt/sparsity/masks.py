"""Mask pytrees: which kernels are sparse, their structure, and layer-wise densities.

Conventions (every sparsity module relies on them):

* A mask tree is a plain nested dict of ``jnp.bool_`` arrays that mirrors the params tree path
  for path, but only for the kernels that may be sparse. A kernel with no mask leaf (or a
  ``None`` leaf) is dense. ``True`` means "this weight is live".
* **A weight matrix is the last two axes of a leaf**, ``[..., K, N]`` (K inputs, N outputs).
  Leading axes - the stacked layer axis of the ``nn.scan``-ed decoder blocks - index
  independent layers. Every "layer-wise" operation (top-k, per-layer density, ERK, block
  pooling, N:M groups) acts on each ``[K, N]`` matrix separately, and a per-layer non-zero
  count is a count per matrix, i.e. an array of the leading shape.
* Paths are ``/``-joined dict keys, e.g. ``blocks/attn/qkv/kernel``. A path *pattern* matches
  a path when its ``/``-separated components (``fnmatch`` wildcards allowed) appear as a
  contiguous run of the path's components: ``attn/qkv`` and ``qkv`` both match
  ``blocks/attn/qkv/kernel``; ``mlp/*`` matches both MLP kernels.
* Structures: ``unstructured``; ``block`` (a ``bk x bn`` tile is live or dead as a whole, the
  kernels/ backend turns it into block metadata; optionally *column-balanced*, the same
  number of live blocks in every output block column); ``nm`` (exactly n live weights in every
  group of m consecutive weights along the input axis K, the axis NVIDIA's 2:4 sparse tensor
  cores reduce over). Block and N:M masks are stored at element resolution, so the model
  never needs to know which structure produced them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import expand_blocks, pool_blocks
from sparse_gpt.model import compact, gpt

Tree = Any
STRUCTURES = ("unstructured", "block", "nm")
BALANCES = ("none", "column")
DISTRIBUTIONS = ("uniform", "erk", "explicit")


# ----------------------------------------------------------------------------- tree paths

def flatten(tree: Tree) -> dict[str, Any]:
    """Flattens a nested dict into ``{"a/b/c": leaf}``; ``None`` leaves are dropped."""
    out = {}

    def visit(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(f"{prefix}/{k}" if prefix else str(k), v)
        elif node is not None:
            out[prefix] = node

    visit("", tree)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten`."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def parse_patterns(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Splits ``"attn/qkv, mlp/*"`` into ``("attn/qkv", "mlp/*")``."""
    if isinstance(spec, str):
        spec = spec.split(",")
    return tuple(p.strip().strip("/") for p in spec if p.strip())


def path_matches(path: str, pattern: str) -> bool:
    """Whether ``pattern``'s components occur as a contiguous run of ``path``'s components."""
    parts, pat = path.split("/"), pattern.strip("/").split("/")
    return any(all(fnmatch.fnmatchcase(parts[i + j], pat[j]) for j in range(len(pat)))
               for i in range(len(parts) - len(pat) + 1))


def select_paths(paths, patterns: tuple[str, ...], what: str = "sparse_layers") -> list[str]:
    """Returns the paths matched by any pattern; a pattern matching nothing is an error.

    Raises:
      ValueError: a pattern matches none of ``paths`` (usually a typo).
    """
    paths = list(paths)
    for pat in patterns:
        if not any(path_matches(p, pat) for p in paths):
            raise ValueError(
                f"{what} pattern {pat!r} matches no maskable kernel; the kernels are "
                f"{', '.join(paths)}. Fix the pattern in --config.sparsity.{what}.")
    return [p for p in paths if any(path_matches(p, pat) for pat in patterns)]


def dense_masks(params: Tree, patterns=None) -> dict:
    """All-True masks for the ``kernel`` leaves of ``params`` matched by ``patterns``.

    ``None``: the model's maskable kernels (``model.gpt.KERNELS``), i.e. what its ``masks``
    collection holds at init; tests and notebooks use it to build masks without running the
    model, also for partial trees.
    """
    if patterns is None:
        patterns = tuple(k.rsplit("/", 1)[0] for k in gpt.KERNELS)
    flat = {p: jnp.ones(x.shape, jnp.bool_) for p, x in flatten(params).items()
            if p.endswith("kernel") and x.ndim >= 2
            and any(path_matches(p, pat) for pat in parse_patterns(patterns))}
    return unflatten(flat)


def subtree(tree: Tree, like: Tree) -> dict:
    """The leaves of ``tree`` at the paths of ``like`` (e.g. the params that have masks)."""
    flat = flatten(tree)
    return unflatten({p: flat[p] for p in flatten(like)})


def key_path_str(path) -> str:
    """``/``-joined string of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def replace(tree: Tree, flat: Mapping[str, Any]) -> Tree:
    """``tree`` with the leaves at ``flat``'s paths swapped in; structure and types kept."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: flat.get(key_path_str(path), x), tree)


def apply_masks(params: Tree, masks: Tree) -> Tree:
    """Zeroes masked-out weights on masked leaves; other leaves and the tree type unchanged.

    A compact kernel's leaf (an index mask, ``model/compact.py``) holds live blocks only and
    is returned as it is.
    """
    flat_m = flatten(masks)

    def one(path, x):
        m = flat_m.get(key_path_str(path))
        if m is None or compact.is_compact(m):
            return x
        return jnp.where(m, x, jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map_with_path(one, params)


# ----------------------------------------------------------------------------- structure

@dataclasses.dataclass(frozen=True)
class Structure:
    """How a mask is constrained.

    Attributes:
      kind: ``unstructured`` | ``block`` | ``nm``.
      block: block shape ``(bk, bn)`` for ``block``.
      n: live weights per N:M group.
      m: N:M group length (along the input axis K).
      balance: ``block`` only. ``none``: a matrix keeps its best blocks wherever they are;
        ``column``: every output block column keeps the same number of blocks, which is what
        the block-sparse kernels' static per-column budget needs (``model.matmul=
        block_sparse``).
    """

    kind: str = "unstructured"
    block: tuple[int, int] = (128, 128)
    n: int = 2
    m: int = 4
    balance: str = "none"

    def __post_init__(self):
        if self.kind not in STRUCTURES:
            raise ValueError(f"Unknown sparsity structure {self.kind!r}; choose one of "
                             f"{', '.join(STRUCTURES)} (--config.sparsity.structure).")
        if self.kind == "block" and min(self.block) < 1:
            raise ValueError(f"Block shape {self.block} must be positive "
                             "(--config.sparsity.block_size).")
        if self.balance not in BALANCES:
            raise ValueError(f"Unknown block balance {self.balance!r}; choose one of "
                             f"{', '.join(BALANCES)} (--config.sparsity.block_balance).")
        if self.kind == "nm" and not 0 < self.n <= self.m:
            raise ValueError(f"N:M structure needs 0 < N <= M, got N={self.n}, M={self.m}; "
                             "set --config.sparsity.nm_n below or equal to nm_m.")

    def check(self, path: str, shape: tuple[int, ...]) -> None:
        """Raises ValueError when ``shape``'s matrix cannot carry this structure."""
        if len(shape) < 2:
            raise ValueError(f"{path}: a sparse kernel needs >= 2 axes, got shape {shape}.")
        k, n = shape[-2:]
        if self.kind == "block" and (k % self.block[0] or n % self.block[1]):
            raise ValueError(
                f"{path}: block {self.block[0]}x{self.block[1]} does not divide the kernel's "
                f"[{k}, {n}] matrix; choose --config.sparsity.block_size dividing both.")
        if self.kind == "nm" and k % self.m:
            raise ValueError(f"{path}: N:M groups of M={self.m} along the input axis do not "
                             f"divide K={k}; choose --config.sparsity.nm_m dividing {k}.")

    def units(self, shape: tuple[int, ...]) -> int:
        """Units (weights or blocks) per selection row: counts are per row, see prune.to_rows."""
        k, n = shape[-2:]
        if self.kind == "nm":
            return self.m
        if self.kind == "block":
            kb = k // self.block[0]
            return kb if self.balance == "column" else kb * (n // self.block[1])
        return k * n

    def relaxed(self) -> "Structure":
        """The structure with per-row constraints lifted (N:M -> unstructured, column-balanced
        blocks -> per-matrix blocks): dynamic methods drop under it, then regrow per row."""
        if self.kind == "nm":
            return UNSTRUCTURED
        return dataclasses.replace(self, balance="none")


UNSTRUCTURED = Structure()


def pool(x_KxN: jax.Array, block: tuple[int, int], reduce: str = "mean") -> jax.Array:
    """Pools element values ``[..., K, N]`` into block values ``[..., K/bk, N/bn]``.

    ``reduce`` is ``mean`` (scores: blocks compete by average magnitude), ``sum``, ``max``,
    ``all`` or ``any`` (masks).
    """
    return pool_blocks(jnp.asarray(x_KxN), block, reduce)  # the kernels' pooling, one copy


def expand(mask_KbxNb: jax.Array, block: tuple[int, int]) -> jax.Array:
    """Expands a block mask ``[..., Kb, Nb]`` to elements ``[..., Kb*bk, Nb*bn]``."""
    return expand_blocks(mask_KbxNb, block)


def is_block_structured(mask_KxN: jax.Array, block: tuple[int, int]) -> jax.Array:
    """True when every block is all-live or all-dead."""
    return jnp.all(pool(mask_KxN, block, "all") == pool(mask_KxN, block, "any"))


def nm_group_counts(mask_KxN: jax.Array, m: int) -> jax.Array:
    """Live weights per N:M group, ``[..., K/m, N]`` (groups run along the input axis K)."""
    *lead, k, n = mask_KxN.shape
    return jnp.sum(mask_KxN.reshape(*lead, k // m, m, n), axis=-2)


def nnz(mask: jax.Array) -> jax.Array:
    """Live weights per matrix: an int32 array of the leading (layer) shape."""
    return jnp.sum(mask, axis=(-2, -1), dtype=jnp.int32)


def all_live(masks: Tree) -> jax.Array:
    """Whether every mask leaf is all True: a bool scalar (traced under ``jit``).

    All-live masks describe the dense model, which then runs without its masks (see
    ``train_lib.dense_when_all_live``): a block-sparse kernel's block budget holds only the
    sparse density.
    """
    if any(compact.is_compact(m) for m in flatten(masks).values()):
        return jnp.zeros((), jnp.bool_)   # compact storage holds a sparse budget only
    leaves = [jnp.all(m) for m in flatten(masks).values()]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), jnp.bool_)


def n_keep(density, units: int):
    """Units a matrix of ``units`` keeps at ``density``: round-half-even, clipped to [1, units].

    Works on Python floats (returns int) and traced scalars (returns int32), so a static
    density and a scheduled one give the same counts.
    """
    if isinstance(density, (int, float)):
        return int(min(max(round(density * units), 1), units))
    return jnp.clip(jnp.round(density * units), 1, units).astype(jnp.int32)


# ----------------------------------------------------------------------------- densities

def check_density(density: float, what: str = "density") -> float:
    """Returns ``density`` as float, or raises ValueError if it is outside (0, 1]."""
    density = float(density)
    if not 0.0 < density <= 1.0 or math.isnan(density):
        raise ValueError(f"{what}={density} is outside (0, 1]: it is the fraction of weights "
                         f"kept, e.g. --config.sparsity.density=0.25 for 75% sparsity.")
    return density


def parse_density_map(spec: str) -> tuple[tuple[str, float], ...]:
    """Parses ``"attn/qkv=0.5, mlp/*=0.25"`` into ``(("attn/qkv", 0.5), ("mlp/*", 0.25))``."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if "=" not in item:
            raise ValueError(f"explicit_densities item {item!r} is not 'pattern=density'; "
                             "write e.g. --config.sparsity.explicit_densities='mlp/*=0.25'.")
        pat, val = item.rsplit("=", 1)
        out.append((pat.strip().strip("/"),
                    check_density(val, f"explicit_densities[{pat.strip()}]")))
    return tuple(out)


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities: ``d_i = eps * (K_i + N_i) / (K_i * N_i)``.

    ``eps`` is solved so that the live weights total ``density * sum_i size_i`` (sizes include
    the stacked layer axis; the ER ratio uses only the matrix axes). A layer whose ``d_i``
    would exceed 1 is made dense and ``eps`` re-solved without it, repeatedly, as in RigL.

    Args:
      shapes: path -> leaf shape ``[..., K, N]``.
      density: overall target density in (0, 1].

    Returns:
      path -> density, Python floats.
    """
    size = {p: float(np.prod(s)) for p, s in shapes.items()}
    raw = {p: (s[-2] + s[-1]) / (s[-2] * s[-1]) for p, s in shapes.items()}
    if density >= 1.0:
        return {p: 1.0 for p in shapes}
    total = sum(size.values())
    dense: set[str] = set()
    while True:
        free = [p for p in shapes if p not in dense]
        budget = density * total - sum(size[p] for p in dense)
        eps = budget / sum(raw[p] * size[p] for p in free)
        # Tolerance: with one free layer eps*raw is 1 up to rounding and must not loop.
        if not free or max(eps * raw[p] for p in free) <= 1.0 + 1e-9:
            break
        top = max(raw[p] for p in free)
        dense |= {p for p in free if raw[p] == top}
        if len(dense) == len(shapes):  # unreachable for density < 1; keeps the loop finite
            break
    return {p: 1.0 if p in dense else min(eps * raw[p], 1.0) for p in shapes}


def layer_densities(shapes: Mapping[str, tuple[int, ...]], density: float,
                    distribution: str = "uniform",
                    explicit: tuple[tuple[str, float], ...] = ()) -> dict[str, float]:
    """Per-leaf target densities of the sparse kernels.

    Args:
      shapes: path -> shape of each sparse kernel.
      density: overall (uniform, erk) or default (explicit) density in (0, 1].
      distribution: ``uniform`` | ``erk`` | ``explicit``.
      explicit: ``(pattern, density)`` pairs for ``explicit``; the first matching pattern
        wins, unmatched kernels get ``density``.

    Returns:
      path -> density (Python float).

    Raises:
      ValueError: unknown distribution, a density outside (0, 1], or an explicit pattern
        matching no kernel.
    """
    density = check_density(density)
    if distribution == "uniform":
        return {p: density for p in shapes}
    if distribution == "erk":
        return erk_densities(shapes, density)
    if distribution == "explicit":
        select_paths(shapes, tuple(p for p, _ in explicit), "explicit_densities")
        return {p: next((d for pat, d in explicit if path_matches(p, pat)), density)
                for p in shapes}
    raise ValueError(f"Unknown density distribution {distribution!r}; choose one of "
                     f"{', '.join(DISTRIBUTIONS)} (--config.sparsity.distribution).")
