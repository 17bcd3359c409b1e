"""SET (Mocanu et al. 2018): drop the smallest weights, regrow as many at random.

The dynamic-sparse-training template: every update drops a (cosine-decayed) fraction of each
matrix's live weights by a drop score and regrows the same number by a grow score. RigL
(rigl.py) changes only :meth:`SET.grow_scores`; later methods (MST's mixed growing, a
shrinking or growing density) override :meth:`grow_scores` or :meth:`target_counts`.

Counts are per matrix, and the attention's fused ``qkv`` kernel is three matrices: its q, k
and v column thirds are updated as separate layers (``FUSED_KERNELS``). Pooled, they would
compete for one count, and RigL's gradient growth would move weights from q and k to v
(at init attention is uniform, and on the tiny preset ``|dL/dW_q|``, ``|dL/dW_k|`` are
~300x smaller than ``|dL/dW_v|``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity import regrow as regrow_lib
from sparse_gpt.sparsity import schedules
from sparse_gpt.sparsity.methods.base import SparsityMethod

# Kernels holding several matrices side by side in their output columns, as (sparse_layers
# pattern, parts): model.py splits qkv's [D, 3D] columns as [3, heads, head_dim].
FUSED_KERNELS = (("attn/qkv", 3),)

# Kernels whose input rows are a block's hidden units (attention head dims, MLP channels);
# the other sparse kernels (qkv, fc) hold them as output columns. ``grow_balance=neuron``
# regrows per hidden unit: per column of qkv and fc, per row of these.
OUTPUT_KERNELS = ("attn/out", "mlp/proj")
# One selection row per output column of a (transposed) kernel: a hidden unit's weights.
PER_COLUMN = masks_lib.Structure("block", (1, 1), balance="column")


@dataclasses.dataclass(frozen=True)
class SET(SparsityMethod):
    """Random-init sparse topology, evolved by magnitude drop and random growth.

    Per update and per matrix: ``live`` units, ``n_drop = round(f(step) * live)`` with
    ``f`` the drop fraction (cosine-decayed from ``drop_fraction`` to 0 at ``update_end``,
    or constant), keep the ``live - n_drop`` best by :meth:`drop_scores`, then grow
    dead units by :meth:`grow_scores` until every selection row is back at its target.
    Units just dropped may come back; they are then unchanged (value and optimizer moments
    kept), as in RigL's reference code and jaxpruner: only units dead before the update
    start at zero. For unstructured and per-matrix blocks the row is the matrix (q, k and v
    each for the fused qkv kernel), so ``n_drop`` units are regrown. With ``structure=nm`` (or
    column-balanced blocks) the drop is per matrix over weights (blocks) and growth refills
    each group (output block column), so the pattern and the count are both kept. With
    ``grow_balance=neuron`` (unstructured) growth refills each hidden unit instead: an MLP
    channel or attention head dim gets back as many inputs (its fc / qkv column) and outputs
    (its proj / out row) as the drop took, so no unit's degree changes. Growth per matrix
    lets RigL's gradient growth pile connections onto a few well-connected units and cut
    others off (benchmarks/results/sparsity_methods_tiny_1200steps_*.md).
    """

    def init_masks(self, params, masks, rng):
        return self.initial_topology(params, masks, rng)

    def is_update_step(self, step):
        s = self.settings
        return schedules.periodic(s.update_every, s.update_start, s.update_end)(step)

    def drop_fraction(self, step):
        s = self.settings
        if s.drop_fraction_schedule == "constant":
            return schedules.constant(s.drop_fraction)(step)
        return schedules.cosine_decay(s.drop_fraction, s.update_end, s.update_start)(step)

    def drop_scores(self, params, grads, sub, rng):
        """``|w|``: the weakest live weights (blocks: by mean ``|w|``) are dropped."""
        del grads, rng
        return prune_lib.magnitude(params, sub)

    def grow_scores(self, params, grads, sub, rng):
        """Uniform random: SET grows anywhere among the dead units."""
        del params, grads
        return prune_lib.random_scores(rng, sub)

    def target_counts(self, step, live):
        """Live units per selection row after the update, from ``live`` (``[R]``) before it.

        SET keeps the count. MST-style restoration returns more (growth exceeds the drop).
        """
        del step
        return live

    def fused_parts(self, masks) -> dict[str, int]:
        """path -> parts of the sparse leaves that are fused kernels (``FUSED_KERNELS``).

        A leaf is split only where every part can carry the structure (a block never
        straddles two parts); otherwise it stays one matrix.
        """
        flat = masks_lib.flatten(masks)
        out = {}
        for path in self.sparse_paths(masks):
            for pattern, parts in FUSED_KERNELS:
                n = flat[path].shape[-1]
                bn = self.settings.structure.block[1] if (
                    self.settings.structure.kind == "block") else 1
                if masks_lib.path_matches(path, pattern) and n % (parts * bn) == 0:
                    out[path] = parts
        return out

    def update_topology(self, step, params, masks, grads, opt_state, rng):
        # Fused kernels are evolved as their separate matrices (see split_fused).
        parts = self.fused_parts(masks)
        new = self.evolve(step, *(prune_lib.split_fused(t, parts)
                                  for t in (params, masks, grads)), rng)
        return self.commit(params, masks, prune_lib.join_fused(new, parts), opt_state)

    def evolve(self, step, params, masks, grads, rng):
        """The new mask tree of an update (drop, then grow); commit happens in the caller."""
        structure = self.settings.structure
        sub = self.sparse_masks(masks)
        # Drop per matrix under the relaxed structure (N:M -> weights, column-balanced ->
        # per-matrix blocks), then grow per selection row back to the target, so the
        # structure and the counts both hold after the update.
        relaxed = structure.relaxed()
        frac = self.drop_fraction(step)
        keep = {p: n - jnp.round(frac * n).astype(jnp.int32)
                for p, n in prune_lib.live_counts(sub, relaxed).items()}
        dropped = prune_lib.prune_to_count(masks, self.drop_scores(params, grads, sub, rng),
                                           keep, relaxed)
        scores = self.grow_scores(params, grads, sub, rng)
        flip = []
        if self.settings.grow_balance == "neuron":
            # Hidden units as selection rows: the output kernels are viewed transposed, so
            # every hidden unit is a column, and growth counts per column.
            structure = PER_COLUMN
            flip = [p for p in masks_lib.flatten(sub)
                    if any(masks_lib.path_matches(p, pat) for pat in OUTPUT_KERNELS)]
        view = functools.partial(prune_lib.swap_last_axes, paths=flip)
        before = prune_lib.live_counts(view(sub), structure)
        after = prune_lib.live_counts(view(masks_lib.subtree(dropped, sub)), structure)
        grow = {p: jnp.maximum(self.target_counts(step, before[p]) - after[p], 0)
                for p in before}
        return view(regrow_lib.regrow(view(dropped), view(scores), grow, structure))
