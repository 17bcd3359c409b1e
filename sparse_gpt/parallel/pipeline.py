"""Pipeline parallelism over the ``stage`` mesh axis: GPipe and circular schedules.

The decoder blocks are already stacked on a leading layer axis N (``nn.scan``). With S
stages and R circular repeats, layer ``l = (r * S + s) * J + j`` (J = N / (S R) layers per
stage and repeat) runs on stage ``s`` in repeat ``r``; :func:`to_stages` reshapes every block
param and mask ``[N, ...] -> [S, R, J, ...]``, and that leading S axis is split over ``stage``.
For GPipe (R = 1) this is a free reshape of params whose ``layers`` axis is already split
over ``stage``; for R > 1 XLA moves the interleaved layers once per step.

The batch is cut into M microbatches. Inside ``jax.shard_map`` (manual over ``stage``,
the other axes stay automatic) every stage runs the same loop of ``R M + S - 1`` ticks: at
tick t stage s works on microbatch ``(t - s) mod M`` of repeat ``(t - s) // M``, then passes
its activation to stage s + 1 with ``ppermute`` (the last stage's output goes round to stage
0 for the next repeat, where it waits in the microbatch buffer). Each stage is busy for
``R M`` of the ticks, so the idle ("bubble") fraction is ``(S - 1) / (R M + S - 1)``.
``jax.grad`` of the loop is the backward pipeline: ppermute transposes to the reverse shift,
and the scan sums each stage's weight gradient over its microbatches. Memory: GPipe keeps
every tick's block activations for the backward pass (``model.remat`` shrinks that to block
inputs); the circular schedule recomputes each stage-tick from its input (one activation per
tick, about a third more FLOPs), because its per-tick weight choice would otherwise be saved
once per tick.

:func:`make_forward` returns a drop-in for ``train_lib.forward``: the same params and masks
trees go in, so checkpoints, sparsity methods and FLOP counts do not know about stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sparse_gpt.model import gpt as model_lib
from sparse_gpt.model.context import StepContext

PyTree = Any
SCHEDULES = ("gpipe", "circular")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A pipeline schedule: S stages, M microbatches, R layer repeats per stage."""
    num_stages: int
    num_microbatches: int
    schedule: str = "gpipe"
    circular_repeats: int = 1

    @property
    def repeats(self) -> int:
        return self.circular_repeats if self.schedule == "circular" else 1

    @property
    def num_ticks(self) -> int:
        return self.repeats * self.num_microbatches + self.num_stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Idle share of each stage: (S - 1) / (R M + S - 1)."""
        return (self.num_stages - 1) / self.num_ticks

    def validate(self, n_layers: int, batch_size: int | None = None) -> None:
        """Raises ValueError, naming the fix, for a schedule this model or batch cannot use."""
        s, m, r = self.num_stages, self.num_microbatches, self.circular_repeats
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown pipeline schedule {self.schedule!r}; set "
                             f"--config.mesh.schedule to one of {SCHEDULES}.")
        if s < 1 or m < 1 or r < 1:
            raise ValueError(f"stage={s}, num_microbatches={m} and circular_repeats={r} must "
                             "all be >= 1 (--config.mesh.*).")
        if self.schedule == "gpipe" and r != 1:
            raise ValueError(f"circular_repeats={r} needs --config.mesh.schedule=circular "
                             "(GPipe runs each stage's layers once).")
        if n_layers % (s * self.repeats):
            raise ValueError(
                f"model.n_layers={n_layers} is not divisible by mesh.stage={s} x "
                f"circular_repeats={self.repeats}; choose a stage count (and repeats) whose "
                f"product divides n_layers, or change --config.model.n_layers.")
        if self.schedule == "circular" and m < s:
            raise ValueError(
                f"The circular schedule needs num_microbatches >= stage ({m} < {s}): a "
                "microbatch must leave the last stage before the first one needs it again; "
                f"set --config.mesh.num_microbatches to at least {s}.")
        if batch_size is not None and batch_size % m:
            raise ValueError(
                f"train.batch_size={batch_size} is not divisible by mesh.num_microbatches={m};"
                " set --config.mesh.num_microbatches to a divisor of the batch size.")


def to_stages(tree: PyTree, num_stages: int, repeats: int) -> PyTree:
    """``[N, ...] -> [S, R, N / (S R), ...]`` on every leaf: layer (r S + s) J + j."""
    def split(a):
        n = a.shape[0]
        a = a.reshape(repeats, num_stages, n // (num_stages * repeats), *a.shape[1:])
        return jnp.swapaxes(a, 0, 1)
    return None if tree is None else jax.tree.map(split, tree)


def _take(tree: PyTree, i: jax.Array) -> PyTree:
    return None if tree is None else jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _stage_loop(params_RxJ, masks_RxJ, x_MxBxLxD, *, blocks: nn.Module,
                pcfg: PipelineConfig, axis: str):
    """One stage's ticks (inside shard_map); returns its output buffer ``[1, M, b, L, D]``."""
    s_count, m_count, repeats = pcfg.num_stages, pcfg.num_microbatches, pcfg.repeats
    params_RxJ, masks_RxJ = _take(params_RxJ, 0), _take(masks_RxJ, 0)  # drop the stage dim
    stage = jax.lax.axis_index(axis)
    # A GPipe microbatch never returns to stage 0, so the ring is open there.
    ring = [(i, (i + 1) % s_count) for i in range(s_count - (repeats == 1))]

    def run_stage(r, x_BxLxD):
        p, m = _take(params_RxJ, r), _take(masks_RxJ, r)
        variables = {"params": p} if m is None else {"params": p, "masks": m}
        layers = jnp.arange(jax.tree.leaves(p)[0].shape[0])  # the stage's stacked blocks
        return blocks.apply(variables, x_BxLxD, StepContext(), layers)[0]

    if repeats > 1:
        # The repeat's weights are picked per tick; saved for the backward pass they would be
        # stacked T times. Recomputing the stage from (r, x) keeps one activation per tick.
        run_stage = jax.checkpoint(run_stage, prevent_cse=False)

    def tick(carry, t):
        recv_BxLxD, src_MxBxLxD, out_MxBxLxD = carry
        if repeats > 1:  # park the last stage's output until its next repeat starts
            back = (t - s_count) % m_count
            old = jax.lax.dynamic_index_in_dim(src_MxBxLxD, back, 0, keepdims=False)
            src_MxBxLxD = jax.lax.dynamic_update_index_in_dim(
                src_MxBxLxD, jnp.where(t >= s_count, recv_BxLxD, old), back, 0)
        fresh = jax.lax.dynamic_index_in_dim(src_MxBxLxD, t % m_count, 0, keepdims=False)
        x_BxLxD = jnp.where(stage == 0, fresh, recv_BxLxD)
        # GPipe: a static index, so weights stay loop-invariant (not saved per tick).
        r = jnp.clip((t - stage) // m_count, 0, repeats - 1) if repeats > 1 else 0
        y_BxLxD = run_stage(r, x_BxLxD)  # idle ticks compute on garbage
        done = (t - (s_count - 1)) % m_count
        old = jax.lax.dynamic_index_in_dim(out_MxBxLxD, done, 0, keepdims=False)
        last = (stage == s_count - 1) & (t >= (repeats - 1) * m_count + s_count - 1)
        out_MxBxLxD = jax.lax.dynamic_update_index_in_dim(
            out_MxBxLxD, jnp.where(last, y_BxLxD, old), done, 0)
        recv_BxLxD = jax.lax.ppermute(y_BxLxD, axis, ring)
        return (recv_BxLxD, src_MxBxLxD, out_MxBxLxD), None

    init = (jnp.zeros_like(x_MxBxLxD[0]), x_MxBxLxD, jnp.zeros_like(x_MxBxLxD))
    (_, _, out_MxBxLxD), _ = jax.lax.scan(tick, init, jnp.arange(pcfg.num_ticks))
    return out_MxBxLxD[None]


def pipelined_logits(params: PyTree, masks: PyTree | None, tokens_BxL: jax.Array,
                     model: nn.Module, mesh: Mesh, pcfg: PipelineConfig,
                     axis: str = "stage") -> jax.Array:
    """Logits of ``model`` with the blocks run as a pipeline over mesh axis ``axis``.

    Equal to ``model.apply({"params": params, "masks": masks}, tokens_BxL)`` up to float
    rounding; embedding and head run outside the pipeline, under the mesh's other axes.

    Raises:
      ValueError: the schedule does not fit the model, batch or mesh.
    """
    cfg = model.cfg
    if mesh.shape[axis] != pcfg.num_stages:
        raise ValueError(f"The pipeline has {pcfg.num_stages} stages but mesh axis {axis!r} "
                         f"has {mesh.shape[axis]} devices; set --config.mesh.stage to match.")
    batch, seq_len = tokens_BxL.shape
    pcfg.validate(cfg.n_layers, batch)
    m_count, per_stage = pcfg.num_microbatches, cfg.n_layers // (pcfg.num_stages * pcfg.repeats)
    x_BxLxD = model.apply({"params": params}, tokens_BxL, method=model_lib.GPT.embed)
    # Microbatch m holds rows m, m + M, ...: a batch split over data/fsdp stays split.
    x_MxbxLxD = jnp.swapaxes(x_BxLxD.reshape(batch // m_count, m_count, seq_len, -1), 0, 1)
    staged_params = to_stages(params["blocks"], pcfg.num_stages, pcfg.repeats)
    staged_masks = None if masks is None else to_stages(masks.get("blocks"), pcfg.num_stages,
                                                         pcfg.repeats)
    # check_vma=False: the block-sparse kernels run in their own shard_map over the batch axes
    # inside each stage, and their custom VJPs carry no stage-varying types.
    loop = jax.shard_map(
        lambda p, m, x: _stage_loop(p, m, x, blocks=model_lib.stacked_blocks(cfg, per_stage),
                                    pcfg=pcfg, axis=axis),
        mesh=mesh, in_specs=(P(axis), P(axis), P()), out_specs=P(axis), axis_names={axis},
        check_vma=False)
    out_MxbxLxD = loop(staged_params, staged_masks, x_MxbxLxD)[-1]
    h_BxLxD = jnp.swapaxes(out_MxbxLxD, 0, 1).reshape(batch, seq_len, -1)
    return model.apply({"params": params}, h_BxLxD, method=model_lib.GPT.head)


def make_forward(mesh: Mesh, pcfg: PipelineConfig, axis: str = "stage") -> Callable:
    """``forward(params, masks, tokens, model, ctx) -> logits`` running the blocks pipelined.

    The step context must be the plain one: hybrid attention and SAT run unpipelined only
    (``plan.from_config`` refuses the combination).
    """
    def forward(params, masks, tokens_BxL, model, ctx=StepContext()):
        if ctx.attention is not None or ctx.omission is not None:
            raise ValueError("The pipelined model runs without per-step modifiers (hybrid "
                             "attention, SAT); set --config.mesh.stage=1 to use them.")
        return pipelined_logits(params, masks, tokens_BxL, model, mesh, pcfg, axis)
    return forward


def pipelined_loss_fn(params: PyTree, masks: PyTree | None, batch: dict, model: nn.Module,
                      mesh: Mesh, pcfg: PipelineConfig) -> jax.Array:
    """``train_lib.loss_fn`` with the blocks pipelined (same trees, same value)."""
    from sparse_gpt.training import step as train_lib
    return train_lib.loss_fn(params, masks, batch, model, forward=make_forward(mesh, pcfg))
