"""The step context: the per-step modifiers of one forward pass, as one pytree.

The train step builds a :class:`StepContext` for each step and passes it through
``forward -> GPT -> Block -> Attention / MLP``; the model reads only the fields it knows:

* ``attention``: an ``attention.Switch`` (hybrid sparse attention: the pattern while its
  traced flag is on) or None for dense causal attention;
* ``omission``: an ``omission.Omission`` (SAT: heads and MLP channels each layer computes,
  static per compiled branch) or None for all of them;
* ``rng``: the step's key for the modifiers that draw (SAT's selection), or None;
* ``topology``: a ``topology.Topology`` (a fixed block topology as trace-time data: the
  block-sparse layers multiply with static slices) or None for the masks' own traced
  metadata; static, so part of the compiled program;
* ``layer``: the traced index of the scanned decoder layer (set by ``Block``), which picks
  the layer's entry of ``topology``;
* ``tier``: the traced index of the block budget tier the masks fit
  (``gpt.kernel_tier``; a method whose density changes), or None for the top budget.

A field left None changes nothing, so ``StepContext()`` is the plain model.
"""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class StepContext:
    """Per-step modifiers of the forward pass (see the module docstring)."""

    attention: Any = None
    omission: Any = None
    rng: jax.Array | None = None
    topology: Any = flax.struct.field(pytree_node=False, default=None)
    layer: jax.Array | None = None
    tier: jax.Array | None = None

    def frozen(self, key: str):
        """``(per-layer FrozenBlockMeta, layer index)`` of kernel ``key``, or None."""
        metas = None if self.topology is None else self.topology.get(key)
        return None if metas is None or self.layer is None else (metas, self.layer)
