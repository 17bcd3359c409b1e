"""SAT's neuron omission inside the model: which heads and MLP channels a layer computes.

One layer's spec for one step is an :class:`Omission` (static: one compiled branch each);
the layer scores its units by an importance metric of the current weights and batch
(:func:`unit_scores`), picks the kept ones (:func:`select`) and gathers their kernel columns
and rows (:func:`head_columns`, :func:`head_rows`), so omitted units cost nothing and get
exactly zero gradient. The schedule of omission rates over training is
``sparse_gpt.sparsity.sat``.

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
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax import lax

METRICS = ("uniform", "magnitude", "wanda", "max_inner_product")
SELECTIONS = ("topk", "sample")


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


def head_columns(n_heads: int, head_dim: int, heads_h: jax.Array) -> jax.Array:
    """QKV kernel columns of ``heads_h`` (q, k, v order, as the model splits them):
    ``[3 * h * head_dim]`` int32."""
    d = n_heads * head_dim
    cols_hxK = heads_h[:, None] * head_dim + jnp.arange(head_dim)[None, :]
    return jnp.concatenate([cols_hxK.reshape(-1) + s * d for s in range(3)])


def head_rows(head_dim: int, heads_h: jax.Array) -> jax.Array:
    """Output-projection rows of ``heads_h``: ``[h * head_dim]`` int32."""
    return (heads_h[:, None] * head_dim + jnp.arange(head_dim)[None, :]).reshape(-1)
