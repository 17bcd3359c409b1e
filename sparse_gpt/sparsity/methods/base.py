"""The SparsityMethod interface the train step calls, and the settings every method reads.

A method is a frozen (hashable) dataclass holding parsed :class:`Settings`. The train step
calls, inside ``jit``::

    masks = method.init_masks(params, masks, rng)             # once, after model init
    params, masks, opt_state = method.update(step, params, masks, grads, opt_state, rng)
                                                               # every step, after the optimizer

``update`` does its own ``lax.cond`` on :meth:`is_update_step`, so topology changes never
recompile. Subclasses override one or two small hooks, as in jaxpruner's sparse_trainers:
:meth:`update_topology` (what an update does), and for dynamic methods the drop / grow score
functions (see set.py and rigl.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import regrow as regrow_lib
from sparse_gpt.sparsity.masks import Structure

Tree = Any


@dataclasses.dataclass(frozen=True)
class Settings:
    """Parsed, validated ``config.sparsity`` (see ``methods.parse_settings``)."""

    method: str = "dense"
    density: float = 1.0
    distribution: str = "uniform"
    explicit: tuple[tuple[str, float], ...] = ()
    structure: Structure = masks_lib.UNSTRUCTURED
    sparse_layers: tuple[str, ...] = ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")
    init: str = "random"
    update_every: int = 100
    drop_fraction: float = 0.3
    drop_fraction_schedule: str = "cosine"
    update_start: int = 0
    update_end: int = 750
    prune_scope: str = "layer"
    gmp_power: float = 3.0
    grow_init: str = "zeros"
    grow_balance: str = "matrix"
    grow_grad_steps: int = 1
    # MST (methods/mst.py): phase boundaries (steps), restoration target, mixed growing.
    mst_warmup_end: int = 250
    mst_ultra_end: int = 500
    mst_final_density: float = 0.25
    mst_random_grow_fraction: float = 0.25
    mst_restore_power: float = 1.0
    # static only (methods/static.py): after this many steps the masks are lifted to all
    # ones and training continues dense (-1: never).
    dense_finetune_start: int = -1


@dataclasses.dataclass(frozen=True)
class SparsityMethod:
    """Dense training: the base every method refines. All methods are pure and jittable."""

    settings: Settings = Settings()
    needs_dense_grads: ClassVar[bool] = False

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
        kept (blocks, N:M groups).
        """
        sub = self.sparse_masks(masks)
        if self.settings.init == "magnitude":
            scores = prune_lib.magnitude(params, sub)
        else:
            scores = prune_lib.random_scores(rng, sub)
        return prune_lib.prune(masks, scores, self.target_densities(masks),
                               self.settings.structure)

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

    def is_update_step(self, step) -> jnp.ndarray:
        """Whether the topology changes at (traced) ``step``. Dense: never."""
        del step
        return jnp.zeros((), jnp.bool_)

    def grows_by_gradient(self, step) -> jnp.ndarray:
        """Whether the update at (traced) ``step`` grows by gradient (``needs_dense_grads``
        methods): every update by default; MST's warm-up updates only prune."""
        return self.is_update_step(step)

    def dense_grad_step(self, step) -> jnp.ndarray:
        """Whether (traced) ``step`` computes the dense gradient that growth scores by.

        False unless ``needs_dense_grads``. Then the ``grow_grad_steps`` steps ending at each
        update that grows by gradient: the train step sums their dense gradients
        (``TrainState.grow_grads``) and the update scores growth by ``|sum|``. The sum
        restarts after every update, so an update fewer than ``grow_grad_steps`` steps after
        the previous one (MST's phase boundaries) sums only the steps since.
        """
        if not self.needs_dense_grads:
            return jnp.zeros((), jnp.bool_)
        return functools.reduce(jnp.logical_or, [
            self.grows_by_gradient(step + j) for j in range(self.settings.grow_grad_steps)])

    def update_topology(self, step, params, masks, grads, opt_state, rng):
        """What an update step does; returns ``(params, masks, opt_state)``. Dense: nothing."""
        del step, grads, rng
        return params, masks, opt_state

    def update(self, step, params: Tree, masks: Tree, grads: Tree, opt_state: Tree,
               rng: jax.Array):
        """Called every step after the optimizer update; changes topology on update steps.

        Args:
          step: traced int, 0-based index of the step just taken.
          params: parameters after the optimizer update (and the train step's masking).
          masks: current mask tree.
          grads: on the update steps of ``needs_dense_grads`` methods, the dense gradient
            (with ``grow_grad_steps > 1`` its sum over the window, see
            :meth:`dense_grad_step`); else the ordinary (masked) gradients; may be None for
            methods that ignore them.
          opt_state: optax state after the update.
          rng: PRNG key; the step is folded in, so one key per run suffices.

        Returns:
          ``(params, masks, opt_state)`` with dropped weights zero, regrown weights zero and
          the optimizer moments of every changed entry reset.
        """
        if type(self).update_topology is SparsityMethod.update_topology:
            return params, masks, opt_state   # no topology changes: skip the cond entirely
        rng = jax.random.fold_in(rng, jnp.asarray(step, jnp.int32))

        def do(ops):
            return self.update_topology(step, *ops, rng)

        def skip(ops):
            p, m, _, o = ops
            return p, m, o

        return lax.cond(self.is_update_step(step), do, skip, (params, masks, grads, opt_state))
