"""The step context: the per-step modifiers of one forward pass, as one pytree.

The train step builds a :class:`StepContext` for each step and passes it through
``forward -> GPT -> Block -> Attention / MLP``; the model reads only the fields it knows:

* ``attention``: an ``attention.Switch`` (hybrid sparse attention: the pattern while its
  traced flag is on) or None for dense causal attention;
* ``omission``: an ``omission.Omission`` (SAT: heads and MLP channels each layer computes,
  static per compiled branch) or None for all of them;
* ``rng``: the step's key for the modifiers that draw (SAT's selection), or None.

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
