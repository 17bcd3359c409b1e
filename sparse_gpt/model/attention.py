"""Dense causal and hybrid sparse attention: MST's patterns and the step window that uses them.

Patterns (all causal: query ``i`` sees key ``j <= i``; ``d = i - j``):

==============  =========================================================================
local           a band: ``d < window`` (the last ``window`` tokens, itself included)
strided         every ``stride``-th token back: ``d % stride == 0``
local_strided   their union, the Sparse Transformer's strided pattern (Child et al. 2019)
fixed           fixed blocks of ``stride`` tokens with summary columns: ``i // stride ==
                j // stride`` or ``j % stride >= stride - summary`` (the last ``summary``
                tokens of every block are seen by all later queries)
==============  =========================================================================

A :class:`Pattern` is a hashable mask function ``pattern(q_pos, k_pos) -> bool``: the same
object gives the ``[L, L]`` mask (:func:`pattern_mask`), the block mask at a block size
(:func:`block_mask`), and the in-block masks the kernels recompute on the fly
(``kernels.block_sparse_attention``).

*Hybrid* attention (MST): the pattern replaces dense causal attention for the training steps
``[attention.sparse_start, attention.sparse_end)`` only. The train step passes the model a
:class:`Switch` whose ``on`` flag is traced (``step`` in the window), and each attention
layer runs ``lax.cond(on, sparse, dense)``: moving in and out of the window never
recompiles. Evaluation and sampling use dense attention.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import kernels
from kernels.attention.meta import div, rem
from kernels.common import check_block_size
from sparse_gpt.model import layers
from sparse_gpt.model.causal import causal_attention

PATTERNS = ("local", "strided", "local_strided", "fixed")
IMPLS = ("block_sparse", "masked")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A causal sparse attention pattern (see the module table).

    Attributes:
      kind: ``local`` | ``strided`` | ``local_strided`` | ``fixed``.
      window: band width of ``local`` (keys ``i - window < j <= i``).
      stride: step of ``strided``; block length of ``fixed``.
      summary: ``fixed`` only: summary columns at the end of each block, in [0, stride].
    """

    kind: str = "local_strided"
    window: int = 128
    stride: int = 128
    summary: int = 8

    def __post_init__(self):
        if self.kind not in PATTERNS:
            raise ValueError(f"Unknown attention.pattern {self.kind!r}; choose one of "
                             f"{', '.join(PATTERNS)} (--config.attention.pattern=...).")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"attention.window={self.window} and stride={self.stride} must "
                             "be >= 1 (tokens).")
        if self.kind == "fixed" and not 0 <= self.summary <= self.stride:
            raise ValueError(f"attention.summary={self.summary} must be in [0, stride="
                             f"{self.stride}] (summary columns per block of the fixed pattern).")

    def __call__(self, q_pos, k_pos):
        """True where query ``q_pos`` may attend to key ``k_pos`` (numpy or jax ints)."""
        causal = q_pos >= k_pos
        # Differences are >= 0 wherever causal holds, so rem / div (C-style on jax ints)
        # agree with Python's % and // there; elsewhere the result is masked anyway.
        d = q_pos - k_pos
        if self.kind == "local":
            return causal & (d < self.window)
        if self.kind == "strided":
            return causal & (rem(d, self.stride) == 0)
        if self.kind == "local_strided":
            return causal & ((d < self.window) | (rem(d, self.stride) == 0))
        same_block = div(q_pos, self.stride) == div(k_pos, self.stride)
        summary = rem(k_pos, self.stride) >= self.stride - self.summary
        return causal & (same_block | summary)


def causal_mask(seq_len: int) -> np.ndarray:
    """Dense causal attention as a bool ``[L, L]`` mask (query rows, key columns)."""
    return np.tril(np.ones((seq_len, seq_len), bool))


def pattern_mask(pattern: Pattern, seq_len: int) -> np.ndarray:
    """The pattern as a bool ``[L, L]`` mask (query rows, key columns)."""
    return kernels.element_mask(pattern, seq_len)


def block_mask(pattern: Pattern, seq_len: int, block_size: int) -> np.ndarray:
    """``[L/B, L/B]`` bool: blocks holding at least one allowed pair (what the kernel computes)."""
    return kernels.attention_meta(pattern, seq_len, block_size).block_mask_LbxLb


dense_attention = causal_attention   # what the model runs outside the sparse window


@dataclasses.dataclass(frozen=True)
class HybridAttention:
    """Static settings of hybrid attention (``config.attention``); hashable.

    Attributes:
      pattern: the sparse pattern.
      block_size: kernel block edge B (a power of two in [16, 256] dividing the length).
      start: first step of the sparse window.
      end: first step after it (sparse on ``[start, end)``).
      impl: ``block_sparse`` (kernels, skips empty blocks) or ``masked`` (dense attention
        with the ``[L, L]`` mask: the oracle, no saving).
      backend: kernel backend (``auto``, ``xla``, ``pallas_gpu``, ``reference``).
      interpret: run Pallas kernels in interpret mode (tests on CPU).
    """

    pattern: Pattern = Pattern()
    block_size: int = 64
    start: int = 0
    end: int = 0
    impl: str = "block_sparse"
    backend: str = "auto"
    interpret: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"Unknown attention.impl {self.impl!r}; choose one of "
                             f"{', '.join(IMPLS)}.")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"attention.sparse_start={self.start} / sparse_end={self.end}: "
                             "need 0 <= sparse_start <= sparse_end (-1: to the last step).")
        kernels.resolve_attention_backend(self.backend)
        try:
            check_block_size(self.block_size)
        except ValueError as e:
            raise ValueError(f"attention.block_size: {e}") from None

    def check_length(self, seq_len: int) -> None:
        """Raises ValueError, naming the key, when the block size does not fit ``seq_len``."""
        kernels.attention_meta(self.pattern, seq_len, self.block_size)

    def active(self, step) -> jax.Array:
        """Traced bool: whether ``step`` is inside the sparse window."""
        step = jnp.asarray(step, jnp.int32)
        return (step >= self.start) & (step < self.end)

    def switch(self, step) -> "Switch":
        """The model argument for ``step`` (``GPT.__call__(..., sparse_attention=)``)."""
        return Switch(on=self.active(step), spec=self)

    def attend(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK) -> jax.Array:
        """Attention restricted to the pattern (always sparse; see :class:`Switch`)."""
        if self.impl == "masked":
            mask = jnp.asarray(pattern_mask(self.pattern, q_BxLxHxK.shape[1]))
            return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK,
                                                mask=mask[None, None])

        def local(q, k, v):
            return kernels.block_sparse_attention(
                q, k, v, self.pattern, block_size=self.block_size, backend=self.backend,
                interpret=self.interpret)

        # As for the block-sparse matmul: each device runs the kernel on its batch rows.
        return layers.over_batch_shards(local, (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK),
                                        (True, True, True))

    def pairs(self, seq_len: int) -> float:
        """(query, key) pairs one head computes per sequence while the pattern is on.

        ``block_sparse``: the non-empty blocks times ``B^2`` (what the kernel multiplies,
        partly masked blocks included); ``masked``: the full ``L^2`` square, as dense.
        """
        if self.impl == "masked":
            return float(seq_len) ** 2
        return float(block_mask(self.pattern, seq_len, self.block_size).sum()
                     * self.block_size ** 2)

    def metrics(self, step) -> dict[str, jax.Array]:
        """What the step reports: ``sparse_attention`` 1.0 inside the window, else 0.0."""
        return {"sparse_attention": self.active(step).astype(jnp.float32)}


@flax.struct.dataclass
class Switch:
    """Hybrid attention for one step: the pattern when ``on``, dense causal otherwise.

    A pytree (``on`` is a traced leaf, the settings are static), so it passes through
    ``nn.scan`` and ``lax.cond`` and one compiled step serves every step.
    """

    on: jax.Array
    spec: HybridAttention = flax.struct.field(pytree_node=False)

    def pairs(self, seq_len: int) -> jax.Array:
        """Traced (query, key) pairs per sequence and head this step (FLOP counting)."""
        return jnp.where(self.on, self.spec.pairs(seq_len), float(seq_len) ** 2)

    def __call__(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK) -> jax.Array:
        return lax.cond(self.on, self.spec.attend, dense_attention,
                        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
