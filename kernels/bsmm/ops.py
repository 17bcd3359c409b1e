"""Public block-sparse matmul: ``x @ (w * expand(block_mask))`` with a custom VJP.

Dimension letters: x is ``[M, K]`` (M = tokens, all leading dims flattened), the weight
``[K, N]`` (K in-features, N out-features), y ``[M, N]``; B the block size, ``Kb = K // B``,
``Nb = N // B``; T and R the column and row budgets of the metadata (kernels/bsmm/meta.py).

A backend is a ``MatmulBackend``: the same three products in every backend,

    matmul    forward  y  = x @ W_sparse
    matmul_t  dX          = dY @ W_sparse^T        (row view of the same metadata)
    sddmm     dW          = (x^T @ dY) * mask      (only the non-zero blocks are computed)

each called as ``f(a, b, meta, out_dtype)`` (plus ``interpret=`` when ``takes_interpret``),
and ``block_sparse_matmul`` wires them into one ``jax.custom_vjp``, so ``jax.grad`` works
for all of them, including the Pallas kernels (``pallas_call`` has no JVP rule). A backend
may add ``frozen``, a second ``MatmulBackend`` for ``FrozenBlockMeta`` (masks known at trace
time); without it frozen metadata is converted to traced metadata.

``compact_matmul`` is the same op for the compact layout (kernels/bsmm/compact.py: the live
blocks ``[Nb, T, B, B]`` and their slot index): a backend's optional ``compact`` field is a
``CompactBackend`` of the three products on that layout (``f(a, b, cmeta, out_dtype)`` with
a ``CompactMeta``; dW comes out as ``[Nb, T, B, B]``), wired through the same custom VJP.

Built-in backends: ``"pallas_gpu"`` (Triton), ``"pallas_tpu"`` (Mosaic, scalar prefetch),
``"xla"`` (gathers of the non-zero blocks, static slices for frozen metadata; the CPU
default) and ``"reference"`` (the dense masked oracle). ``"auto"`` picks by platform
(GPU -> pallas_gpu, TPU -> pallas_tpu, else xla); the environment variable
``SPARSE_GPT_BSMM_BACKEND`` overrides ``"auto"``. ``register_backend`` adds one from outside
the package, selectable by name as ``backend=`` (``--config.model.kernel_backend=NAME``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kernels.bsmm import pallas_gpu, pallas_tpu, reference, xla, xla_frozen
from kernels.bsmm.compact import CompactMeta, make_compact_meta
from kernels.bsmm.meta import BlockMeta, FrozenBlockMeta, check_divisible
from kernels.common import Registry, bind_interpret, check_block_size


class CompactBackend(NamedTuple):
    """A backend's products for the compact layout (kernels/bsmm/compact.py).

    Attributes:
      matmul: ``(x_MxK, blocks_NbxTxBxB, cmeta, out_dtype) -> y_MxN``.
      matmul_t: ``(dy_MxN, blocks_NbxTxBxB, cmeta, out_dtype) -> dx_MxK``.
      sddmm: ``(x_MxK, dy_MxN, cmeta, out_dtype) -> dblocks_NbxTxBxB``.
      takes_interpret: the three take an ``interpret=`` keyword (Pallas backends).
      frozen: optional products taking a ``FrozenBlockMeta`` in place of ``cmeta``; ``None``
        converts it with ``make_compact_meta``.
    """

    matmul: Callable
    matmul_t: Callable
    sddmm: Callable
    takes_interpret: bool = False
    frozen: Optional["CompactBackend"] = None


class MatmulBackend(NamedTuple):
    """The functions of one block-sparse matmul backend (see the module docstring).

    Attributes:
      matmul: ``(x_MxK, w_KxN, meta, out_dtype) -> y_MxN``.
      matmul_t: ``(dy_MxN, w_KxN, meta, out_dtype) -> dx_MxK``.
      sddmm: ``(x_MxK, dy_MxN, meta, out_dtype) -> dw_KxN``, dense layout, exactly zero
        outside the metadata's blocks.
      takes_interpret: the three take an ``interpret=`` keyword (Pallas backends).
      frozen: optional products for ``FrozenBlockMeta``; ``None`` converts it to traced.
      compact: optional ``CompactBackend`` for ``compact_matmul``; ``None``: that backend
        cannot run the compact layout.
    """

    matmul: Callable
    matmul_t: Callable
    sddmm: Callable
    takes_interpret: bool = False
    frozen: Optional["MatmulBackend"] = None
    compact: Optional[CompactBackend] = None


_REGISTRY = Registry(
    "backend",
    MatmulBackend,
    env_var="SPARSE_GPT_BSMM_BACKEND",
    native={"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"},
    register_fn="register_backend",
)


def _compact_of(mod, prefix: str = "compact_", **kw) -> CompactBackend | None:
    # Detected, not required: a backend file gains its compact products when they land.
    fns = [getattr(mod, prefix + p, None) for p in ("matmul", "matmul_t", "sddmm")]
    return CompactBackend(*fns, **kw) if all(fns) else None


def _of(mod, **kw) -> MatmulBackend:
    compact = _compact_of(mod, takes_interpret=kw.get("takes_interpret", False))
    return MatmulBackend(mod.matmul, mod.matmul_t, mod.sddmm, compact=compact, **kw)


_XLA_FROZEN = MatmulBackend(xla_frozen.frozen_matmul, xla_frozen.frozen_matmul_t,
                            xla_frozen.frozen_sddmm)
_XLA = _of(xla, frozen=_XLA_FROZEN)
_XLA = _XLA._replace(compact=_XLA.compact._replace(
    frozen=_compact_of(xla_frozen, "frozen_compact_")))
_REGISTRY.register("pallas_gpu", _of(pallas_gpu, takes_interpret=True), builtin=True)
_REGISTRY.register("pallas_tpu", _of(pallas_tpu, takes_interpret=True), builtin=True)
_REGISTRY.register("xla", _XLA, builtin=True)
_REGISTRY.register("reference", _of(reference), builtin=True)
BACKENDS = _REGISTRY.names()  # the built-in names


def register_backend(name: str, impl: MatmulBackend) -> None:
    """Makes ``impl`` selectable as ``block_sparse_matmul(..., backend=name)``.

    Register before the first trace that uses it (the name is resolved at trace time).
    Registering a name again replaces it (re-running a notebook cell); built-in names cannot
    be replaced. See ``tests/test_kernels.py::test_registered_backend_matches_dense_masked_oracle``.

    Args:
      name: any string but ``"auto"`` and the built-in names.
      impl: a ``MatmulBackend`` of the three products (with ``compact=CompactBackend(...)``
        it also serves ``compact_matmul``).

    Raises:
      ValueError: a built-in, empty or ``"auto"`` name.
      TypeError: ``impl`` is not a ``MatmulBackend``.
    """
    _REGISTRY.register(name, impl)


def unregister_backend(name: str) -> None:
    """Removes a backend added with ``register_backend`` (a no-op for an unknown name)."""
    _REGISTRY.unregister(name)


def available_backends(platform: str | None = None) -> tuple[str, ...]:
    """Built-in backends that run natively (``interpret=False``) on ``platform``.

    Args:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``; default ``jax.default_backend()``.

    Returns:
      Names usable as ``backend=``, preferred first. The Pallas backends also run on any
      platform with ``interpret=True`` (slow; for tests).
    """
    return _REGISTRY.available(platform)


def resolve_backend(backend: str = "auto", platform: str | None = None) -> str:
    """Maps ``"auto"`` (or ``$SPARSE_GPT_BSMM_BACKEND``) to a registered name and checks it.

    Raises:
      ValueError: an unknown name; the message lists the registered ones.
    """
    return _REGISTRY.resolve(backend, platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bsmm(x_MxK, w_KxN, meta, impl: MatmulBackend, interpret):
    matmul = bind_interpret((impl.matmul,), impl.takes_interpret, interpret)[0]
    return matmul(x_MxK, w_KxN, meta, x_MxK.dtype)


def _bsmm_fwd(x_MxK, w_KxN, meta, impl, interpret):
    return _bsmm(x_MxK, w_KxN, meta, impl, interpret), (x_MxK, w_KxN, meta)


def _bsmm_bwd(impl, interpret, res, dy_MxN):
    x_MxK, w_KxN, meta = res
    matmul_t, sddmm = bind_interpret((impl.matmul_t, impl.sddmm), impl.takes_interpret, interpret)
    dy_MxN = dy_MxN.astype(x_MxK.dtype)
    dx = matmul_t(dy_MxN, w_KxN, meta, x_MxK.dtype)
    dw = sddmm(x_MxK, dy_MxN, meta, w_KxN.dtype)
    return dx, dw, None  # the metadata is integer (or static): no cotangent


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


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
        at trace time) runs the backend's ``frozen`` products (xla: static slices) or is
        converted to traced metadata.
      backend: ``"auto"``, a built-in name (``"pallas_gpu"``, ``"pallas_tpu"``, ``"xla"``,
        ``"reference"``) or one given to ``register_backend``.
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
    impl = _REGISTRY.get(backend)

    dtype = jnp.result_type(x, w_KxN)
    lead = x.shape[:-1]
    x_MxK = x.reshape(-1, k).astype(dtype)
    w_KxN = w_KxN.astype(dtype)
    if x_MxK.shape[0] == 0:
        return jnp.zeros((*lead, n), dtype)
    if isinstance(meta, FrozenBlockMeta):
        if impl.frozen is not None:
            impl = impl.frozen
        else:
            meta = meta.to_traced()
    y_MxN = _bsmm(x_MxK, w_KxN, meta, impl, interpret)
    return y_MxN.reshape(*lead, n)


def _compact_index(index, nb: int, t: int, b: int, k: int):
    """Checks ``index`` against the blocks and x; returns CompactMeta or FrozenBlockMeta."""
    fix = f"build it for blocks [Nb={nb}, T={t}, B={b}, B] and K={k}"
    if isinstance(index, FrozenBlockMeta):
        if index.block_size != b or tuple(index.shape) != (k, nb * b):
            raise ValueError(f"the FrozenBlockMeta is for shape {index.shape}, block_size "
                             f"{index.block_size}, but x and the blocks give ({k}, {nb * b}) "
                             f"and B={b}: {fix}.")
        counts = index.numpy().sum(0)
        if (counts != t).any():
            j = int((counts != t).argmax())
            raise ValueError(f"the FrozenBlockMeta's column {j} has {int(counts[j])} live "
                             f"blocks but the blocks hold T={t} per column: the compact layout "
                             "needs a column-balanced mask (sparsity.block_balance=column).")
        return index
    if isinstance(index, CompactMeta):
        if (index.block_size, tuple(index.shape), index.kidx_NbxT.shape) != (b, (k, nb * b),
                                                                            (nb, t)):
            raise ValueError(f"the CompactMeta is for shape {index.shape}, block_size "
                             f"{index.block_size}, kidx {index.kidx_NbxT.shape}: {fix}.")
        return index
    shape = tuple(getattr(index, "shape", ()))
    if shape != (nb, t) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"kidx has shape {shape} and dtype {getattr(index, 'dtype', None)} "
                         f"but the blocks need an int32 [Nb, T] = [{nb}, {t}] slot index "
                         "(kernels.compact_index(block_mask, T)).")
    return make_compact_meta(index, b, k)


def compact_matmul(
    x: jax.Array,
    blocks_NbxTxBxB: jax.Array,
    index,
    *,
    backend: str = "auto",
    interpret=False,
) -> jax.Array:
    """``x @ W`` for a compact column-balanced weight (kernels/bsmm/compact.py).

    ``W[kidx[j, t]*B : +B, j*B : +B] = blocks[j, t]``, zeros elsewhere. Differentiable in
    ``x`` and ``blocks`` (custom VJP): dX = dY @ W^T and dblocks ``[Nb, T, B, B]`` in the
    compact layout (no dense dW is built). Dtypes as ``block_sparse_matmul``: inputs promoted
    to a common dtype, fp32 accumulation, gradients in the inputs' dtypes.

    Args:
      x: ``[..., K]`` activations; leading dims are flattened into M.
      blocks_NbxTxBxB: the live blocks; T per output block column, every slot live.
      index: the slot index, ``int32 [Nb, T]`` (traced: topology changes never recompile), a
        ``CompactMeta`` (``make_compact_meta``) or a ``FrozenBlockMeta`` of a column-balanced
        mask whose slots are its ascending live K-blocks (static slices on xla).
      backend: as ``block_sparse_matmul``; it must have compact products (``xla``,
        ``reference``, and the Pallas backends once theirs are registered).
      interpret: run Pallas kernels in interpret mode (needed on CPU).

    Returns:
      ``[..., N]`` array, ``N = Nb * B``.

    Raises:
      ValueError: shapes that disagree (blocks not ``[Nb, T, B, B]``, K not a multiple of B,
        T > K/B, an index for other shapes, an unbalanced frozen mask), or a backend without
        compact products.
    """
    if blocks_NbxTxBxB.ndim != 4 or blocks_NbxTxBxB.shape[2] != blocks_NbxTxBxB.shape[3]:
        raise ValueError(f"blocks must be [Nb, T, B, B]; got shape {blocks_NbxTxBxB.shape} "
                         "(kernels.gather_blocks(w, kidx, block_size) builds them).")
    nb, t, b, _ = blocks_NbxTxBxB.shape
    check_block_size(b)
    k = x.shape[-1]
    if k % b or t > k // b:
        raise ValueError(f"x has K={k} features (shape {x.shape}), which must be a multiple of "
                         f"the block size {b} with at least T={t} K-blocks: pad x's features "
                         "or rebuild the blocks for this K.")
    meta = _compact_index(index, nb, t, b, k)
    name = resolve_backend(backend)
    impl = _REGISTRY.get(name).compact
    if impl is None:
        raise ValueError(f"backend {name!r} has no compact products (compact_matmul, "
                         "compact_matmul_t, compact_sddmm): use sparse_storage=dense "
                         "(block_sparse_matmul on the dense layout), another backend, or "
                         "register one with kernels.MatmulBackend(..., compact=kernels."
                         "CompactBackend(matmul, matmul_t, sddmm)).")
    if isinstance(meta, FrozenBlockMeta):
        if impl.frozen is not None:
            impl = impl.frozen
        else:
            meta = make_compact_meta(meta)

    dtype = jnp.result_type(x, blocks_NbxTxBxB)
    lead = x.shape[:-1]
    x_MxK = x.reshape(-1, k).astype(dtype)
    if x_MxK.shape[0] == 0:
        return jnp.zeros((*lead, nb * b), dtype)
    y_MxN = _bsmm(x_MxK, blocks_NbxTxBxB.astype(dtype), meta, impl, interpret)
    return y_MxN.reshape(*lead, nb * b)
