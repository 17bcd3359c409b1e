"""Training FLOPs per step, dense and as the masks make them, and density summaries.

Counting rules (multiply-add = 2 FLOPs; T = batch_size * seq_len tokens):

* Each projection kernel ``[K, N]`` (attention QKV and output, MLP fc and proj, every layer):
  forward ``2 T K N``, backward ``dX`` ``2 T K N`` and ``dW`` ``2 T K N``, so ``6 T K N``
  dense. Sparse counts replace ``K N`` by the matrix's live weights ``nnz``: ``6 T nnz``.
  With a dense weight gradient (RigL's update steps, or the whole ``grow_grad_steps``
  window before each) ``dW`` stays ``2 T K N``.
* Attention scores ``Q K^T`` and the value product ``P V``: ``2 L^2 D`` each per sequence
  and layer forward, times 3 for training; counted dense and over the full ``L x L`` square
  (the causal half is not subtracted, as in most published counts). While a sparse
  attention pattern is on (MST's hybrid attention), the sparse count replaces ``L^2`` by the
  (query, key) pairs the pattern computes (``attention.HybridAttention.pairs``).
* SAT's neuron omission (``kept_heads``, ``kept_channels``: the fractions computed this
  step) scales the attention kernels and the attention products by the kept heads and the
  MLP kernels by the kept channels, in the sparse count.
* The LM head ``[D, V]``: ``6 T D V``, dense. Embedding lookups, LayerNorm, softmax,
  biases and the optimizer are not counted (they are O(T D), not O(T D^2)).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sparse_gpt.model import compact
from sparse_gpt.model.context import StepContext
from sparse_gpt.sparsity import masks as masks_lib

Tree = Any

def step_flops(model_cfg, masks: Tree, batch_size: int, seq_len: int,
               ctx: StepContext = StepContext(), dense_weight_grad=False
               ) -> dict[str, jnp.ndarray]:
    """Training FLOPs of one step (forward + backward), dense and with ``masks``.

    Usable inside and outside ``jit`` (counts are float32 jnp scalars). Host (numpy) masks
    are counted on the host, so a fixed topology's count is a constant of the program.

    Args:
      model_cfg: the ``ModelConfig`` (its ``kernel_shapes``, ``d_model``, ``vocab_size``).
      masks: the mask tree; kernels without a mask leaf count dense.
      batch_size: sequences per step.
      seq_len: tokens per sequence.
      ctx: the step's context, as the model sees it: ``ctx.attention`` (hybrid attention's
        switch: the pattern's (query, key) pairs while on, else ``L^2``) and
        ``ctx.omission`` (SAT: the kept fractions of heads and MLP channels).
      dense_weight_grad: bool or traced bool; True when this step computes the dense weight
        gradient (the method's ``dense_grad_step``).

    Returns:
      ``{"dense": ..., "sparse": ...}`` FLOPs of the step.
    """
    tokens = float(batch_size) * float(seq_len)
    n_layers, d = int(model_cfg.n_layers), int(model_cfg.d_model)
    kept_heads, kept_channels = 1.0, 1.0
    if ctx.omission is not None:
        if ctx.omission.keep_heads is not None:
            kept_heads = ctx.omission.keep_heads / model_cfg.n_heads
        if ctx.omission.keep_channels is not None:
            kept_channels = ctx.omission.keep_channels / model_cfg.ff
    flat = masks_lib.flatten(masks)
    dense = jnp.zeros((), jnp.float32)
    sparse = jnp.zeros((), jnp.float32)
    for path, shape in model_cfg.kernel_shapes().items():
        size = float(shape[0] * shape[1] * shape[2])
        live = _live(flat[path], model_cfg) if path in flat else jnp.asarray(size,
                                                                           jnp.float32)
        kept = kept_channels if path.startswith("blocks/mlp/") else kept_heads
        live = live * kept
        dense += 6.0 * tokens * size
        dw = jnp.where(dense_weight_grad, size * kept, live)
        sparse += 2.0 * tokens * (2.0 * live + dw)
    head = 6.0 * tokens * d * int(model_cfg.vocab_size)                    # LM head
    attn = 3.0 * 4.0 * batch_size * d * n_layers                              # QK^T, PV
    pairs = (float(seq_len) ** 2 if ctx.attention is None
             else ctx.attention.pairs(seq_len))
    return dict(dense=dense + attn * float(seq_len) ** 2 + head,
                sparse=sparse + attn * jnp.asarray(pairs, jnp.float32) * kept_heads + head)


def _live(mask, model_cfg=None) -> jnp.ndarray:
    """Live entries of one mask leaf: counted on the host for a numpy mask; a compact index
    leaf (``model/compact.py``) holds ``B * B`` live weights per entry."""
    if compact.is_compact(mask):
        if model_cfg is None:
            raise ValueError("counting a compact index mask needs the model config (its "
                             "block size): pass model_cfg.")
        return jnp.asarray(compact.live_weights(model_cfg, mask), jnp.float32)
    if isinstance(mask, np.ndarray):
        return jnp.asarray(np.count_nonzero(mask), jnp.float32)
    return jnp.sum(mask, dtype=jnp.float32)


def density(masks: Tree, model_cfg=None) -> jnp.ndarray:
    """Overall density: live weights / size over all mask leaves (float32 scalar); 1 for a
    tree without masks (everything dense). Compact index leaves need ``model_cfg`` (the
    block size and the kernels' dense shapes)."""
    flat = masks_lib.flatten(masks)
    if not flat:
        return jnp.ones((), jnp.float32)
    live = sum((_live(m, model_cfg) for m in flat.values()), jnp.zeros((), jnp.float32))
    shapes = {} if model_cfg is None else model_cfg.kernel_shapes()
    size = sum(int(np.prod(shapes[p])) if compact.is_compact(m) else m.size
               for p, m in flat.items())
    return live / max(size, 1)


def density_report(masks: Tree, per_matrix: bool = True, model_cfg=None
                   ) -> dict[str, jnp.ndarray]:
    """Densities of the mask tree, as a flat dict of float32 scalars for logging.

    Keys: ``total`` (live / size over all mask leaves), each leaf's path (over its stacked
    layers) and, when ``per_matrix``, ``path[i]`` for the i-th matrix of the leaf (flat index
    over the leading axes). Compact index leaves need ``model_cfg``, as for :func:`density`.
    """
    out = {}
    live_total, size_total = jnp.zeros((), jnp.float32), 0
    shapes = {} if model_cfg is None else model_cfg.kernel_shapes()
    for path, m in sorted(masks_lib.flatten(masks).items()):
        if compact.is_compact(m):
            if model_cfg is None:
                raise ValueError(f"{path} is a compact index mask: pass model_cfg.")
            _, k, n = shapes[path]
            per = k * n
            live = jnp.full((m.shape[0],), m[0].size * model_cfg.block_size ** 2, jnp.float32)
        else:
            live = masks_lib.nnz(m).reshape(-1).astype(jnp.float32)
            per = m.shape[-2] * m.shape[-1]
        out[path] = jnp.sum(live) / (per * live.shape[0])
        if per_matrix:
            for i in range(live.shape[0]):
                out[f"{path}[{i}]"] = live[i] / per
        live_total += jnp.sum(live)
        size_total += per * live.shape[0]
    out["total"] = live_total / max(size_total, 1)
    return out
