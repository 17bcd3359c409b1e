"""Static sparse training: a fixed topology chosen at init (random or ERK), never changed.

Optionally followed by a dense fine-tuning phase (sparse-to-dense, the SambaNova recipe in
``sparse_gpt/configs/sparse_pretrain.py``): ``sparsity.dense_finetune_start = S`` trains
``S`` steps on the fixed topology, then lifts every mask to all ones and trains on dense.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity.methods.base import SparsityMethod


@dataclasses.dataclass(frozen=True)
class Static(SparsityMethod):
    """Prunes once at init to the configured per-layer densities, then trains that topology.

    ``distribution=uniform`` gives every sparse matrix the same density, ``erk`` the
    Erdos-Renyi-Kernel allocation; ``init=random`` picks live weights uniformly at random
    (with ``structure=block``, whole blocks; with ``nm``, n of every m). The train step must
    apply the returned masks to the freshly initialised params (``masks.apply_masks``).

    Dense fine-tuning (``dense_finetune_start = S >= 1``): the update that ends the
    S-th step (0-based step index ``S - 1``) lifts the masks to all ones, so every step from
    state step ``S`` on is dense (``density`` 1.0 and dense FLOPs in metrics.jsonl). The lifted
    weights start at zero with fresh optimizer moments, as regrown weights do. The lift is
    part of the state (the masks), so a run resumed from a checkpoint past ``S`` stays dense;
    a state at or past ``S`` whose masks are still sparse (a run resumed with a new ``S``) is
    lifted by the update of its first step.
    """

    dense_finetune_start: int

    def validate(self, shapes, num_steps):
        super().validate(shapes, num_steps)
        start = self.dense_finetune_start
        if start != -1 and not 1 <= start < num_steps:
            raise ValueError(
                f"sparsity.dense_finetune_start={start} must be -1 (no dense phase) or a step "
                f"in [1, train.num_steps - 1] = [1, {num_steps - 1}]: the number of sparse "
                "steps before the masks are lifted and training continues dense; e.g. "
                f"--config.sparsity.dense_finetune_start={max(1, int(0.9 * num_steps))} for a "
                "dense last 10%.")

    @property
    def goes_dense(self) -> bool:
        return self.dense_finetune_start >= 1

    def init_masks(self, params, masks, rng):
        return self.initial_topology(params, masks, rng)

    def is_update_step(self, step) -> jnp.ndarray:
        """True on the step whose update lifts the masks (never without a dense phase)."""
        start = self.dense_finetune_start
        if start < 1:
            return jnp.zeros((), jnp.bool_)
        return jnp.asarray(step) == start - 1

    def update_topology(self, step, params, masks, grads, opt_state, rng):
        """Lifts every mask to all ones (the start of the dense phase)."""
        del step, grads, rng
        return self.commit(params, masks, jax.tree.map(jnp.ones_like, masks), opt_state)

    def update(self, step, params, masks, grads, opt_state, rng, state=None):
        start = self.dense_finetune_start
        if start < 0:
            return params, masks, opt_state, state   # a fixed topology: nothing to do, no cond
        # At or past the boundary with sparse masks (also after a resume with a new start).
        lift = (jnp.asarray(step) >= start - 1) & ~masks_lib.all_live(masks)

        def do(ops):
            p, m, o = ops
            return self.update_topology(step, p, m, None, o, None)

        return (*lax.cond(lift, do, lambda ops: ops, (params, masks, opt_state)), state)
