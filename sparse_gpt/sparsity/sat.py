"""SAT, Sparsity-Accelerated Training (Ma et al. 2024): structured neuron omission per step.

For additional training of a trained model (continual pretraining, fine-tuning), each step
and each layer *omits* whole attention heads and MLP intermediate channels: they are not
computed and get exactly zero gradient that step; their weights stay in (dense) storage and
come back on later steps. The kept units are chosen per step and per layer by an importance
score of the current weights and batch (``uniform``, ``magnitude``, ``wanda``,
``max_inner_product``; ``topk`` or ``sample`` selection): the model side is
``sparse_gpt/model/omission.py``.

Omitted units cost nothing: the layer gathers the kept columns/rows of its kernels
(``SparseDense(in_index=, out_index=)``) and runs smaller matmuls and attention over the kept
heads only. Shapes are static *per omission rate*: the number kept is a Python int, so each
distinct rate of the schedule is one branch of a ``lax.switch`` inside the one compiled
train step (the ladder has a handful of rates; the step picks its branch from the traced step).

The **ladder** omission-rate schedule (SAT's scheduler): ``omission_rate`` for the first
``ladder_start`` fraction of training, then ``ladder_stairs`` equal stairs down to 0, so
training ends dense; e.g. rate 0.5, start 0.5, 2 stairs over 1000 steps: 0.5 on [0, 500),
0.25 on [500, 750), 0 on [750, 1000). ``schedule=constant`` keeps the rate throughout.

Evaluation and sampling are always dense (all units).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_gpt.model.omission import Omission
from sparse_gpt.sparsity import schedules

SCHEDULES = ("ladder", "constant")
TARGETS = ("heads", "mlp")


def keep_count(n: int, rate: float) -> int:
    """Units kept of ``n`` at omission ``rate`` (at least one)."""
    return max(1, n - int(round(rate * n)))


@dataclasses.dataclass(frozen=True)
class SAT:
    """A run's omission plan: the distinct rates, the schedule over steps, the layer specs.

    Attributes:
      rates: distinct omission rates, in schedule order (the ladder's stairs).
      boundaries: step boundaries between consecutive ``rates`` (one fewer).
      n_heads, d_ff: model sizes the keep counts are taken of.
      heads, mlp: which unit kinds are omitted.
      metric, selection, probe_tokens: see :class:`Omission`.
    """

    rates: tuple[float, ...]
    boundaries: tuple[int, ...]
    n_heads: int
    d_ff: int
    heads: bool = True
    mlp: bool = True
    metric: str = "magnitude"
    selection: str = "topk"
    probe_tokens: int = 256

    def branch(self, step) -> jax.Array:
        """Index into ``rates`` at (traced) ``step``."""
        return schedules.staircase(self.boundaries, list(range(len(self.rates))))(
            step).astype(jnp.int32)

    def rate(self, step) -> jax.Array:
        """The omission rate at (traced) ``step``."""
        return schedules.staircase(self.boundaries, self.rates)(step)

    def metrics(self, step) -> dict[str, jax.Array]:
        """What the step reports: its omission rate."""
        return {"omission_rate": self.rate(step)}

    def omission(self, i: int) -> Omission | None:
        """The layer spec of branch ``i``; None for rate 0 (the plain dense model)."""
        rate = self.rates[i]
        if rate == 0:
            return None
        return Omission(keep_heads=keep_count(self.n_heads, rate) if self.heads else None,
                        keep_channels=keep_count(self.d_ff, rate) if self.mlp else None,
                        metric=self.metric, selection=self.selection,
                        probe_tokens=self.probe_tokens)

    def kept_fractions(self, i: int) -> tuple[float, float]:
        """(heads, MLP channels) fractions computed in branch ``i`` (FLOP accounting)."""
        om = self.omission(i)
        if om is None:
            return 1.0, 1.0
        heads = 1.0 if om.keep_heads is None else om.keep_heads / self.n_heads
        mlp = 1.0 if om.keep_channels is None else om.keep_channels / self.d_ff
        return heads, mlp


def ladder(rate: float, num_steps: int, start: float, stairs: int
           ) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """SAT's ladder: ``rate`` until ``start * num_steps``, then ``stairs`` equal stairs to 0.

    Returns:
      ``(rates, boundaries)``, e.g. ``ladder(0.5, 1000, 0.5, 2) == ((0.5, 0.25, 0.0),
      (500, 750))``.
    """
    first = int(round(start * num_steps))
    span = (num_steps - first) / stairs
    rates = tuple(rate * (stairs - i) / stairs for i in range(stairs + 1))
    boundaries = tuple(first + int(round(i * span)) for i in range(stairs))
    return rates, boundaries
