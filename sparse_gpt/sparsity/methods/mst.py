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

Grown weights start at zero with fresh optimizer moments (``SparsityMethod.commit``). MST is
SET (set.py) with other hooks: the scheduled densities, the prune fraction and mixed growing;
like SET it evolves the fused ``qkv`` kernel as its q, k and v matrices, each with its own
counts (before they were pooled, and gradient growth moved weights from q and k to v).

Choices where the paper's text is silent (all config knobs): warm-up does no exploration
(the paper calls it gradual pruning); the prune fraction decays over the evolving phases
only; restoration is linear in density (``mst_restore_power=1``); the final density defaults
to 0.25; the gradient part grows first and the random part picks among the units still dead.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import regrow as regrow_lib
from sparse_gpt.sparsity import schedules
from sparse_gpt.sparsity.methods.base import GradientGrowth
from sparse_gpt.sparsity.methods.set import SET


@dataclasses.dataclass(frozen=True)
class MST(GradientGrowth, SET):
    """Warm-up pruning, ultra-sparse dynamic training, restoration; mixed growing.

    SET's update with MST's hooks: :meth:`scheduled_densities` (the three phases),
    :meth:`drop_fraction` (0 in warm-up) and :meth:`grow` (mixed growing). Growth is by
    dense gradient and at random, so ``GradientGrowth`` asks the train step for the dense
    gradient on the updates that grow (from ``mst_warmup_end`` on; over the
    ``grow_grad_steps`` steps ending at each, summed).
    """

    mst_warmup_end: int       # resolved: -1 in the config is 1/4 of the update window
    mst_ultra_end: int        # resolved: -1 is 3/4 of the update window
    mst_final_density: float
    mst_random_grow_fraction: float
    mst_restore_power: float
    gmp_power: float
    starts_dense = True

    @classmethod
    def resolve(cls, settings, values):
        """Phase ends of -1 default to 1/4 and 3/4 of ``[update_start, update_end]``."""
        start, span = settings.update_start, settings.update_end - settings.update_start
        out = dict(values)
        for key, frac in (("mst_warmup_end", 0.25), ("mst_ultra_end", 0.75)):
            if int(out[key]) < 0:
                out[key] = start + round(frac * span)
        return out

    def validate(self, shapes, num_steps):
        super().validate(shapes, num_steps)
        s = self.settings
        if s.structure.kind == "nm":
            raise ValueError("mst changes the density over training, which N:M cannot; use "
                             "--config.sparsity.structure=unstructured|block.")
        if self.grow_balance != "matrix":
            raise ValueError("mst grows per matrix; set --config.sparsity.grow_balance=matrix "
                             "(neuron balance is for method=set|rigl).")
        if not s.update_start < self.mst_warmup_end <= self.mst_ultra_end < s.update_end:
            raise ValueError(
                "mst needs update_start < mst_warmup_end <= mst_ultra_end < update_end, got "
                f"{s.update_start} / {self.mst_warmup_end} / {self.mst_ultra_end} / "
                f"{s.update_end}; set --config.sparsity.mst_warmup_end / mst_ultra_end / "
                "update_end (-1: defaults).")
        # A final density below `density` is allowed and means "no restoration" (the layers
        # stay at their ultra-sparse densities): restoration only ever adds connections.
        masks_lib.check_density(self.mst_final_density, "mst_final_density")
        if not 0.0 <= self.mst_random_grow_fraction <= 1.0:
            raise ValueError(f"mst_random_grow_fraction={self.mst_random_grow_fraction} must "
                             "be in [0, 1] (0.25: a quarter of the grown weights at random).")
        if self.mst_restore_power <= 0:
            raise ValueError(f"mst_restore_power={self.mst_restore_power} must be > 0 "
                             "(1: linear).")

    # ------------------------------------------------------------------ schedules
    def init_masks(self, params, masks, rng):
        """MST starts dense: warm-up prunes from the full topology."""
        del params, rng
        return masks

    def density_schedule(self, ultra: float, final: float):
        """``fn(step) -> density`` of one matrix: dense, warm-up, ultra, restoration, final."""
        s = self.settings
        warmup = schedules.gmp_density(ultra, s.update_start, self.mst_warmup_end,
                                       power=self.gmp_power)
        restore = schedules.gmp_density(final, self.mst_ultra_end, s.update_end,
                                        init_density=ultra, power=self.mst_restore_power)
        return schedules.piecewise([self.mst_warmup_end, self.mst_ultra_end],
                                   [warmup, schedules.constant(ultra), restore])

    def phase_densities(self, masks) -> dict[str, tuple[float, float]]:
        """path -> (ultra-sparse density, final density) of each sparse leaf."""
        s = self.settings
        ultra = self.target_densities(masks)
        flat = masks_lib.flatten(masks)
        shapes = {p: tuple(flat[p].shape) for p in ultra}
        final = masks_lib.layer_densities(shapes, self.mst_final_density, s.distribution,
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
        return periodic(step) | (step == self.mst_warmup_end) | (step == s.update_end)

    def grows_by_gradient(self, step):
        """Warm-up updates only prune, so they need no dense gradient."""
        return self.is_update_step(step) & (
            jnp.asarray(step, jnp.int32) >= self.mst_warmup_end)

    def drop_fraction(self, step):
        """Prune fraction of the evolving phases: 0 in warm-up, then cosine from 0.3."""
        s = self.settings
        if s.drop_fraction_schedule == "constant":
            frac = schedules.constant(s.drop_fraction)(step)
        else:
            frac = schedules.cosine_decay(s.drop_fraction, s.update_end,
                                          self.mst_warmup_end)(step)
        return jnp.where(jnp.asarray(step, jnp.int32) >= self.mst_warmup_end, frac, 0.0)

    # ------------------------------------------------------------------ growth
    def grow_scores(self, params, grads, sub, rng):
        """Both scores of mixed growing: ``|dL/dw|`` (dense gradient) and uniform random."""
        del params
        return {"grad": prune_lib.gradient_magnitude(grads, sub),
                "random": prune_lib.random_scores(rng, sub)}

    def grow(self, masks, scores, n, structure):
        """Mixed growing (``regrow.mixed_regrow``): ``1 - r`` of ``n`` by gradient, ``r`` at
        random among the units still dead (``r = mst_random_grow_fraction``)."""
        return regrow_lib.mixed_regrow(masks, scores["grad"], scores["random"], n,
                                       self.mst_random_grow_fraction, structure)
