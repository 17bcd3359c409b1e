"""Sparsity methods: ``build(config) -> SparsityMethod``.

=======  ==========================================================================
dense    every weight live (the baseline)
static   fixed random (or magnitude) topology at init, uniform / ERK / explicit densities;
         optionally dense after ``dense_finetune_start`` steps (masks lifted to all ones)
gmp      gradual magnitude pruning, dense -> sparse on Zhu & Gupta's cubic schedule
set      SET: magnitude drop, random regrowth, cosine-decayed drop fraction
rigl     RigL: magnitude drop, regrowth by dense-gradient magnitude
mst      MST: warm-up pruning, ultra-sparse evolution, restoration; mixed growing
=======  ==========================================================================

All configuration errors are raised here, at build time, with the fix in the message.
"""

from __future__ import annotations

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.flops import kernel_shapes
from sparse_gpt.sparsity.methods.base import Settings, SparsityMethod
from sparse_gpt.sparsity.methods.dense import Dense
from sparse_gpt.sparsity.methods.gmp import GMP
from sparse_gpt.sparsity.methods.mst import MST
from sparse_gpt.sparsity.methods.rigl import RigL
from sparse_gpt.sparsity.methods.set import SET
from sparse_gpt.sparsity.methods.static import Static

METHODS = {"dense": Dense, "static": Static, "gmp": GMP, "set": SET, "rigl": RigL, "mst": MST}

__all__ = ["METHODS", "Settings", "SparsityMethod", "build", "max_layer_density", "parse_settings",
           "Dense", "Static", "GMP", "SET", "RigL", "MST"]


def _choice(name: str, value: str, options) -> str:
    if value not in options:
        raise ValueError(f"Unknown sparsity.{name} {value!r}; choose one of "
                         f"{', '.join(options)} (--config.sparsity.{name}=...).")
    return value


def parse_settings(config) -> Settings:
    """Validates ``config.sparsity`` (against ``config.model`` / ``config.train``).

    Raises:
      ValueError: unknown method / distribution / structure / scope / schedule, a density
        outside (0, 1], a block size not dividing a sparse kernel's dims, N:M with N > M or
        M not dividing K, a dense phase (``dense_finetune_start``) outside the run or with a
        method other than static, or an inconsistent combination; the message says how to
        fix it.
    """
    sp = config.sparsity
    method = _choice("method", sp.method, METHODS)
    density = masks_lib.check_density(sp.density)
    distribution = _choice("distribution", sp.distribution, masks_lib.DISTRIBUTIONS)
    kind = _choice("structure", sp.structure, masks_lib.STRUCTURES)
    structure = masks_lib.Structure(kind, (int(sp.block_size), int(sp.block_size)),
                                    int(sp.nm_n), int(sp.nm_m),
                                    _choice("block_balance", sp.block_balance,
                                            masks_lib.BALANCES) if kind == "block" else "none")
    explicit = masks_lib.parse_density_map(sp.explicit_densities)
    if explicit and distribution != "explicit":
        raise ValueError("explicit_densities is set but distribution is "
                         f"{distribution!r}; set --config.sparsity.distribution=explicit "
                         "or clear explicit_densities.")
    num_steps = int(config.train.num_steps)
    update_end = int(sp.update_end) if int(sp.update_end) >= 0 else int(0.75 * num_steps)
    settings = Settings(
        method=method, density=density, distribution=distribution, explicit=explicit,
        structure=structure, sparse_layers=masks_lib.parse_patterns(sp.sparse_layers),
        init=_choice("init", sp.init, ("random", "magnitude")),
        update_every=int(sp.update_every),
        drop_fraction=float(sp.drop_fraction),
        drop_fraction_schedule=_choice("drop_fraction_schedule", sp.drop_fraction_schedule,
                                       ("cosine", "constant")),
        update_start=int(sp.update_start), update_end=update_end,
        prune_scope=_choice("prune_scope", sp.prune_scope, ("layer", "global")),
        gmp_power=float(sp.gmp_power),
        grow_init=_choice("grow_init", sp.grow_init, ("zeros",)),
        grow_balance=_choice("grow_balance", sp.get("grow_balance", "matrix"),
                             ("matrix", "neuron")),
        grow_grad_steps=int(sp.get("grow_grad_steps", 1)),
        dense_finetune_start=int(sp.get("dense_finetune_start", -1)),
        **_mst_settings(sp, update_end))
    _check_combination(settings, config)
    return settings


def _mst_settings(sp, update_end: int) -> dict:
    """MST keys; -1 phase ends default to 1/4 and 3/4 of ``[update_start, update_end]``."""
    start = int(sp.update_start)
    span = update_end - start

    def at(key, frac):
        value = int(sp.get(key, -1))
        return value if value >= 0 else start + round(frac * span)

    return dict(mst_warmup_end=at("mst_warmup_end", 0.25),
                mst_ultra_end=at("mst_ultra_end", 0.75),
                mst_final_density=float(sp.get("mst_final_density", 0.25)),
                mst_random_grow_fraction=float(sp.get("mst_random_grow_fraction", 0.25)),
                mst_restore_power=float(sp.get("mst_restore_power", 1.0)))


def _check_mst(s: Settings) -> None:
    """MST's phase order and knobs; each message names the keys to fix."""
    if s.structure.kind == "nm":
        raise ValueError("mst changes the density over training, which N:M cannot; use "
                         "--config.sparsity.structure=unstructured|block.")
    if not s.update_start < s.mst_warmup_end <= s.mst_ultra_end < s.update_end:
        raise ValueError(
            "mst needs update_start < mst_warmup_end <= mst_ultra_end < update_end, got "
            f"{s.update_start} / {s.mst_warmup_end} / {s.mst_ultra_end} / {s.update_end}; set "
            "--config.sparsity.mst_warmup_end / mst_ultra_end / update_end (-1: defaults).")
    # A final density below `density` is allowed and means "no restoration" (the layers
    # stay at their ultra-sparse densities): restoration only ever adds connections.
    masks_lib.check_density(s.mst_final_density, "mst_final_density")
    if not 0.0 <= s.mst_random_grow_fraction <= 1.0:
        raise ValueError(f"mst_random_grow_fraction={s.mst_random_grow_fraction} must be in "
                         "[0, 1] (0.25: a quarter of the grown weights at random).")
    if s.mst_restore_power <= 0:
        raise ValueError(f"mst_restore_power={s.mst_restore_power} must be > 0 (1: linear).")


def _check_dense_finetune(s: Settings, config) -> None:
    """``dense_finetune_start``: -1 (off) or the sparse steps before the dense phase."""
    start, num_steps = s.dense_finetune_start, int(config.train.num_steps)
    if start == -1:
        return
    if s.method != "static":
        raise ValueError(
            f"sparsity.dense_finetune_start={start} lifts a fixed topology to dense, so it needs "
            f"--config.sparsity.method=static (got {s.method!r}); or set "
            "--config.sparsity.dense_finetune_start=-1.")
    if not 1 <= start < num_steps:
        raise ValueError(
            f"sparsity.dense_finetune_start={start} must be -1 (no dense phase) or a step in "
            f"[1, train.num_steps - 1] = [1, {num_steps - 1}]: the number of sparse steps "
            "before the masks are lifted and training continues dense; e.g. "
            f"--config.sparsity.dense_finetune_start={max(1, int(0.9 * num_steps))} for a "
            "dense last 10%.")
    if config.model.get("matmul", "masked") == "block_sparse":
        from sparse_gpt.model import attention# attention imports the kernels package
        sat = config.get("sat")
        if attention.from_config(config) is not None or (sat is not None
                                                         and float(sat.omission_rate) > 0):
            raise ValueError(
                "A dense phase (sparsity.dense_finetune_start) with model.matmul=block_sparse "
                "switches the model between kernel and dense paths, which hybrid sparse "
                "attention and SAT do not support; set --config.attention.sparse_end=0 and "
                "--config.sat.omission_rate=0, or --config.model.matmul=masked.")


def _check_combination(s: Settings, config) -> None:
    """Cross-field checks; each message names the conflicting keys and a fix."""
    _check_dense_finetune(s, config)
    if s.method == "dense":
        if s.density != 1.0:
            raise ValueError(f"method=dense trains every weight, so density={s.density} would "
                             "be ignored; choose --config.sparsity.method=static|gmp|set|rigl "
                             "or set density=1.0.")
        return
    if s.structure.kind == "nm":
        if abs(s.density - s.structure.n / s.structure.m) > 1e-9:
            raise ValueError(f"structure=nm fixes the density at nm_n/nm_m = "
                             f"{s.structure.n}/{s.structure.m}; set --config.sparsity.density="
                             f"{s.structure.n / s.structure.m:g}.")
        if s.distribution != "uniform":
            raise ValueError("structure=nm has the same density n/m in every layer; set "
                             "--config.sparsity.distribution=uniform.")
        if s.method == "gmp":
            raise ValueError("gmp prunes gradually and has no N:M form here; use "
                             "structure=unstructured|block, or method=static|set|rigl for N:M.")
    if s.prune_scope == "global" and (s.method != "gmp" or s.distribution != "uniform"):
        raise ValueError("prune_scope=global ranks all layers together: it applies to "
                         "method=gmp with distribution=uniform only; set prune_scope=layer.")
    if s.prune_scope == "global" and s.structure.balance == "column":
        raise ValueError("prune_scope=global cannot keep column-balanced blocks; set "
                         "--config.sparsity.block_balance=none or prune_scope=layer.")
    if config.model.get("matmul", "masked") == "block_sparse" and (
            s.structure.kind != "block" or s.structure.balance != "column"):
        raise ValueError("model.matmul=block_sparse runs only column-balanced block masks; "
                         "set --config.sparsity.structure=block (block_balance=column), or "
                         "--config.model.matmul=masked.")
    if not 0.0 <= s.drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction={s.drop_fraction} must be in [0, 1].")
    if s.update_every < 1:
        raise ValueError(f"update_every={s.update_every} must be >= 1.")
    if s.method in ("gmp", "set", "rigl", "mst") and s.update_end <= s.update_start:
        raise ValueError(f"update_end={s.update_end} must be after update_start="
                         f"{s.update_start}; set --config.sparsity.update_end (-1 = 75% of "
                         "train.num_steps).")
    if s.method == "mst":
        _check_mst(s)
    if s.grow_grad_steps != 1 and (
            s.method not in ("rigl", "mst") or not 1 <= s.grow_grad_steps <= s.update_every):
        raise ValueError(
            f"grow_grad_steps={s.grow_grad_steps} sums the dense gradient that RigL/MST grow by "
            f"over the steps before each update: it needs method=rigl|mst (got {s.method!r}) "
            f"and 1 <= grow_grad_steps <= update_every ({s.update_every}). Set "
            "--config.sparsity.grow_grad_steps=1, or a value in that range.")
    if s.grow_balance == "neuron" and (s.method not in ("set", "rigl")
                                       or s.structure.kind != "unstructured"):
        raise ValueError(
            f"grow_balance=neuron keeps each hidden unit's live weights through SET/RigL "
            f"updates of unstructured masks; got method={s.method!r}, "
            f"structure={s.structure.kind!r}. Set --config.sparsity.grow_balance=matrix, or "
            "--config.sparsity.method=set|rigl with structure=unstructured.")
    # Shape checks against the model's kernels, before anything is initialised.
    shapes = kernel_shapes(config.model)
    for path in masks_lib.select_paths(sorted(shapes), s.sparse_layers):
        s.structure.check(path, shapes[path])


def max_layer_density(config) -> float:
    """The densest sparse matrix the method will ever hold (for static block budgets).

    1.0 for dense, gmp and mst (they start dense); otherwise the largest per-layer density of
    the configured distribution, after rounding to whole units (weights or blocks) per matrix.
    ERK gives small layers more than ``density``, so a block budget sized by ``density``
    alone would be too small. Static's dense phase (``dense_finetune_start``) lifts the masks
    to 1.0 but does not count here: all-live masks run without the kernel
    (``train_lib.dense_when_all_live``).
    """
    s = parse_settings(config)
    if s.method in ("dense", "gmp", "mst"):
        return 1.0
    shapes = kernel_shapes(config.model)
    paths = masks_lib.select_paths(sorted(shapes), s.sparse_layers)
    dens = masks_lib.layer_densities({p: shapes[p] for p in paths}, s.density,
                                     s.distribution, s.explicit)
    units = {p: s.structure.units(shapes[p]) for p in paths}
    return max(masks_lib.n_keep(dens[p], units[p]) / units[p] for p in paths)


def build(config) -> SparsityMethod:
    """Returns the configured method (a frozen, hashable dataclass).

    Args:
      config: the full config (``sparsity``, ``model`` and ``train.num_steps`` are read).

    Raises:
      ValueError: see :func:`parse_settings`.
    """
    settings = parse_settings(config)
    return METHODS[settings.method](settings)
