"""What the block-sparse matmul (kernels/bsmm/) and attention (kernels/attention/) share.

* ``Registry``: the named backends of one op and the one rule that turns ``backend="auto"``
  into a name (environment override, else the platform's native backend, else ``"xla"``).
* Block-size checks and block pooling/expansion (``pool_blocks`` is also what
  ``sparse_gpt.sparsity.masks.pool`` runs).
* Small helpers of the Pallas backends (power-of-two index arrays for Triton, row padding,
  compact dW blocks -> dense layout), kept here so no backend imports another.

Dimension letters: ``[K, N]`` a matrix of Kb x Nb blocks of ``B x B`` (``Kb = K // B``);
``[..., K, N]`` may carry leading (layer) dimensions; ``T`` is a column-view budget.
Nothing here imports a backend, and nothing in kernels/ imports sparse_gpt.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

MIN_BLOCK, MAX_BLOCK = 16, 256


def check_block_size(block_size: int) -> None:
    """Raises ValueError unless ``block_size`` is a power of two in [16, 256]."""
    if (
        not isinstance(block_size, (int, np.integer))
        or block_size < MIN_BLOCK
        or block_size > MAX_BLOCK
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size={block_size!r} is not supported: use a power of two from {MIN_BLOCK} "
            f"to {MAX_BLOCK} (16, 32, 64, 128 or 256)."
        )


_REDUCE = ("any", "all", "mean", "sum", "max")


def pool_blocks(x_KxN, block: tuple[int, int], reduce: str = "any"):
    """Pools element values ``[..., K, N]`` into block values ``[..., K/bk, N/bn]``.

    Args:
      x_KxN: element values; a numpy array stays numpy (the metadata builders pool concrete
        masks at trace time, where jnp would return tracers), anything else goes through jnp.
      block: ``(bk, bn)`` block shape; it must divide the last two dimensions.
      reduce: ``"any"`` (a block is on if any element is non-zero: masks), ``"all"``,
        ``"mean"`` (scores: blocks compete by average magnitude), ``"sum"`` or ``"max"``.

    Returns:
      ``[..., K/bk, N/bn]`` block values (bool for ``any``/``all``).

    Raises:
      ValueError: an unknown ``reduce``.
    """
    if reduce not in _REDUCE:
        raise ValueError(f"reduce={reduce!r}: use one of {_REDUCE}.")
    xp = np if isinstance(x_KxN, np.ndarray) else jnp
    bk, bn = block
    *lead, k, n = x_KxN.shape
    x = x_KxN.reshape(*lead, k // bk, bk, n // bn, bn)
    return getattr(xp, reduce)(x, axis=(-3, -1))


def expand_blocks(mask_KbxNb: jax.Array, block: tuple[int, int]) -> jax.Array:
    """Expands block values ``[..., Kb, Nb]`` to elements ``[..., Kb*bk, Nb*bn]`` (same dtype)."""
    return jnp.repeat(jnp.repeat(mask_KbxNb, block[0], axis=-2), block[1], axis=-1)


# ----------------------------------------------------------------------------------------
# Pallas helpers.


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def flat_pow2(a: jax.Array) -> jax.Array:
    """Flattens an index array and zero-pads it to a power-of-two length for Triton."""
    flat = jnp.asarray(a).reshape(-1).astype(jnp.int32)
    return jnp.pad(flat, (0, next_pow2(flat.shape[0]) - flat.shape[0]))


def pad_rows(a: jax.Array, bm: int) -> jax.Array:
    """Zero-pads the rows of ``a`` to a multiple of the row tile ``bm`` (zero rows add nothing)."""
    extra = -a.shape[0] % bm
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


def scatter_blocks(blocks_NbTxBxB: jax.Array, meta, out_dtype) -> jax.Array:
    """Compact column-view blocks -> dense ``[K, N]`` (padding dropped, zeros elsewhere).

    Args:
      blocks_NbTxBxB: one ``B x B`` block per (output block column j, entry t), as the
        Pallas dW kernels write them: a Triton output BlockSpec cannot follow a runtime
        index, and writing straight into a dense TPU output would leave never-visited
        blocks uninitialised.
      meta: the matmul's ``BlockMeta`` (its column view places the blocks).
      out_dtype: dtype of the result.

    Returns:
      ``[K, N]`` with the real blocks in place and exact zeros elsewhere.
    """
    b = meta.block_size
    k, n = meta.shape
    kb, nb = k // b, n // b
    t = meta.col_kidx_NbxT.shape[1]
    real = jnp.arange(t)[None, :] < meta.col_count_Nb[:, None]
    kidx = jnp.where(real, meta.col_kidx_NbxT, kb)  # out of range -> dropped
    dw4 = (
        jnp.zeros((kb, nb, b, b), out_dtype)
        .at[kidx, jnp.arange(nb)[:, None]]
        .set(blocks_NbTxBxB.reshape(nb, t, b, b).astype(out_dtype), mode="drop")
    )
    return dw4.transpose(0, 2, 1, 3).reshape(k, n)


def bind_interpret(fns: tuple[Callable, ...], takes_interpret: bool, interpret) -> tuple:
    """The backend functions with ``interpret=`` bound where the backend takes it (Pallas)."""
    if not takes_interpret:
        return fns
    return tuple(functools.partial(f, interpret=interpret) for f in fns)


# ----------------------------------------------------------------------------------------
# Backend registry.


class Registry:
    """Named backends of one op (a record type of its functions) and ``"auto"`` resolution.

    Built-in backends are registered by the op's ``ops.py`` and cannot be replaced; a name
    registered from outside (a test, a notebook) may be registered again, which replaces it,
    so a notebook cell can be re-run.

    Args:
      what: the op's name in messages, e.g. ``"backend"`` or ``"attention backend"``.
      record: the NamedTuple of functions every backend of this op provides.
      env_var: environment variable that overrides ``"auto"``.
      native: platform (``jax.default_backend()``) -> its preferred backend.
      portable: backends that run on every platform, preferred first.
      register_fn: the public registration function, named in error messages.
    """

    def __init__(self, what: str, record: type, env_var: str, native: Mapping[str, str],
                 portable: tuple[str, ...] = ("xla", "reference"), register_fn: str = ""):
        self.what, self.record, self.env_var = what, record, env_var
        self.native, self.portable, self.register_fn = dict(native), portable, register_fn
        self._impls: dict[str, Any] = {}
        self._builtin: set[str] = set()

    def register(self, name: str, impl, *, builtin: bool = False) -> None:
        """Adds ``impl`` (an instance of ``record``) under ``name``; see the class docstring."""
        if not isinstance(name, str) or not name or name == "auto":
            raise ValueError(f"a backend name must be a non-empty string other than 'auto'; "
                             f"got {name!r}.")
        if not isinstance(impl, self.record):
            raise TypeError(f"{self.what} {name!r}: impl must be a {self.record.__name__} "
                            f"(fields {self.record._fields}); got {type(impl).__name__}.")
        if name in self._builtin:
            raise ValueError(f"{self.what} {name!r} is built in and cannot be replaced; "
                             "register yours under another name.")
        self._impls[name] = impl
        if builtin:
            self._builtin.add(name)

    def unregister(self, name: str) -> None:
        """Removes a backend registered from outside (built-in ones stay)."""
        if name in self._builtin:
            raise ValueError(f"{self.what} {name!r} is built in and cannot be removed.")
        self._impls.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-in ones first (registration order)."""
        return tuple(self._impls)

    def available(self, platform: str | None = None) -> tuple[str, ...]:
        """Built-in backends that run natively (no ``interpret``) on ``platform``, preferred
        first; default platform ``jax.default_backend()``."""
        platform = platform or jax.default_backend()
        native = (self.native[platform],) if platform in self.native else ()
        return native + self.portable

    def resolve(self, backend: str = "auto", platform: str | None = None) -> str:
        """Maps ``"auto"`` to a concrete name and checks that the name is registered.

        ``"auto"`` is the environment variable ``env_var`` when set, else the first of
        ``available(platform)``.

        Raises:
          ValueError: an unregistered name; the message lists the registered ones.
        """
        source = ""
        if backend == "auto":
            backend = os.environ.get(self.env_var, "")
            source = f" (from ${self.env_var})" if backend else ""
            backend = backend or self.available(platform)[0]
        if backend not in self._impls:
            raise ValueError(
                f"unknown {self.what} {backend!r}{source}; registered: {self.names()} or "
                f"'auto'. Add one with kernels.{self.register_fn}(name, impl)."
            )
        return backend

    def get(self, backend: str = "auto", platform: str | None = None):
        """The record of ``resolve(backend, platform)``."""
        return self._impls[self.resolve(backend, platform)]
