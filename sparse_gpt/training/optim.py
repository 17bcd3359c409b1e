"""The optimizer: global-norm clipping, then AdamW or SGD on a warm-up + cosine schedule."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

PyTree = Any
OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The ``config.train`` keys the optimizer reads (built by ``sparse_gpt.plan``)."""

    optimizer: str
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    num_steps: int
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float


def lr_schedule(train: OptimizerConfig) -> optax.Schedule:
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


def make_optimizer(train: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping, then the warm-up + cosine ``lr_schedule`` optimizer.

    ``train.optimizer``: ``adamw`` (decoupled weight decay, betas ``b1``/``b2``) or ``sgd``
    (Nesterov momentum ``b1`` with L2 weight decay added to the gradient, the RigL paper's
    optimizer; set ``weight_decay`` to an SGD value such as 1e-4). Decay applies to kernels
    and embeddings only.
    """
    name = train.optimizer
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
