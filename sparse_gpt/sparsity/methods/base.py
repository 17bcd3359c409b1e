"""The SparsityMethod interface the train step calls, and the settings every method shares.

A method is a frozen (hashable) dataclass: the shared :class:`Settings` (``config.sparsity``
keys every method reads) plus its own fields, one per ``config.sparsity`` key of the same
name (``sparse_gpt.plan`` fills them in; their defaults live in ``sparse_gpt/config.py``).
The train step calls, inside ``jit``::

    masks = method.init_masks(params, masks, rng)              # once, after model init
    mstate = method.init_state(masks)                          # the method's own state
    params, masks, opt_state, mstate = method.update(step, params, masks, grads,
                                                     opt_state, rng, mstate)   # every step

``update`` does its own ``lax.cond`` on :meth:`is_update_step`, so topology changes never
recompile. Subclasses override small hooks, as in jaxpruner's sparse_trainers:
:meth:`update_topology` (what an update does), and for SET-style methods the drop / grow
scores, target counts and schedule (see set.py). :class:`GradientGrowth` adds what methods
that grow by the dense gradient (RigL, MST) share.

Methods defined outside the package are added with ``methods.register_method``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import regrow as regrow_lib
from sparse_gpt.sparsity.masks import Structure

Tree = Any
Shapes = Mapping[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``config.sparsity`` keys every method reads, parsed by ``sparse_gpt.plan``."""

    method: str
    density: float
    distribution: str
    explicit: tuple[tuple[str, float], ...]
    structure: Structure
    sparse_layers: tuple[str, ...]
    init: str
    update_every: int
    drop_fraction: float
    drop_fraction_schedule: str
    update_start: int
    update_end: int          # resolved: -1 in the config is 75% of train.num_steps
    grow_init: str


@dataclasses.dataclass(frozen=True)
class SparsityMethod:
    """Dense training: the base every method refines. All methods are pure and jittable."""

    settings: Settings
    needs_dense_grads: ClassVar[bool] = False
    # The method starts dense (its kernel budget must hold the whole matrix).
    starts_dense: ClassVar[bool] = False
    # The method changes the topology on a schedule over [update_start, update_end].
    evolves: ClassVar[bool] = False
    # Every mask stays all live for the whole run (dense training): the train step then
    # applies the model without its masks and does no mask work at all.
    always_dense: ClassVar[bool] = False

    @classmethod
    def resolve(cls, settings: Settings, values: dict) -> dict:
        """The method's field values from their config values (e.g. ``-1`` defaults)."""
        del settings
        return values

    # ------------------------------------------------------------------ config
    def validate(self, shapes: Shapes, num_steps: int) -> None:
        """Raises ValueError (naming the key and the fix) for settings this method cannot run.

        Args:
          shapes: path -> shape of every sparse kernel (the ``sparse_layers`` it acts on).
          num_steps: ``train.num_steps``.
        """
        del shapes, num_steps
        s = self.settings
        if self.evolves and s.update_end <= s.update_start:
            raise ValueError(f"update_end={s.update_end} must be after update_start="
                             f"{s.update_start}; set --config.sparsity.update_end (-1 = 75% of "
                             "train.num_steps).")

    def max_density(self, shapes: Shapes) -> float:
        """The densest sparse matrix the method ever holds (sizes static kernel budgets).

        1.0 for methods that start dense; otherwise the largest per-layer density of the
        distribution after rounding to whole units (weights or blocks) per selection row:
        ERK gives small layers more than ``density``.
        """
        if self.starts_dense:
            return 1.0
        return self._densest_at_target(shapes)

    def _densest_at_target(self, shapes: Shapes) -> float:
        s = self.settings
        dens = masks_lib.layer_densities(shapes, s.density, s.distribution, s.explicit)
        units = {p: s.structure.units(shapes[p]) for p in shapes}
        return max(masks_lib.n_keep(dens[p], units[p]) / units[p] for p in shapes)

    def column_slots(self, shapes: Shapes) -> dict[str, int]:
        """path -> live blocks per output block column of each sparse kernel at the target
        ``density`` (column-balanced blocks): the slots T of its compact storage."""
        s = self.settings
        dens = masks_lib.layer_densities(shapes, s.density, s.distribution, s.explicit)
        return {p: int(masks_lib.n_keep(dens[p], s.structure.units(shapes[p])))
                for p in shapes}

    def kernel_tiers(self, shapes: Shapes) -> tuple[float, ...]:
        """Block budgets (densities, ascending) a block-sparse model switches between.

        From the densest layer at the target ``density`` (the sparsest the budget gets),
        doubling, up to :meth:`max_density`: GMP from 1 down to 25% runs budgets of 1/4,
        1/2 and 1, each a compiled branch, so its sparse phase pays only its blocks. One
        tier (no switch) for a method whose density never changes. A method whose schedule
        goes below ``density`` (none built in) must override this.
        """
        low, top = self._densest_at_target(shapes), self.max_density(shapes)
        tiers = [low]
        while tiers[-1] * 2 < top - 1e-9:
            tiers.append(tiers[-1] * 2)
        return tuple(tiers + [top]) if top > low + 1e-9 else (top,)

    @property
    def goes_dense(self) -> bool:
        """Whether the masks may all become live during training: a block-sparse model must
        then leave the kernel (its block budget holds only the sparse density)."""
        return False

    # ------------------------------------------------------------------ helpers
    def sparse_paths(self, masks: Tree) -> list[str]:
        """Mask paths this method may sparsify (``sparse_layers`` patterns), sorted."""
        flat = masks_lib.flatten(masks)
        paths = masks_lib.select_paths(sorted(flat), self.settings.sparse_layers)
        for p in paths:
            self.settings.structure.check(p, flat[p].shape)
        return paths

    def target_densities(self, masks: Tree) -> dict[str, float]:
        """path -> final density of each sparse leaf, from the configured distribution."""
        flat = masks_lib.flatten(masks)
        s = self.settings
        shapes = {p: tuple(flat[p].shape) for p in self.sparse_paths(masks)}
        return masks_lib.layer_densities(shapes, s.density, s.distribution, s.explicit)

    def sparse_masks(self, masks: Tree) -> dict:
        """The sparse leaves of ``masks`` as a nested dict (what scores are computed on)."""
        flat = masks_lib.flatten(masks)
        return masks_lib.unflatten({p: flat[p] for p in self.sparse_paths(masks)})

    def initial_topology(self, params: Tree, masks: Tree, rng: jax.Array) -> Tree:
        """Prunes the sparse leaves from ``masks`` to their target densities.

        Scores are random (``init=random``) or ``|w|`` (``init=magnitude``); the structure is
        kept (blocks, N:M groups). Random blocks draw one score per block, on the block
        view of the masks: a uniformly random choice either way, and drawing a score per
        weight would make init's memory peak (a threefry draw of the kernels' size takes
        about four times that size in temporaries).
        """
        sub = self.sparse_masks(masks)
        structure, densities = self.settings.structure, self.target_densities(masks)
        if self.settings.init == "magnitude":
            scores = prune_lib.magnitude(params, sub)
        elif structure.kind == "block":
            block = structure.block
            pooled = jax.tree.map(lambda m: masks_lib.pool(m, block, "all"), sub)
            chosen = prune_lib.prune(pooled, prune_lib.random_scores(rng, pooled), densities,
                                     dataclasses.replace(structure, block=(1, 1)))
            return masks_lib.replace(masks, {p: masks_lib.expand(m, block) for p, m in
                                             masks_lib.flatten(chosen).items()})
        else:
            scores = prune_lib.random_scores(rng, sub)
        return prune_lib.prune(masks, scores, densities, structure)

    def commit(self, params: Tree, old: Tree, new: Tree, opt_state: Tree):
        """Applies a topology change: grown weights to zero, dropped ones masked, moments reset.

        Returns:
          ``(params, new, opt_state)``.
        """
        params = regrow_lib.zero_entries(params, regrow_lib.grown(old, new))
        params = masks_lib.apply_masks(params, new)
        opt_state = regrow_lib.reset_moments(opt_state, regrow_lib.changed(old, new))
        return params, new, opt_state

    # ------------------------------------------------------------------ the API
    def init_masks(self, params: Tree, masks: Tree, rng: jax.Array) -> Tree:
        """Initial topology. Dense: ``masks`` unchanged."""
        del params, rng
        return masks

    def init_state(self, masks: Tree) -> Tree | None:
        """The method's own state (``TrainState.sparsity_state``); None: it keeps none."""
        del masks
        return None

    def is_update_step(self, step) -> jnp.ndarray:
        """Whether the topology changes at (traced) ``step``. Dense: never."""
        del step
        return jnp.zeros((), jnp.bool_)

    def dense_grad_step(self, step) -> jnp.ndarray:
        """Whether (traced) ``step`` needs the dense gradient (see :class:`GradientGrowth`)."""
        del step
        return jnp.zeros((), jnp.bool_)

    def update_topology(self, step, params, masks, grads, opt_state, rng):
        """What an update step does; returns ``(params, masks, opt_state)``. Dense: nothing."""
        del step, grads, rng
        return params, masks, opt_state

    def update(self, step, params: Tree, masks: Tree, grads: Tree, opt_state: Tree,
               rng: jax.Array, state: Tree | None = None):
        """Called every step after the optimizer update; changes topology on update steps.

        Args:
          step: traced int, 0-based index of the step just taken.
          params: parameters after the optimizer update (and the train step's masking).
          masks: current mask tree.
          grads: on the steps of :meth:`dense_grad_step`, the dense gradient; else the
            ordinary (masked) gradients; may be None for methods that ignore them.
          opt_state: optax state after the update.
          rng: PRNG key; the step is folded in, so one key per run suffices.
          state: the method's state (:meth:`init_state`).

        Returns:
          ``(params, masks, opt_state, state)`` with dropped weights zero, regrown weights
          zero and the optimizer moments of every changed entry reset.
        """
        if type(self).update_topology is SparsityMethod.update_topology:
            return params, masks, opt_state, state   # no topology changes: no cond at all
        rng = jax.random.fold_in(rng, jnp.asarray(step, jnp.int32))

        def do(ops):
            return self.update_topology(step, *ops, rng)

        def skip(ops):
            p, m, _, o = ops
            return p, m, o

        out = lax.cond(self.is_update_step(step), do, skip, (params, masks, grads, opt_state))
        return (*out, state)


@dataclasses.dataclass(frozen=True)
class GradientGrowth(SparsityMethod):
    """What methods that grow by the dense gradient share (RigL, MST): put first in the bases.

    ``grow_grad_steps = K``: growth scores by ``|sum|`` of the dense gradients of the ``K``
    steps ending at each update that grows. The train step computes the dense gradient on
    those steps only (:meth:`dense_grad_step`); with ``K > 1`` the method's state holds the
    running sum (float32 on the sparse kernels' paths), restarted after every update, so an
    update fewer than ``K`` steps after the previous one (MST's phase boundaries) sums only
    the steps since.
    """

    grow_grad_steps: int
    needs_dense_grads: ClassVar[bool] = True

    def validate(self, shapes: Shapes, num_steps: int) -> None:
        super().validate(shapes, num_steps)
        if not 1 <= self.grow_grad_steps <= self.settings.update_every:
            raise ValueError(
                f"grow_grad_steps={self.grow_grad_steps} sums the dense gradient growth "
                "scores by over the steps before each update: it needs 1 <= grow_grad_steps"
                f" <= update_every ({self.settings.update_every}). Set "
                "--config.sparsity.grow_grad_steps=1, or a value in that range.")

    def grows_by_gradient(self, step) -> jnp.ndarray:
        """Whether the update at (traced) ``step`` grows by gradient: every update here."""
        return self.is_update_step(step)

    def dense_grad_step(self, step) -> jnp.ndarray:
        """The ``grow_grad_steps`` steps ending at each update that grows by gradient."""
        return functools.reduce(jnp.logical_or, [
            self.grows_by_gradient(step + j) for j in range(self.grow_grad_steps)])

    def init_state(self, masks: Tree) -> Tree | None:
        if self.grow_grad_steps == 1:
            return None
        return jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), self.sparse_masks(masks))

    def update(self, step, params, masks, grads, opt_state, rng, state=None):
        if state is None:
            return super().update(step, params, masks, grads, opt_state, rng, None)
        # Sum the window's dense gradients; the update scores growth by the sum.
        window = jax.tree.map(lambda a, g: jnp.where(self.dense_grad_step(step), a + g, 0.0),
                              state, masks_lib.subtree(grads, state))
        grads = masks_lib.replace(grads, masks_lib.flatten(window))
        params, masks, opt_state, _ = super().update(step, params, masks, grads, opt_state,
                                                     rng, None)
        window = jax.tree.map(lambda a: jnp.where(self.is_update_step(step), 0.0, a), window)
        return params, masks, opt_state, window
