"""Public block-sparse attention: ``softmax(q k^T, pattern) v`` on the pattern's blocks only.

Dimension letters: the public op takes the model's layout ``[batch, L, heads, D]``
(``jax.nn.dot_product_attention``'s); backends work on ``[G, L, D]``, one attention problem
per group G = batch x heads. L is the sequence length, D the head dimension, B the (square)
block size and Lb = L // B; T and S are the row and column budgets (kernels/attention/meta.py).

A backend is an ``AttentionBackend`` of two functions on ``[G, L, D]``:

    forward(q, k, v, meta, mask_fn, scale)                      -> (o, lse)
    backward(q, k, v, lse, dO, delta, meta, mask_fn, scale)     -> (dq, dk, dv)

(plus ``interpret=`` when ``takes_interpret``), and ``block_sparse_attention`` wires them into
one ``jax.custom_vjp`` (the backward recomputes the probabilities from the saved
log-sum-exp), so ``jax.grad`` works for all of them, including the Pallas kernels
(``pallas_call`` has no JVP rule).

Built-in backends: ``"pallas_gpu"`` (Triton), ``"xla"`` (per-row gathers of the pattern's
key/value blocks; the CPU default) and ``"reference"`` (dense masked oracle). ``"auto"``
picks pallas_gpu on GPU, else xla; the environment variable ``SPARSE_GPT_ATTN_BACKEND``
overrides ``"auto"``. There is no TPU kernel yet: on TPU ``"auto"`` gives xla.
``register_attention_backend`` adds one from outside the package.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kernels.attention import pallas_gpu, reference, xla
from kernels.attention.meta import attention_meta
from kernels.common import Registry, bind_interpret


class AttentionBackend(NamedTuple):
    """The functions of one block-sparse attention backend (see the module docstring).

    Attributes:
      forward: ``(q, k, v, meta, mask_fn, scale) -> (o, lse)``.
      backward: ``(q, k, v, lse, dO, delta, meta, mask_fn, scale) -> (dq, dk, dv)``.
      takes_interpret: both take an ``interpret=`` keyword (Pallas backends).
    """

    forward: Callable
    backward: Callable
    takes_interpret: bool = False


_REGISTRY = Registry(
    "attention backend",
    AttentionBackend,
    env_var="SPARSE_GPT_ATTN_BACKEND",
    native={"gpu": "pallas_gpu", "cuda": "pallas_gpu"},
    register_fn="register_attention_backend",
)
_REGISTRY.register("pallas_gpu", AttentionBackend(pallas_gpu.forward, pallas_gpu.backward, True),
                   builtin=True)
_REGISTRY.register("xla", AttentionBackend(xla.forward, xla.backward), builtin=True)
_REGISTRY.register("reference", AttentionBackend(reference.forward, reference.backward),
                   builtin=True)
ATTENTION_BACKENDS = _REGISTRY.names()  # the built-in names


def register_attention_backend(name: str, impl: AttentionBackend) -> None:
    """Makes ``impl`` selectable as ``block_sparse_attention(..., backend=name)``.

    As ``kernels.register_backend`` for the matmul: register before the first trace that
    uses it; a name registered again is replaced; built-in names cannot be.

    Args:
      name: any string but ``"auto"`` and the built-in names.
      impl: an ``AttentionBackend`` of the forward and backward functions.

    Raises:
      ValueError: a built-in, empty or ``"auto"`` name.
      TypeError: ``impl`` is not an ``AttentionBackend``.
    """
    _REGISTRY.register(name, impl)


def unregister_attention_backend(name: str) -> None:
    """Removes a backend added with ``register_attention_backend``."""
    _REGISTRY.unregister(name)


def resolve_attention_backend(backend: str = "auto", platform: str | None = None) -> str:
    """Maps ``"auto"`` (or ``$SPARSE_GPT_ATTN_BACKEND``) to a registered name and checks it.

    Raises:
      ValueError: an unknown name; the message lists the registered ones.
    """
    return _REGISTRY.resolve(backend, platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attention(q, k, v, mask_fn, block_size, scale, impl, interpret):
    return _attention_fwd(q, k, v, mask_fn, block_size, scale, impl, interpret)[0]


def _attention_fwd(q, k, v, mask_fn, block_size, scale, impl, interpret):
    meta = attention_meta(mask_fn, q.shape[1], block_size)
    (forward,) = bind_interpret((impl.forward,), impl.takes_interpret, interpret)
    o, lse = forward(q, k, v, meta, mask_fn, scale)
    return o, (q, k, v, o, lse)


def _attention_bwd(mask_fn, block_size, scale, impl, interpret, res, do):
    q, k, v, o, lse = res
    meta = attention_meta(mask_fn, q.shape[1], block_size)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)   # [G, L]
    (backward,) = bind_interpret((impl.backward,), impl.takes_interpret, interpret)
    dq, dk, dv = backward(q, k, v, lse, do, delta, meta, mask_fn, scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _to_groups(x_BxLxHxD: jax.Array) -> jax.Array:
    """``[batch, L, heads, D]`` -> ``[G, L, D]``."""
    batch, seq_len, h, d = x_BxLxHxD.shape
    return x_BxLxHxD.transpose(0, 2, 1, 3).reshape(batch * h, seq_len, d)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_fn, *,
                           block_size: int = 64, scale: float | None = None,
                           backend: str = "auto", interpret=False) -> jax.Array:
    """Attention restricted to a static pattern, computing only its non-empty blocks.

    Equal to ``reference_attention(q, k, v, element_mask(mask_fn, L))`` (values and
    gradients, within dtype tolerance); blocks with no allowed entry are never computed.
    Differentiable in ``q``, ``k`` and ``v`` (custom VJP). Softmax and accumulation in fp32;
    the output has the dtype of ``q``.

    Args:
      q: queries ``[batch, L, heads, D]`` (``jax.nn.dot_product_attention``'s layout);
        ``k`` and ``v`` the same shape (dtypes are promoted to a common one).
      k: keys.
      v: values.
      mask_fn: hashable pattern ``(q_pos, k_pos) -> bool`` (kernels/attention/meta.py); it
        must include causality if wanted.
      block_size: square block edge B, a power of two in [16, 256] dividing L.
      scale: score scale, default ``D ** -0.5``.
      backend: ``"auto"``, a built-in name (``"pallas_gpu"``, ``"xla"``, ``"reference"``) or
        one given to ``register_attention_backend``.
      interpret: run Pallas kernels in interpret mode (required on CPU).

    Returns:
      ``[batch, L, heads, D]``.

    Raises:
      ValueError: mismatched shapes, L not a multiple of B, unsupported B, unknown backend.
    """
    if not q.shape == k.shape == v.shape or q.ndim != 4:
        raise ValueError(f"q, k, v must share one [batch, L, heads, head_dim] shape; got "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    batch, seq_len, h, d = q.shape
    attention_meta(mask_fn, seq_len, block_size)   # validates L and B, warms the cache
    dtype = jnp.result_type(q, k, v)
    impl = _REGISTRY.get(backend)
    scale = float(d ** -0.5 if scale is None else scale)
    q_GxLxD, k_GxLxD, v_GxLxD = (_to_groups(x.astype(dtype)) for x in (q, k, v))
    out_GxLxD = _attention(q_GxLxD, k_GxLxD, v_GxLxD, mask_fn, int(block_size), scale, impl,
                           interpret)
    return out_GxLxD.reshape(batch, h, seq_len, d).transpose(0, 2, 1, 3)
