"""Static sparse training: a fixed topology chosen at init (random or ERK), never changed."""

from __future__ import annotations

import dataclasses

from sparse_gpt.methods.base import SparsityMethod


@dataclasses.dataclass(frozen=True)
class Static(SparsityMethod):
    """Prunes once at init to the configured per-layer densities, then trains that topology.

    ``distribution=uniform`` gives every sparse matrix the same density, ``erk`` the
    Erdos-Renyi-Kernel allocation; ``init=random`` picks live weights uniformly at random
    (with ``structure=block``, whole blocks; with ``nm``, n of every m). The train step must
    apply the returned masks to the freshly initialised params (``masks.apply_masks``).
    """

    def init_masks(self, params, masks, rng):
        return self.initial_topology(params, masks, rng)
