"""Pure, jittable training pieces: state, optimizer, loss, train and eval steps.

Everything here is a function of explicit pytrees so a notebook can do what ``train.py``
does in a few calls::

    model, tx, method = build(config)
    state = init_state(config, model, tx, method, jax.random.key(0))
    train_step = jax.jit(make_train_step(model, tx, method), donate_argnums=0)
    state, metrics = train_step(state, batch)

The model runs through a ``forward(params, masks, tokens, model) -> logits`` function:
:func:`forward` here, or ``pipeline.make_forward(mesh, ...)`` for a pipelined model; both
take the same trees, so nothing else changes with the parallelism.

Masked weights stay exactly zero: gradients of masked entries are zero by construction and
the step re-applies the mask after the optimizer update (AdamW's decoupled weight decay and
stale moments could otherwise move them).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sparse_gpt import flops as flops_lib
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.model import gpt as model_lib

PyTree = Any
Batch = dict[str, jax.Array]
Forward = Callable[[PyTree, PyTree, jax.Array, nn.Module], jax.Array]


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
    # float32 leaves on the sparse kernels' paths: the dense gradients summed so far in the
    # window before a RigL/MST update (sparsity.grow_grad_steps > 1); None otherwise.
    grow_grads: PyTree = None


def lr_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``num_steps``."""
    warmup = max(1, min(train.warmup_steps, train.num_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
        decay_steps=max(train.num_steps, warmup + 1), end_value=train.lr * train.min_lr_ratio)


def _decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices (kernels, embeddings), not on biases or LayerNorm."""
    def leaf(path, _):
        return path[-1].key in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(leaf, params)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then the warm-up + cosine ``lr_schedule`` optimizer.

    ``train.optimizer``: ``adamw`` (decoupled weight decay, betas ``b1``/``b2``) or ``sgd``
    (Nesterov momentum ``b1`` with L2 weight decay added to the gradient, the RigL paper's
    optimizer; set ``weight_decay`` to an SGD value such as 1e-4). Decay applies to kernels
    and embeddings only.
    """
    name = train.get("optimizer", "adamw")
    if name == "adamw":
        opt = optax.adamw(lr_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                          weight_decay=train.weight_decay, mask=_decay_mask)
    elif name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(train.weight_decay, mask=_decay_mask),
                          optax.sgd(lr_schedule(train), momentum=train.b1, nesterov=True))
    else:
        raise ValueError(f"Unknown train.optimizer {name!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)} (--config.train.optimizer=...).")
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), opt)


def build(config: ml_collections.ConfigDict):
    """Builds (model, optimizer, sparsity method) from a run config."""
    from sparse_gpt.sparsity import methods# the methods import train-time helpers lazily
    model = model_lib.GPT(model_lib.ModelConfig.from_config(config))
    return model, make_optimizer(config.train), methods.build(config)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeroes every masked-out entry of params (leaves without a mask are unchanged)."""
    def walk(p, m):
        if isinstance(p, dict):
            return {k: walk(v, m.get(k)) if m is not None else v for k, v in p.items()}
        return p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype))
    return walk(params, masks)


def init_state(config: ml_collections.ConfigDict, model: nn.Module,
               tx: optax.GradientTransformation, method: Any, rng: jax.Array) -> TrainState:
    """Initialises params, the method's first masks and the optimizer state."""
    init_rng, mask_rng, step_rng = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    variables = model.init(init_rng, tokens)
    masks = method.init_masks(variables["params"], variables["masks"], mask_rng)
    params = apply_masks(variables["params"], masks)
    grow_grads = None
    if method.needs_dense_grads and method.settings.grow_grad_steps > 1:
        grow_grads = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32),
                                  method.sparse_masks(masks))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, masks=masks,
                      opt_state=tx.init(params), rng=jax.random.key_data(step_rng),
                      bad_step=jnp.full((), -1, jnp.int32), flops=jnp.zeros((), jnp.float32),
                      grow_grads=grow_grads)


def cross_entropy(logits_BxLxV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Weighted mean next-token cross-entropy (nats) and the total weight."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights_BxL = batch["weights"].astype(jnp.float32)
    total = jnp.sum(weights_BxL)
    return jnp.sum(nll_BxL * weights_BxL) / jnp.maximum(total, 1.0), total


def forward(params: PyTree, masks: PyTree | None, tokens_BxL: jax.Array,
            model: nn.Module, sparse_attention: Any = None, omission: Any = None,
            rng: jax.Array | None = None) -> jax.Array:
    """Logits of the plain (unpipelined) model; ``masks=None`` applies it dense.

    Args:
      sparse_attention: an ``attention.Switch`` (MST's hybrid attention) or None (dense).
      omission: a ``sat.Omission`` (SAT's per-step neuron omission) or None (all units).
      rng: the key SAT's selection draws from (required with ``omission``).
    """
    variables = {"params": params} if masks is None else {"params": params, "masks": masks}
    return model.apply(variables, tokens_BxL, sparse_attention=sparse_attention,
                       omission=omission, rngs=None if omission is None else {"sat": rng})


_PLAIN_FORWARD = forward


def dense_when_all_live(forward: Forward) -> Forward:
    """``forward`` that applies the model without masks (dense) when every mask is all live.

    A block-sparse model's kernel budget holds only its sparse density, so once the masks are
    lifted to all ones (static's dense phase, ``sparsity.dense_finetune_start``) the product
    must leave the kernel. One ``lax.cond`` on the traced masks picks the path per call: the
    phase change never recompiles, and train and eval steps (which see only the masks) agree.
    """
    def phased(params, masks, tokens_BxL, model, **kwargs):
        if masks is None:
            return forward(params, None, tokens_BxL, model, **kwargs)
        return jax.lax.cond(masks_lib.all_live(masks),
                            lambda: forward(params, None, tokens_BxL, model, **kwargs),
                            lambda: forward(params, masks, tokens_BxL, model, **kwargs))
    return phased


def loss_fn(params: PyTree, masks: PyTree | None, batch: Batch, model: nn.Module,
            forward: Forward = forward) -> jax.Array:
    """Mean next-token loss; ``masks=None`` applies the model dense."""
    return cross_entropy(forward(params, masks, batch["inputs"], model), batch)[0]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, method: Any,
                    forward: Forward = forward, attention: Any = None, sat: Any = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, pure and jittable.

    Methods that grow by dense gradient (``method.needs_dense_grads``) get the gradient with
    respect to the effective (masked) weights on their update steps only (with
    ``grow_grad_steps > 1``, on the steps of the window ending at each update, summed in
    ``state.grow_grads``); every other step computes the ordinary masked gradient, so the
    dense backward is paid only when used.

    ``attention``: an ``attention.HybridAttention`` (``attention.from_config``) or None. With
    it, the model runs the sparse pattern on the steps of its window (a traced flag, so one
    compiled step serves both) and the metrics gain ``sparse_attention`` (1.0 when on).

    ``sat``: a ``sat.SAT`` plan (``sat.from_config``) or None. With it, every layer omits
    heads and MLP channels at the rate of the step's stair: one ``lax.switch`` branch per
    distinct rate (static shapes each), so the ladder never recompiles; the metrics gain
    ``omission_rate``.
    """
    if (attention is not None or sat is not None) and forward is not _PLAIN_FORWARD:
        raise ValueError("Hybrid sparse attention (attention.sparse_start/sparse_end) and SAT "
                         "(sat.omission_rate) run on the unpipelined model only; set "
                         "--config.mesh.stage=1, or turn them off.")
    if sat is not None and method.needs_dense_grads:
        raise ValueError("SAT (sat.omission_rate > 0) omits neurons from the gradient, which "
                         "dense-gradient growth (RigL, MST) needs whole; use "
                         "sparsity.method=dense/static/gmp/set with SAT.")
    grad_fn = jax.value_and_grad(loss_fn)

    def bound(switch, omission=None, rng=None):
        kwargs = {} if switch is None else {"sparse_attention": switch}
        if omission is not None:
            kwargs.update(omission=omission, rng=rng)
        return functools.partial(forward, **kwargs) if kwargs else forward

    def masked_grads(params, masks, batch, switch=None, omission=None, rng=None):
        loss, grads = grad_fn(params, masks, batch, model, bound(switch, omission, rng))
        return loss, grads, grads

    def dense_grads(params, masks, batch, switch=None):
        # Differentiate the dense product of the already-masked weights (no masks collection,
        # so no block-sparse path): the gradient of every entry, active or not, is what
        # RigL-style growth scores by.
        loss, dense = grad_fn(apply_masks(params, masks), None, batch, model, bound(switch))
        return loss, apply_masks(dense, masks), dense

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.wrap_key_data(state.rng)
        rng, update_rng = jax.random.split(rng)
        dense_step = method.dense_grad_step(state.step)
        switch = None if attention is None else attention.switch(state.step)
        kept = {}
        if sat is not None:
            branch = sat.branch(state.step)
            heads, channels = zip(*(sat.kept_fractions(i) for i in range(len(sat.rates))))
            kept = {"kept_heads": jnp.asarray(heads, jnp.float32)[branch],
                    "kept_channels": jnp.asarray(channels, jnp.float32)[branch]}
            # One branch per distinct omission rate, each with its own static shapes.
            sat_rng = jax.random.fold_in(update_rng, 1)
            branches = [functools.partial(masked_grads, omission=sat.omission(i), rng=sat_rng)
                        for i in range(len(sat.rates))]
            loss, grads, score_grads = jax.lax.switch(branch, branches, state.params,
                                                      state.masks, batch, switch)
        elif method.needs_dense_grads:
            loss, grads, score_grads = jax.lax.cond(
                dense_step, dense_grads, masked_grads, state.params, state.masks, batch, switch)
        else:
            loss, grads, score_grads = masked_grads(state.params, state.masks, batch, switch)
        grow_grads = state.grow_grads
        if grow_grads is not None:
            # Sum the window's dense gradients; the update scores growth by the sum.
            grow_grads = jax.tree.map(lambda a, g: jnp.where(dense_step, a + g, 0.0),
                                      grow_grads, masks_lib.subtree(score_grads, grow_grads))
            score_grads = masks_lib.replace(score_grads, masks_lib.flatten(grow_grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = apply_masks(optax.apply_updates(state.params, updates), state.masks)
        params, masks, opt_state = method.update(state.step, params, state.masks, score_grads,
                                                 opt_state, update_rng)
        if grow_grads is not None:   # a new window starts after each update
            grow_grads = jax.tree.map(
                lambda a: jnp.where(method.is_update_step(state.step), 0.0, a), grow_grads)
        batch_size, seq_len = batch["inputs"].shape
        step_flops = flops_lib.step_flops(
            model.cfg, state.masks, batch_size, seq_len, dense_weight_grad=dense_step,
            attention_pairs=None if attention is None else attention.pairs_at(state.step,
                                                                              seq_len),
            **kept)
        new = state.replace(step=state.step + 1, params=params, masks=masks,
                            opt_state=opt_state, rng=jax.random.key_data(rng),
                            flops=state.flops + step_flops["sparse"], grow_grads=grow_grads)
        # A non-finite step is not applied; the host loop sees bad_step and stops the run.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        new = new.replace(step=state.step + 1, bad_step=jnp.where(
            finite | (state.bad_step >= 0), state.bad_step, state.step))
        metrics = {"loss": loss, "grad_norm": grad_norm, "dense_flops": step_flops["dense"],
                   "density": flops_lib.density(state.masks)}
        if switch is not None:
            metrics["sparse_attention"] = switch.on.astype(jnp.float32)
        if sat is not None:
            metrics["omission_rate"] = sat.rate(state.step)
        return new, metrics

    return train_step


def make_eval_step(model: nn.Module,
                   forward: Forward = forward) -> Callable[[TrainState, Batch], dict]:
    """Returns ``eval_step(state, batch) -> {"loss_sum", "weight"}`` for exact averaging."""
    def eval_step(state: TrainState, batch: Batch):
        logits = forward(state.params, state.masks, batch["inputs"], model)
        loss, weight = cross_entropy(logits, batch)
        return {"loss_sum": loss * weight, "weight": weight}
    return eval_step
