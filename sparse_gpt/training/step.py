"""Pure, jittable training pieces: state, loss, train and eval steps.

Everything here is a function of explicit pytrees so a notebook can do what ``train.py``
does in a few calls::

    p = plan.from_config(config)
    model, tx, method = build(p)
    state = init_state(p, model, tx, method, jax.random.key(0))
    train_step = jax.jit(make_train_step(model, tx, method, attention=p.attention, sat=p.sat),
                         donate_argnums=0)
    state, metrics = train_step(state, batch)

The model runs through a ``forward(params, masks, tokens, model, ctx) -> logits`` function:
:func:`forward` here, or ``pipeline.make_forward(mesh, ...)`` for a pipelined model; both
take the same trees, so nothing else changes with the parallelism. ``ctx`` is the step's
``StepContext``: the per-step modifiers (hybrid attention's switch, SAT's omission, the
step's key), built here from the plan's modifiers and read by the model and by the FLOP
count alike; each modifier reports its own metrics.

Masked weights stay exactly zero: gradients of masked entries are zero by construction and
the step re-applies the mask after the optimizer update (AdamW's decoupled weight decay and
stale moments could otherwise move them).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_gpt import flops as flops_lib
from sparse_gpt.model import compact
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.model.context import StepContext
from sparse_gpt.sparsity import compact_update
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.training import optim

PyTree = Any
Batch = dict[str, jax.Array]
Forward = Callable[..., jax.Array]   # (params, masks, tokens, model, ctx=StepContext())


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed as one pytree."""
    step: jax.Array          # int32 scalar: number of optimizer steps taken
    params: PyTree
    masks: PyTree            # bool leaves mirroring the sparse kernels of params
    opt_state: PyTree
    rng: jax.Array           # uint32[2] raw key data (checkpoint friendly)
    bad_step: jax.Array      # int32: first step whose loss/grad was not finite, -1 if none
    flops: jax.Array         # float32: cumulative training FLOPs counted from the masks
    # The sparsity method's own state (``method.init_state``), e.g. RigL/MST's dense
    # gradients summed over the window before an update; None for most methods.
    sparsity_state: PyTree = None


def build(plan) -> tuple[nn.Module, optax.GradientTransformation, Any]:
    """(model, optimizer, sparsity method) of a ``plan.Plan``."""
    return model_lib.GPT(plan.model), optim.make_optimizer(plan.optimizer), plan.method


def init_state(plan, model: nn.Module, tx: optax.GradientTransformation, method: Any,
               rng: jax.Array) -> TrainState:
    """Initialises params, the method's first masks and state, and the optimizer state."""
    init_rng, mask_rng, step_rng = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, plan.seq_len), jnp.int32)
    # A compact model starts as its dense layout does (same seed, same weights and masks),
    # then keeps only the live blocks.
    variables = model_lib.GPT(model.cfg.dense_layout()).init(init_rng, tokens)
    params, masks = first_topology(model.cfg, method, variables["params"], variables["masks"],
                                   mask_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, masks=masks,
                      opt_state=tx.init(params), rng=jax.random.key_data(step_rng),
                      bad_step=jnp.full((), -1, jnp.int32), flops=jnp.zeros((), jnp.float32),
                      sparsity_state=method.init_state(masks))


def first_topology(model_cfg, method: Any, params: PyTree, masks: PyTree, rng: jax.Array
                   ) -> tuple[PyTree, PyTree]:
    """``(params, masks)`` a run starts from: the method's first masks on dense-layout
    ``params`` (``masks`` all live), masked weights zero; a compact model keeps only the live
    blocks (no dense masked copy is made)."""
    masks = method.init_masks(params, masks, rng)
    if model_cfg.compact_slots:
        params, masks = compact.to_compact(model_cfg, params, masks)
    return masks_lib.apply_masks(params, masks), masks   # compact leaves pass through


def cross_entropy(logits_BxLxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Weighted mean next-token cross-entropy (nats) and the total weight."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights_BxL = batch["weights"].astype(jnp.float32)
    total = jnp.sum(weights_BxL)
    return jnp.sum(nll_BxL * weights_BxL) / jnp.maximum(total, 1.0), total


def forward(params: PyTree, masks: PyTree | None, tokens_BxL: jax.Array,
            model: nn.Module, ctx: StepContext = StepContext()) -> jax.Array:
    """Logits of the plain (unpipelined) model; ``masks=None`` applies it dense.

    Args:
      ctx: the step's modifiers; SAT's selection draws from ``ctx.rng``.
    """
    variables = {"params": params} if masks is None else {"params": params, "masks": masks}
    rngs = None if ctx.omission is None else {"sat": ctx.rng}
    return model.apply(variables, tokens_BxL, ctx, rngs=rngs)


def dense_when_all_live(forward: Forward) -> Forward:
    """``forward`` that applies the model without masks (dense) when every mask is all live.

    A block-sparse model's kernel budget holds only its sparse density, so once the masks are
    lifted to all ones (static's dense phase, ``sparsity.dense_finetune_start``) the product
    must leave the kernel. One ``lax.cond`` on the traced masks picks the path per call: the
    phase change never recompiles, and train and eval steps (which see only the masks) agree.
    """
    def phased(params, masks, tokens_BxL, model, ctx=StepContext()):
        if masks is None:
            return forward(params, None, tokens_BxL, model, ctx)
        return jax.lax.cond(masks_lib.all_live(masks),
                            lambda: forward(params, None, tokens_BxL, model, ctx),
                            lambda: forward(params, masks, tokens_BxL, model, ctx))
    return phased


def loss_fn(params: PyTree, masks: PyTree | None, batch: Batch, model: nn.Module,
            forward: Forward = forward, ctx: StepContext = StepContext()) -> jax.Array:
    """Mean next-token loss; ``masks=None`` applies the model dense."""
    return cross_entropy(forward(params, masks, batch["inputs"], model, ctx), batch)[0]


def step_contexts(step, rng, attention=None, sat=None, topology=None, tier=None
                  ) -> tuple[list[StepContext], Any]:
    """The step's contexts and which one applies: ``([ctx], 0)`` without SAT; with SAT one
    per distinct omission rate (static shapes each) and the traced index of the step's.
    ``topology``: a frozen ``model.topology.Topology`` for the block-sparse layers, or None;
    ``tier``: the block budget tier of the masks (:func:`budget_tier`), or None."""
    switch = None if attention is None else attention.switch(step)
    if sat is None:
        return [StepContext(attention=switch, topology=topology, tier=tier)], 0
    contexts = []
    for i in range(len(sat.rates)):
        omission = sat.omission(i)
        contexts.append(StepContext(attention=switch, omission=omission,
                                    rng=None if omission is None else rng))
    return contexts, sat.branch(step)


def dense_phase_state(model_cfg, state: TrainState) -> TrainState:
    """A compact state (``model.sparse_storage=compact``) as the dense phase starts it: the
    dense layout of the same values, every mask lifted to live (as ``Static``'s lift does
    in the dense layout: the lifted weights and their moments are zero already)."""
    params, masks = compact.densify(model_cfg, state.params, state.masks)
    opt_state = compact.densify_like(model_cfg, state.opt_state, state.masks)
    masks = jax.tree.map(lambda m: jnp.ones(m.shape, jnp.bool_), masks)
    return state.replace(params=params, masks=masks, opt_state=opt_state)


def budget_tier(model: nn.Module, masks: PyTree) -> jax.Array | None:
    """The block budget tier the masks fit (``gpt.kernel_tier``), or None for a model
    without tiers (a method whose density never changes, or no block-sparse kernels)."""
    if model.cfg.matmul != "block_sparse" or not model.cfg.block_tiers:
        return None
    return model_lib.kernel_tier(model.cfg, masks)


def keeps_fixed_masks(model: nn.Module, method: Any, num_stages: int = 1) -> bool:
    """Whether the steps should take ``fixed_masks`` (the masks' frozen topology): a
    block-sparse model whose method never changes its masks (static; a dense phase leaves
    the kernels through :func:`dense_when_all_live`), without pipeline stages."""
    return (model.cfg.matmul == "block_sparse" and not method.evolves
            and not method.always_dense and num_stages == 1)


def host_copy(tree: PyTree) -> PyTree:
    """``tree`` as numpy arrays on every process (gathered across processes if split)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


def frozen_topology(model: nn.Module, fixed_masks: PyTree | None):
    """The ``Topology`` the block-sparse layers multiply with for host masks that never
    change (``fixed_masks``), or None (masked matmul, or no fixed masks)."""
    if fixed_masks is None or model.cfg.matmul != "block_sparse":
        return None
    from sparse_gpt.model.topology import Topology
    return Topology.of(fixed_masks, model.cfg.block_size, model.cfg.kernel_shapes())


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, method: Any,
                    forward: Forward = forward, attention: Any = None, sat: Any = None,
                    fixed_masks: PyTree | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, pure and jittable.

    Methods that grow by dense gradient (``method.needs_dense_grads``) get the gradient with
    respect to the effective (masked) weights on the steps of ``method.dense_grad_step``
    only; every other step computes the ordinary masked gradient, so the dense backward is
    paid only when used.

    ``attention``: the plan's ``HybridAttention`` or None. With it, the model runs the sparse
    pattern on the steps of its window (a traced flag, so one compiled step serves both).
    ``sat``: the plan's ``SAT`` or None. With it, every layer omits heads and MLP channels
    at the rate of the step's stair: one ``lax.switch`` branch per distinct rate (static
    shapes each), so the ladder never recompiles. Each adds its ``metrics(step)``; their
    compatibility with the method and the pipeline is checked by ``plan.from_config``.

    ``fixed_masks``: host (numpy) copies of ``state.masks`` for a method whose masks never
    change (``not method.evolves``; ``trainer.make_steps`` passes the first state's). The
    block-sparse layers then multiply with their frozen ``Topology`` (static slices, no
    metadata built per step) and the FLOP count is a constant; every state given to the step
    must carry these masks. A method that keeps every mask live (``method.always_dense``)
    runs the model without masks, and only a method that changes masks re-applies them after
    the optimizer update (elsewhere a masked weight has zero gradient and zero moments, so
    it stays zero).
    """
    grad_fn = jax.value_and_grad(loss_fn)
    topology = frozen_topology(model, fixed_masks)
    # What the FLOP count sees of the masks: none (dense), the host constants (fixed, and
    # never lifted to dense mid-run), or the state's.
    counted = {} if method.always_dense else (
        fixed_masks if fixed_masks is not None and not method.goes_dense else None)

    def model_masks(state):
        return None if method.always_dense else state.masks

    def flops_of(state, batch, ctx, dense_step):
        batch_size, seq_len = batch["inputs"].shape
        return flops_lib.step_flops(model.cfg, state.masks if counted is None else counted,
                                    batch_size, seq_len, ctx, dense_weight_grad=dense_step)

    compact_cfg = model.cfg if model.cfg.compact_slots else None
    update = method.update
    if compact_cfg is not None and method.evolves:
        update = compact_update.updater(compact_cfg, method)
    elif compact_cfg is not None:   # a fixed compact topology; a dense phase is a change of
        def update(step, params, masks, grads, opt_state, rng, state):  # layout (trainer)
            return params, masks, opt_state, state

    def masked_grads(state, batch, ctx, dense_step):
        loss, grads = grad_fn(state.params, model_masks(state), batch, model, forward, ctx)
        scores = grads
        if compact_cfg is not None and method.needs_dense_grads:  # the dense branch's shapes
            scores = compact_update.no_scores(compact_cfg)
        return loss, grads, scores, flops_of(state, batch, ctx, dense_step)

    def dense_grads(state, batch, ctx, dense_step):
        # Differentiate the dense product of the already-masked weights (no masks collection,
        # so no block-sparse path): the gradient of every entry, active or not, is what
        # RigL-style growth scores by.
        if compact_cfg is not None:   # the dense view; grow scores are its block means
            params, _ = compact.densify(compact_cfg, state.params, state.masks)
            loss, dense = grad_fn(params, None, batch, model_lib.GPT(
                compact_cfg.dense_layout()), forward, ctx)
            return (loss, compact.gather(compact_cfg, dense, state.masks),
                    compact_update.pooled_scores(compact_cfg, dense),
                    flops_of(state, batch, ctx, dense_step))
        loss, dense = grad_fn(masks_lib.apply_masks(state.params, state.masks), None, batch,
                              model, forward, ctx)
        return (loss, masks_lib.apply_masks(dense, state.masks), dense,
                flops_of(state, batch, ctx, dense_step))

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.wrap_key_data(state.rng)
        rng, update_rng = jax.random.split(rng)
        dense_step = method.dense_grad_step(state.step)
        contexts, branch = step_contexts(state.step, jax.random.fold_in(update_rng, 1),
                                         attention, sat, topology,
                                         budget_tier(model, state.masks))
        if len(contexts) > 1:
            branches = [lambda st, b, d, c=c: masked_grads(st, b, c, d) for c in contexts]
            loss, grads, score_grads, step_flops = jax.lax.switch(
                branch, branches, state, batch, dense_step)
        elif method.needs_dense_grads:
            loss, grads, score_grads, step_flops = jax.lax.cond(
                dense_step, dense_grads, masked_grads, state, batch, contexts[0], dense_step)
        else:
            loss, grads, score_grads, step_flops = masked_grads(state, batch, contexts[0],
                                                                dense_step)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if method.evolves:   # stale moments of a just-dropped weight could move it
            params = masks_lib.apply_masks(params, state.masks)
        params, masks, opt_state, sparsity_state = update(
            state.step, params, state.masks, score_grads, opt_state, update_rng,
            state.sparsity_state)
        new = state.replace(step=state.step + 1, params=params, masks=masks,
                            opt_state=opt_state, rng=jax.random.key_data(rng),
                            flops=state.flops + step_flops["sparse"],
                            sparsity_state=sparsity_state)
        # A non-finite step is not applied; the host loop sees bad_step and stops the run.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        new = new.replace(step=state.step + 1, bad_step=jnp.where(
            finite | (state.bad_step >= 0), state.bad_step, state.step))
        metrics = {"loss": loss, "grad_norm": grad_norm, "dense_flops": step_flops["dense"],
                   "density": flops_lib.density(state.masks if counted is None else counted,
                                               model.cfg)}
        for modifier in (attention, sat):
            if modifier is not None:
                metrics.update(modifier.metrics(state.step))
        return new, metrics

    return train_step


def make_eval_step(model: nn.Module, forward: Forward = forward, method: Any = None,
                   fixed_masks: PyTree | None = None) -> Callable[[TrainState, Batch], dict]:
    """Returns ``eval_step(state, batch) -> {"loss_sum", "weight"}`` for exact averaging.

    ``method`` and ``fixed_masks`` as for :func:`make_train_step` (None: the state's masks).
    """
    dense = method is not None and method.always_dense
    topology = frozen_topology(model, fixed_masks)

    def eval_step(state: TrainState, batch: Batch):
        ctx = StepContext(topology=topology, tier=budget_tier(model, state.masks))
        logits = forward(state.params, None if dense else state.masks, batch["inputs"], model,
                         ctx)
        loss, weight = cross_entropy(logits, batch)
        return {"loss_sum": loss * weight, "weight": weight}
    return eval_step
