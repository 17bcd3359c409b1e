"""Public block-sparse matmul: ``x @ (w * expand(block_mask))`` with a custom VJP.

Every backend implements the same three products (``matmul``, ``matmul_t``, ``sddmm``):

    forward  y  = x @ W_sparse
    dX          = dY @ W_sparse^T        (row view of the same metadata)
    dW          = (x^T @ dY) * mask      (SDDMM, only the non-zero blocks are computed)

and ``block_sparse_matmul`` wires them into one ``jax.custom_vjp``, so ``jax.grad`` works
for all of them, including the Pallas kernels (``pallas_call`` has no JVP rule).

Backends: ``"pallas_gpu"`` (Triton), ``"pallas_tpu"`` (Mosaic, scalar prefetch), ``"xla"``
(gathers of the non-zero blocks; the CPU default) and ``"reference"`` (the dense masked
oracle). ``"auto"`` picks by platform (GPU -> pallas_gpu, TPU -> pallas_tpu, else xla);
the environment variable ``SPARSE_GPT_BSMM_BACKEND`` overrides ``"auto"``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels.bsmm import pallas_gpu, pallas_tpu, reference, xla
from kernels.bsmm.meta import BlockMeta, FrozenBlockMeta, check_divisible
from kernels.common import check_block_size

BACKENDS = ("pallas_gpu", "pallas_tpu", "xla", "reference")
_MODULES = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu, "xla": xla, "reference": reference}
_NATIVE = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}


def available_backends(platform: str | None = None) -> tuple[str, ...]:
    """Backends that run natively (``interpret=False``) on ``platform``.

    Args:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default ``jax.default_backend()``.

    Returns:
      Names usable as ``backend=``, preferred first. The Pallas backends also run on any
      platform with ``interpret=True`` (slow; for tests).
    """
    platform = platform or jax.default_backend()
    native = (_NATIVE[platform],) if platform in _NATIVE else ()
    return native + ("xla", "reference")


def resolve_backend(backend: str = "auto", platform: str | None = None) -> str:
    """Maps ``"auto"`` (or the env override) to a concrete backend name and validates it."""
    if backend == "auto":
        backend = os.environ.get("SPARSE_GPT_BSMM_BACKEND", "") or available_backends(platform)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'.")
    return backend


def _products(backend: str, interpret):
    mod = _MODULES[backend]
    if backend.startswith("pallas"):
        kw = dict(interpret=interpret)
        return (
            functools.partial(mod.matmul, **kw),
            functools.partial(mod.matmul_t, **kw),
            functools.partial(mod.sddmm, **kw),
        )
    return mod.matmul, mod.matmul_t, mod.sddmm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bsmm(x_MxK, w_KxN, meta, backend, interpret):
    return _products(backend, interpret)[0](x_MxK, w_KxN, meta, x_MxK.dtype)


def _bsmm_fwd(x_MxK, w_KxN, meta, backend, interpret):
    return _bsmm(x_MxK, w_KxN, meta, backend, interpret), (x_MxK, w_KxN, meta)


def _bsmm_bwd(backend, interpret, res, dy_MxN):
    x_MxK, w_KxN, meta = res
    _, matmul_t, sddmm = _products(backend, interpret)
    dx = matmul_t(dy_MxN.astype(x_MxK.dtype), w_KxN, meta, x_MxK.dtype)
    dw = sddmm(x_MxK, dy_MxN.astype(x_MxK.dtype), meta, w_KxN.dtype)
    return dx, dw, None  # the metadata is integer: no cotangent


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _frozen(x_MxK, w_KxN, fmeta):
    return xla.frozen_matmul(x_MxK, w_KxN, fmeta, x_MxK.dtype)


def _frozen_fwd(x_MxK, w_KxN, fmeta):
    return _frozen(x_MxK, w_KxN, fmeta), (x_MxK, w_KxN)


def _frozen_bwd(fmeta, res, dy_MxN):
    x_MxK, w_KxN = res
    dy_MxN = dy_MxN.astype(x_MxK.dtype)
    return (
        xla.frozen_matmul_t(dy_MxN, w_KxN, fmeta, x_MxK.dtype),
        xla.frozen_sddmm(x_MxK, dy_MxN, fmeta, w_KxN.dtype),
    )


_frozen.defvjp(_frozen_fwd, _frozen_bwd)


def block_sparse_matmul(
    x: jax.Array,
    w_KxN: jax.Array,
    meta: BlockMeta | FrozenBlockMeta,
    *,
    backend: str = "auto",
    interpret=False,
) -> jax.Array:
    """``x @ (w * expand(meta.block_mask))``, touching only the non-zero blocks.

    Differentiable in ``x`` and ``w`` (custom VJP): dX = dY @ W_sparse^T, and dW is computed
    only on the non-zero blocks and is exactly zero elsewhere. Inputs are promoted to a common
    dtype (fp32 or bf16); products accumulate in fp32; the output has the promoted dtype and
    the gradients the dtypes of ``x`` and ``w``.

    Args:
      x: ``[..., K]`` activations; leading dims are flattened into M.
      w_KxN: ``[K, N]`` dense weight (entries outside the mask are ignored).
      meta: ``make_block_meta(...)`` output for this weight. A ``FrozenBlockMeta`` (mask known
        at trace time) runs static slices on the xla backend; Pallas backends convert it.
      backend: ``"auto"``, ``"pallas_gpu"``, ``"pallas_tpu"``, ``"xla"`` or ``"reference"``.
      interpret: run Pallas kernels in interpret mode (``True`` or a
        ``pltpu.InterpretParams``); required for Pallas backends on CPU.

    Returns:
      ``[..., N]`` array.

    Raises:
      ValueError: shapes that disagree with ``meta`` or are not multiples of the block size,
        or an unknown backend.
    """
    if w_KxN.ndim != 2:
        raise ValueError(f"w must be 2-D [K, N]; got shape {w_KxN.shape}.")
    check_block_size(meta.block_size)
    check_divisible(w_KxN.shape, meta.block_size)
    if tuple(w_KxN.shape) != tuple(meta.shape):
        raise ValueError(
            f"w has shape {tuple(w_KxN.shape)} but the metadata was built for "
            f"{tuple(meta.shape)}: build it from this weight's [K, N] mask (or pass "
            "block_mask=True to make_block_meta for a [Kb, Nb] block mask)."
        )
    k, n = w_KxN.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features (shape {x.shape}) but w has K={k}.")
    # A Pallas backend on CPU without interpret fails in Pallas itself ("Only interpret mode
    # is supported on CPU"); no check here, so GPU/TPU programs can be lowered from a CPU host.
    backend = resolve_backend(backend)

    dtype = jnp.result_type(x, w_KxN)
    lead = x.shape[:-1]
    x_MxK = x.reshape(-1, k).astype(dtype)
    w_KxN = w_KxN.astype(dtype)
    if x_MxK.shape[0] == 0:
        return jnp.zeros((*lead, n), dtype)
    if isinstance(meta, FrozenBlockMeta):
        if backend == "xla":
            return _frozen(x_MxK, w_KxN, meta).reshape(*lead, n)
        meta = meta.to_traced()
    y_MxN = _bsmm(x_MxK, w_KxN, meta, backend, interpret)
    return y_MxN.reshape(*lead, n)
