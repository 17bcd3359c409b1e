"""SET (Mocanu et al. 2018): drop the smallest weights, regrow as many at random.

The dynamic-sparse-training template: every update drops a (cosine-decayed) fraction of each
matrix's live weights by a drop score and regrows the same number by a grow score. RigL
(rigl.py) changes only :meth:`SET.grow_scores`; MST (mst.py) overrides the schedule hooks
(:meth:`SET.scheduled_densities`, :meth:`SET.drop_fraction`) and :meth:`SET.grow`.

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

    grow_balance: str
    evolves = True

    def validate(self, shapes, num_steps):
        super().validate(shapes, num_steps)
        if self.grow_balance not in ("matrix", "neuron"):
            raise ValueError(f"Unknown sparsity.grow_balance {self.grow_balance!r}; choose one "
                             "of matrix, neuron (--config.sparsity.grow_balance=...).")
        if self.grow_balance == "neuron" and self.settings.structure.kind != "unstructured":
            raise ValueError(
                f"grow_balance=neuron keeps each hidden unit's live weights through updates of "
                f"unstructured masks; got structure={self.settings.structure.kind!r}. Set "
                "--config.sparsity.grow_balance=matrix, or structure=unstructured.")

    def init_masks(self, params, masks, rng):
        return self.initial_topology(params, masks, rng)

    def is_update_step(self, step):
        s = self.settings
        return schedules.periodic(s.update_every, s.update_start, s.update_end)(step)

    # ------------------------------------------------------------------ the hooks
    def drop_fraction(self, step):
        """Fraction of each matrix's live units dropped (and regrown) at ``step``."""
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

    def scheduled_densities(self, step, masks) -> dict | None:
        """path -> (traced) density of each sparse leaf the schedule asks for at ``step``.

        SET keeps every selection row's count: None. A method whose density moves (MST)
        returns its schedule; rows above the scheduled count are pruned down first, rows
        below grow up to it.
        """
        del step, masks
        return None

    def grow(self, masks, scores, n, structure):
        """Grows ``n`` dead units per selection row by ``scores`` (from :meth:`grow_scores`)."""
        return regrow_lib.regrow(masks, scores, n, structure)

    # ------------------------------------------------------------------ the update
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
        # Fused kernels are evolved as their separate matrices (see split_fused); the
        # schedule's densities are those of the configured (fused) leaves.
        parts = self.fused_parts(masks)
        split = [prune_lib.split_fused(t, parts) for t in (params, masks, grads)]
        dens = self.scheduled_densities(step, masks)
        counts = None if dens is None else prune_lib.keep_counts(
            self.sparse_masks(split[1]), dens, self.settings.structure)
        new = self.evolve(step, *split, rng, counts)
        return self.commit(params, masks, prune_lib.join_fused(new, parts), opt_state)

    def evolve(self, step, params, masks, grads, rng, counts=None):
        """The new mask tree of an update; commit happens in the caller.

        1. ``counts`` (the schedule's, or None): rows holding more are pruned down to them.
        2. Drop ``round(f * live)`` more per matrix under the relaxed structure.
        3. Grow per selection row back to ``counts`` (None: the row's count before the update).
        """
        structure = self.settings.structure
        sub = self.sparse_masks(masks)
        drop_scores = self.drop_scores(params, grads, sub, rng)
        if counts is not None:
            masks = prune_lib.prune_to_count(masks, drop_scores, counts, structure)
        # Drop per matrix under the relaxed structure (N:M -> weights, column-balanced ->
        # per-matrix blocks), then grow per selection row back to the target, so the
        # structure and the counts both hold after the update.
        relaxed = structure.relaxed()
        frac = self.drop_fraction(step)
        live = prune_lib.live_counts(masks_lib.subtree(masks, sub), relaxed)
        keep = {p: n - jnp.round(frac * n).astype(jnp.int32) for p, n in live.items()}
        dropped = prune_lib.prune_to_count(masks, drop_scores, keep, relaxed)
        scores = self.grow_scores(params, grads, sub, rng)
        flip = []
        if self.grow_balance == "neuron":
            # Hidden units as selection rows: the output kernels are viewed transposed, so
            # every hidden unit is a column, and growth counts per column.
            structure = PER_COLUMN
            flip = [p for p in masks_lib.flatten(sub)
                    if any(masks_lib.path_matches(p, pat) for pat in OUTPUT_KERNELS)]
        view = functools.partial(prune_lib.swap_last_axes, paths=flip)
        after = prune_lib.live_counts(view(masks_lib.subtree(dropped, sub)), structure)
        if counts is None:
            counts = prune_lib.live_counts(view(sub), structure)
        grow = {p: jnp.maximum(jnp.asarray(counts[p], jnp.int32) - after[p], 0) for p in after}
        return view(self.grow(view(dropped), view(scores) if flip else scores, grow,
                              structure))
