"""SAT, Sparsity-Accelerated Training (Ma et al. 2024): structured neuron omission per step.

For additional training of a trained model (continual pretraining, fine-tuning), each step
and each layer *omits* whole attention heads and MLP intermediate channels: they are not
computed and get exactly zero gradient that step; their weights stay in (dense) storage and
come back on later steps. The kept units are chosen per step and per layer by an importance
score of the current weights and batch:

=================  =========================================================================
uniform            random: every unit equally likely (``selection`` is then irrelevant)
magnitude          ``sum |W|`` of the unit's weights (head: its q, k, v columns and out rows;
                   channel: its fc column and proj row)
wanda              Wanda's ``|W| x ||X||`` on the unit's input projection: ``sum_i |W_ij|
                   ||X_i||_2`` with ``||X_i||`` over this batch's tokens (cheap: no matmul)
max_inner_product  ``max_t |x_t . w_j|`` over a probe of ``probe_tokens`` tokens of the batch
                   (head: max over its q, k, v columns); costs probe/tokens of the projection
=================  =========================================================================

Selection is ``topk`` (the most important units) or ``sample`` (units drawn without
replacement in proportion to importance, by Gumbel-top-k on ``log score``).

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

import flax
import jax
import jax.numpy as jnp
from jax import lax

from sparse_gpt.sparsity import schedules

METRICS = ("uniform", "magnitude", "wanda", "max_inner_product")
SELECTIONS = ("topk", "sample")
SCHEDULES = ("ladder", "constant")
TARGETS = ("heads", "mlp")


@flax.struct.dataclass
class Omission:
    """What one layer keeps this step (static: one compiled branch per instance).

    A pytree without leaves (every field static), so it passes through ``nn.scan`` and
    ``nn.remat`` like the hybrid-attention switch.

    Attributes:
      keep_heads: attention heads computed (of ``n_heads``); ``None``: all.
      keep_channels: MLP intermediate channels computed (of ``d_ff``); ``None``: all.
      metric: importance metric (see the module table).
      selection: ``topk`` | ``sample``.
      probe_tokens: tokens ``max_inner_product`` scores on.
    """

    keep_heads: int | None = flax.struct.field(pytree_node=False, default=None)
    keep_channels: int | None = flax.struct.field(pytree_node=False, default=None)
    metric: str = flax.struct.field(pytree_node=False, default="magnitude")
    selection: str = flax.struct.field(pytree_node=False, default="topk")
    probe_tokens: int = flax.struct.field(pytree_node=False, default=256)


def keep_count(n: int, rate: float) -> int:
    """Units kept of ``n`` at omission ``rate`` (at least one)."""
    return max(1, n - int(round(rate * n)))


def select(scores_U: jax.Array, keep: int, selection: str, rng: jax.Array) -> jax.Array:
    """Sorted int32 indices of the ``keep`` units chosen from ``scores_U`` (>= 0).

    ``topk`` takes the highest scores (ties to the lower index); ``sample`` draws ``keep``
    units without replacement with probability proportional to the score (Gumbel-top-k;
    all-zero scores sample uniformly).
    """
    scores_U = lax.stop_gradient(scores_U.astype(jnp.float32))
    if selection == "sample":
        total = jnp.sum(scores_U)
        p_U = jnp.where(total > 0, scores_U / jnp.maximum(total, 1e-30), 1.0 / scores_U.size)
        scores_U = jnp.log(jnp.maximum(p_U, 1e-30)) + jax.random.gumbel(rng, scores_U.shape)
    elif selection != "topk":
        raise ValueError(f"Unknown SAT selection {selection!r}; choose one of "
                         f"{', '.join(SELECTIONS)} (--config.sat.selection).")
    _, idx = lax.top_k(scores_U, keep)
    return jnp.sort(idx).astype(jnp.int32)


def unit_scores(metric: str, x_xD: jax.Array, w_in_DxUxS: jax.Array,
                w_out_UxSxD: jax.Array | None, rng: jax.Array, probe_tokens: int) -> jax.Array:
    """Importance of each of ``U`` units that own ``S`` columns of an input projection.

    Args:
      metric: one of ``METRICS``.
      x_xD: the projection's input (any leading dims), e.g. the LayerNorm output.
      w_in_DxUxS: input-projection columns grouped by unit (a head's q, k, v columns: S =
        3 * head_dim; an MLP channel: S = 1).
      w_out_UxSxD: the unit's rows of the output projection (magnitude only), or None.
      rng: for ``uniform``.
      probe_tokens: tokens ``max_inner_product`` uses (the first ones of the flat batch).

    Returns:
      ``[U]`` non-negative float32 scores (no gradient flows through them).
    """
    x_xD, w_in_DxUxS = lax.stop_gradient(x_xD), lax.stop_gradient(w_in_DxUxS)
    n_units = w_in_DxUxS.shape[1]
    w = jnp.abs(w_in_DxUxS.astype(jnp.float32))
    if metric == "uniform":
        return jax.random.uniform(rng, (n_units,))
    if metric == "magnitude":
        s = jnp.sum(w, axis=(0, 2))
        if w_out_UxSxD is not None:
            s += jnp.sum(jnp.abs(lax.stop_gradient(w_out_UxSxD).astype(jnp.float32)), axis=(1, 2))
        return s
    x_TxD = x_xD.reshape(-1, x_xD.shape[-1]).astype(jnp.float32)
    if metric == "wanda":
        norm_D = jnp.sqrt(jnp.sum(jnp.square(x_TxD), axis=0))
        return jnp.einsum("dus,d->u", w, norm_D)
    if metric == "max_inner_product":
        probe_PxD = x_TxD[:min(probe_tokens, x_TxD.shape[0])]
        dots_PxUxS = jnp.einsum("pd,dus->pus", probe_PxD,
                                w_in_DxUxS.astype(jnp.float32))
        return jnp.max(jnp.abs(dots_PxUxS), axis=(0, 2))
    raise ValueError(f"Unknown SAT metric {metric!r}; choose one of {', '.join(METRICS)} "
                     "(--config.sat.metric).")


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


def from_config(config) -> SAT | None:
    """The run's :class:`SAT` plan from ``config.sat``, or None (``omission_rate=0``).

    Raises:
      ValueError: a rate outside [0, 1), an unknown metric / selection / schedule / target,
        a ladder start outside [0, 1] or fewer than one stair; the message names the key.
    """
    s = config.get("sat")
    if s is None or float(s.omission_rate) == 0:
        return None
    rate = float(s.omission_rate)
    if not 0 < rate < 1:
        raise ValueError(f"sat.omission_rate={rate} must be in [0, 1) (0 turns SAT off); "
                         "e.g. --config.sat.omission_rate=0.5.")
    for key, options in (("metric", METRICS), ("selection", SELECTIONS),
                         ("schedule", SCHEDULES)):
        if s[key] not in options:
            raise ValueError(f"Unknown sat.{key} {s[key]!r}; choose one of "
                             f"{', '.join(options)} (--config.sat.{key}=...).")
    targets = tuple(t.strip() for t in str(s.targets).split(",") if t.strip())
    if not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"sat.targets={s.targets!r}: give a comma list of "
                         f"{', '.join(TARGETS)} (--config.sat.targets=heads,mlp).")
    num_steps = int(config.train.num_steps)
    if s.schedule == "constant":
        rates, boundaries = (rate,), ()
    else:
        start, stairs = float(s.ladder_start), int(s.ladder_stairs)
        if not 0 <= start <= 1 or stairs < 1:
            raise ValueError(f"sat.ladder_start={start} must be in [0, 1] and "
                             f"sat.ladder_stairs={stairs} at least 1.")
        rates, boundaries = ladder(rate, num_steps, start, stairs)
    if int(s.probe_tokens) < 1:
        raise ValueError(f"sat.probe_tokens={s.probe_tokens} must be >= 1.")
    d_ff = int(config.model.d_ff) or 4 * int(config.model.d_model)
    return SAT(rates=rates, boundaries=boundaries, n_heads=int(config.model.n_heads),
               d_ff=d_ff, heads="heads" in targets, mlp="mlp" in targets,
               metric=s.metric, selection=s.selection, probe_tokens=int(s.probe_tokens))


def head_columns(n_heads: int, head_dim: int, heads_h: jax.Array) -> jax.Array:
    """QKV kernel columns of ``heads_h`` (q, k, v order, as the model splits them):
    ``[3 * h * head_dim]`` int32."""
    d = n_heads * head_dim
    cols_hxK = heads_h[:, None] * head_dim + jnp.arange(head_dim)[None, :]
    return jnp.concatenate([cols_hxK.reshape(-1) + s * d for s in range(3)])


def head_rows(head_dim: int, heads_h: jax.Array) -> jax.Array:
    """Output-projection rows of ``heads_h``: ``[h * head_dim]`` int32."""
    return (heads_h[:, None] * head_dim + jnp.arange(head_dim)[None, :]).reshape(-1)

