"""MST: Mixed Sparsity Training (Hu, Li & Huang, arXiv 2408.11746): three phases of sparsity.

Per sparse matrix ``i`` with ultra-sparse density ``u_i`` (``sparsity.density`` spread by
``distribution``, ERK in the paper) and final density ``f_i`` (``mst_final_density`` spread
the same way, never below ``u_i``), the scheduled density is (one ``schedules.piecewise``)::

    steps [.., update_start)              1 (dense)
    warm-up  [update_start, warmup_end)   cubic GMP curve 1 -> u_i          (prune only)
    ultra    [warmup_end, ultra_end)      u_i                               (evolve)
    restore  [ultra_end, update_end]      u_i -> f_i, (1 - frac)^restore_power   (evolve, grow more)
    after update_end                      f_i, topology frozen

Every ``update_every`` steps in ``[update_start, update_end]`` (and at ``warmup_end`` and
``update_end``, so the boundaries are hit exactly) an update, per selection row with ``c`` the
scheduled count (``masks.n_keep`` of the density):

1. prune the smallest ``|w|`` down to ``c`` if the row holds more (warm-up);
2. from ``warmup_end`` on, drop a further ``round(f * live)`` smallest ``|w|`` per matrix,
   ``f`` the prune fraction cosine-decayed from ``drop_fraction`` (0.3) to 0 over
   ``[warmup_end, update_end]`` (or constant);
3. grow back to ``c`` by *mixed growing* (``regrow.mixed_regrow``): ``1 - r`` of the grown
   units by dense-gradient magnitude, ``r = mst_random_grow_fraction`` (1/4) at random.
   In restoration ``c`` exceeds the live count, so more is grown than pruned.

Grown weights start at zero with fresh optimizer moments (``SparsityMethod.commit``).

Choices where the paper's text is silent (all config knobs): warm-up does no exploration
(the paper calls it gradual pruning); the prune fraction decays over the evolving phases
only; restoration is linear in density (``mst_restore_power=1``); the final density defaults
to 0.25; the gradient part grows first and the random part picks among the units still dead.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import regrow as regrow_lib
from sparse_gpt.sparsity import schedules
from sparse_gpt.sparsity.methods.set import SET


@dataclasses.dataclass(frozen=True)
class MST(SET):
    """Warm-up pruning, ultra-sparse dynamic training, restoration; mixed growing.

    Inherits SET's magnitude drop score; growth is by dense gradient and at random, so
    ``needs_dense_grads`` asks the train step for the dense gradient on the updates that grow
    (from ``mst_warmup_end`` on; over the ``grow_grad_steps`` steps ending at each, summed).
    """

    needs_dense_grads: ClassVar[bool] = True

    # ------------------------------------------------------------------ schedules
    def init_masks(self, params, masks, rng):
        """MST starts dense: warm-up prunes from the full topology."""
        del params, rng
        return masks

    def density_schedule(self, ultra: float, final: float):
        """``fn(step) -> density`` of one matrix: dense, warm-up, ultra, restoration, final."""
        s = self.settings
        warmup = schedules.gmp_density(ultra, s.update_start, s.mst_warmup_end,
                                       power=s.gmp_power)
        restore = schedules.gmp_density(final, s.mst_ultra_end, s.update_end,
                                        init_density=ultra, power=s.mst_restore_power)
        return schedules.piecewise([s.mst_warmup_end, s.mst_ultra_end],
                                   [warmup, schedules.constant(ultra), restore])

    def phase_densities(self, masks) -> dict[str, tuple[float, float]]:
        """path -> (ultra-sparse density, final density) of each sparse leaf."""
        s = self.settings
        ultra = self.target_densities(masks)
        flat = masks_lib.flatten(masks)
        shapes = {p: tuple(flat[p].shape) for p in ultra}
        final = masks_lib.layer_densities(shapes, s.mst_final_density, s.distribution,
                                          s.explicit)
        # Restoration only adds connections: a layer never ends sparser than in the ultra
        # phase (explicit densities may not rise with the overall density).
        return {p: (u, max(u, final[p])) for p, u in ultra.items()}

    def scheduled_densities(self, step, masks) -> dict[str, jnp.ndarray]:
        """path -> traced density of each sparse leaf at ``step``."""
        return {p: self.density_schedule(u, f)(step)
                for p, (u, f) in self.phase_densities(masks).items()}

    def is_update_step(self, step):
        s = self.settings
        step = jnp.asarray(step, jnp.int32)
        periodic = schedules.periodic(s.update_every, s.update_start, s.update_end)
        return periodic(step) | (step == s.mst_warmup_end) | (step == s.update_end)

    def grows_by_gradient(self, step):
        """Warm-up updates only prune, so they need no dense gradient."""
        return self.is_update_step(step) & (
            jnp.asarray(step, jnp.int32) >= self.settings.mst_warmup_end)

    def drop_fraction(self, step):
        """Prune fraction of the evolving phases: 0 in warm-up, then cosine from 0.3."""
        s = self.settings
        if s.drop_fraction_schedule == "constant":
            frac = schedules.constant(s.drop_fraction)(step)
        else:
            frac = schedules.cosine_decay(s.drop_fraction, s.update_end,
                                          s.mst_warmup_end)(step)
        return jnp.where(jnp.asarray(step, jnp.int32) >= s.mst_warmup_end, frac, 0.0)

    # ------------------------------------------------------------------ the update
    def update_topology(self, step, params, masks, grads, opt_state, rng):
        s = self.settings
        structure = s.structure
        sub = self.sparse_masks(masks)
        target = prune_lib.keep_counts(sub, self.scheduled_densities(step, masks), structure)
        drop_scores = self.drop_scores(params, grads, sub, rng)
        # 1. Warm-up (and the boundary update): prune each row down to its scheduled count.
        pruned = prune_lib.prune_to_count(masks, drop_scores, target, structure)
        # 2. Exploration: drop a further fraction per matrix under the relaxed structure.
        relaxed = structure.relaxed()
        frac = self.drop_fraction(step)
        live = prune_lib.live_counts(masks_lib.subtree(pruned, sub), relaxed)
        keep = {p: n - jnp.round(frac * n).astype(jnp.int32) for p, n in live.items()}
        dropped = prune_lib.prune_to_count(pruned, drop_scores, keep, relaxed)
        # 3. Mixed growing back to the scheduled count of every row (restoration: more).
        after = prune_lib.live_counts(masks_lib.subtree(dropped, sub), structure)
        grow = {p: jnp.maximum(jnp.asarray(target[p], jnp.int32) - after[p], 0)
                for p in after}
        new = regrow_lib.mixed_regrow(
            dropped, prune_lib.gradient_magnitude(grads, sub),
            prune_lib.random_scores(rng, sub), grow, s.mst_random_grow_fraction, structure)
        return self.commit(params, masks, new, opt_state)
