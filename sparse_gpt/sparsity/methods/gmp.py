"""Gradual magnitude pruning (Zhu & Gupta 2017): dense to sparse on a cubic schedule."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import schedules
from sparse_gpt.sparsity.methods.base import SparsityMethod


@dataclasses.dataclass(frozen=True)
class GMP(SparsityMethod):
    """Starts dense; every ``update_every`` steps in ``[update_start, update_end]`` drops the
    smallest ``|w|`` down to the scheduled density, and once more at ``update_end`` so the
    final density is reached exactly.

    Each sparse leaf follows its own cubic curve from density 1 to its target (uniform, ERK
    or explicit), ``1 - s_i (1 - (1 - frac)^power)``. ``prune_scope=global`` instead ranks all
    sparse weights together against one global density (uniform distribution only). Pruned
    weights are zeroed and their optimizer moments reset; nothing regrows.
    """

    prune_scope: str
    gmp_power: float
    starts_dense = True
    evolves = True

    def validate(self, shapes, num_steps):
        super().validate(shapes, num_steps)
        s = self.settings
        if self.prune_scope not in ("layer", "global"):
            raise ValueError(f"Unknown sparsity.prune_scope {self.prune_scope!r}; choose one of "
                             "layer, global (--config.sparsity.prune_scope=...).")
        if s.structure.kind == "nm":
            raise ValueError("gmp prunes gradually and has no N:M form here; use "
                             "structure=unstructured|block, or method=static|set|rigl for N:M.")
        if self.prune_scope == "global" and s.distribution != "uniform":
            raise ValueError("prune_scope=global ranks all layers together: it needs "
                             "distribution=uniform; set prune_scope=layer.")
        if self.prune_scope == "global" and s.structure.balance == "column":
            raise ValueError("prune_scope=global cannot keep column-balanced blocks; set "
                             "--config.sparsity.block_balance=none or prune_scope=layer.")

    def density_schedule(self, final_density: float):
        s = self.settings
        return schedules.gmp_density(final_density, s.update_start, s.update_end,
                                     power=self.gmp_power)

    def is_update_step(self, step):
        s = self.settings
        step = jnp.asarray(step, jnp.int32)
        periodic = schedules.periodic(s.update_every, s.update_start, s.update_end)
        return periodic(step) | (step == s.update_end)

    def update_topology(self, step, params, masks, grads, opt_state, rng):
        del grads, rng
        s = self.settings
        sub = self.sparse_masks(masks)
        scores = prune_lib.magnitude(params, sub)
        if self.prune_scope == "global":
            new = prune_lib.prune_global(masks, scores, self.density_schedule(s.density)(step),
                                         s.structure)
        else:
            dens = {p: self.density_schedule(d)(step)
                    for p, d in self.target_densities(masks).items()}
            new = prune_lib.prune(masks, scores, dens, s.structure)
        return self.commit(params, masks, new, opt_state)
