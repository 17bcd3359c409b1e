"""Sparsity schedules: jittable functions of a traced step.

Each factory returns ``fn(step) -> jnp scalar`` (float32, or bool for the update-step
predicates), the way optax schedules do, so a schedule is chosen in Python and evaluated in
the train step without recompiling as the step changes.

Step convention: ``step`` is the 0-based index of the optimizer step being taken (the number
of updates already applied before it).

* :func:`constant` - a fixed value.
* :func:`gmp_density` - Zhu & Gupta (2017) gradual magnitude pruning: sparsity rises from
  ``s_i`` to ``s_f`` as ``s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``.
* :func:`cosine_decay` - RigL's drop fraction ``a/2 (1 + cos(pi t / T))``, zero after ``T``.
* :func:`periodic` - whether ``step`` is a topology-update step (every ``every`` steps
  inside ``[start, end]``).
* :func:`piecewise` and :func:`staircase` - phases glued together; MST's warm-up /
  ultra-sparse / restoration phases and SAT's ladder omission rate are built from these.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
from jax import lax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _f(step) -> jnp.ndarray:
    return jnp.asarray(step, jnp.float32)


def constant(value: float) -> Schedule:
    """``fn(step) = value``."""
    return lambda step: jnp.full((), value, jnp.float32)


def gmp_density(final_density: float, start: int, end: int, init_density: float = 1.0,
                power: float = 3.0) -> Schedule:
    """Density of gradual magnitude pruning (Zhu & Gupta 2017), cubic by default.

    Sparsity ``s(t) = s_f + (s_i - s_f) * (1 - clip((t - start) / (end - start), 0, 1))^power``
    with ``s = 1 - density``: ``init_density`` up to ``start``, ``final_density`` from ``end``.

    Args:
      final_density: density reached at ``end``.
      start: first step of pruning.
      end: step at which the final density is reached (``end > start``).
      init_density: density before ``start``.
      power: exponent of the decay (3 is the paper's cubic).

    Returns:
      ``fn(step) -> density``.
    """
    if end <= start:
        raise ValueError(f"GMP needs update_end > update_start, got {start}..{end}; set "
                         "--config.sparsity.update_end after update_start.")
    s_i, s_f = 1.0 - init_density, 1.0 - final_density

    def fn(step):
        frac = jnp.clip((_f(step) - start) / (end - start), 0.0, 1.0)
        return 1.0 - (s_f + (s_i - s_f) * (1.0 - frac) ** power)

    return fn


def cosine_decay(init_value: float, end: int, start: int = 0) -> Schedule:
    """RigL's drop fraction: ``init/2 * (1 + cos(pi * (t - start) / (end - start)))``, 0 after."""
    span = max(end - start, 1)

    def fn(step):
        t = jnp.clip((_f(step) - start) / span, 0.0, 1.0)
        return 0.5 * init_value * (1.0 + jnp.cos(jnp.pi * t))

    return fn


def periodic(every: int, start: int = 0, end: int | None = None) -> Schedule:
    """``fn(step) -> bool``: ``start <= step <= end`` and ``(step - start) % every == 0``."""
    if every < 1:
        raise ValueError(f"update_every={every} must be >= 1 (--config.sparsity.update_every).")

    def fn(step):
        step = jnp.asarray(step, jnp.int32)
        ok = (step >= start) & ((step - start) % every == 0)
        return ok if end is None else ok & (step <= end)

    return fn


def piecewise(boundaries: Sequence[int], schedules: Sequence[Schedule],
              relative: bool = False) -> Schedule:
    """Phase ``i`` (steps ``[b_{i-1}, b_i)``) follows ``schedules[i]``.

    Args:
      boundaries: increasing step boundaries, one fewer than ``schedules``.
      schedules: one schedule per phase, called with the global step, or with the step
        since the phase began when ``relative``.
      relative: pass ``step - phase_start`` instead of ``step``.

    Returns:
      ``fn(step)``, jittable (one ``lax.switch`` on the phase index).
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(f"piecewise needs len(schedules) == len(boundaries) + 1, got "
                         f"{len(schedules)} schedules and {len(boundaries)} boundaries.")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"piecewise boundaries must increase, got {list(boundaries)}.")
    starts = jnp.asarray([0, *boundaries], jnp.int32)
    bounds = jnp.asarray(list(boundaries), jnp.int32)

    def fn(step):
        step = jnp.asarray(step, jnp.int32)
        phase = jnp.sum(step >= bounds) if len(boundaries) else jnp.int32(0)
        local = step - starts[phase] if relative else step
        branches = [lambda s, f=f: jnp.asarray(f(s), jnp.float32) for f in schedules]
        return lax.switch(phase, branches, local)

    return fn


def staircase(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """Piecewise-constant: ``values[i]`` on ``[b_{i-1}, b_i)`` (SAT's ladder omission rate)."""
    return piecewise(boundaries, [constant(v) for v in values])
