"""A frozen block topology: the masks of a fixed-topology run as trace-time data.

Static sparsity (the SambaNova recipe) knows every mask before the first step, and its masks
never change (but for an optional lift to all-ones, which leaves the kernels altogether). A
:class:`Topology` holds those masks as ``kernels.FrozenBlockMeta`` values, one per layer of
each stacked kernel, so the block-sparse layers multiply with static slices (the XLA
backend groups output columns with the same K-blocks into one GEMM) or with constant
metadata (Pallas), instead of rebuilding traced metadata from the mask every step.

It travels in ``StepContext.topology`` (static: part of the compiled program, not an
argument), with ``StepContext.layer`` (the traced index of the scanned layer) choosing the
layer's topology by ``lax.switch``. Built by ``training.trainer.make_steps`` from the first
state's masks; each distinct set of masks compiles its own program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Topology:
    """Per-kernel, per-layer frozen block metadata (hashable; no array leaves).

    Attributes:
      kernels: ``((key, metas), ...)``: ``key`` a kernel's path below the stacked blocks
        (``"attn/qkv"``), ``metas`` one ``FrozenBlockMeta`` per layer.
    """

    kernels: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def of(cls, masks: Mapping, block_size: int,
           kernel_shapes: Mapping[str, tuple[int, ...]] | None = None) -> "Topology":
        """The topology of a (host) mask tree whose stacked kernels are ``[layers, K, N]``.

        Args:
          masks: the ``masks`` collection (numpy or fully addressable arrays).
          block_size: the block edge of the kernels.
          kernel_shapes: ``ModelConfig.kernel_shapes()``; needed for compact index leaves
            (``model/compact.py``), whose slots must be in ascending K-block order (as a
            fixed topology's are: the frozen kernels take the blocks in that order).

        Raises:
          ValueError: a mask that is not made of whole ``block_size`` blocks (the kernels
            multiply whole blocks; a partial block would be multiplied whole), or compact
            slots out of order.
        """
        import kernels  # local import: the model works without the kernels package loaded
        from sparse_gpt.model import compact, gpt

        out = []
        for path, mask in sorted(gpt.kernel_leaves(masks).items()):
            if compact.is_compact(mask):
                if kernel_shapes is None:
                    raise ValueError(f"{path} is a compact index mask: pass kernel_shapes "
                                     "(ModelConfig.kernel_shapes()) to Topology.of.")
                kidx_LxNbxT = np.asarray(mask)
                if np.any(np.diff(kidx_LxNbxT, axis=-1) <= 0):
                    raise ValueError(f"{path}: compact slots are not in ascending K-block "
                                     "order; a frozen topology needs them sorted (as init "
                                     "and to_compact make them).")
                kb = kernel_shapes[path][1] // block_size
                metas = tuple(kernels.make_block_meta(
                    np.asarray(kernels.index_block_mask(k, kb)), block_size, block_mask=True,
                    frozen=True) for k in kidx_LxNbxT)
                out.append((gpt.kernel_key(path), metas))
                continue
            m_LxKxN = np.asarray(mask) != 0
            pooled_any = kernels.pool_blocks(m_LxKxN, (block_size, block_size), "any")
            if not np.array_equal(pooled_any, kernels.pool_blocks(m_LxKxN, (block_size,) * 2,
                                                                   "all")):
                raise ValueError(f"{path}: the mask is not made of whole {block_size}x"
                                 f"{block_size} blocks; a frozen block topology needs "
                                 "--config.sparsity.structure=block with this block size.")
            metas = tuple(kernels.make_block_meta(b, block_size, block_mask=True, frozen=True)
                          for b in pooled_any)
            out.append((gpt.kernel_key(path), metas))
        return cls(tuple(out))

    def get(self, key: str) -> tuple[Any, ...] | None:
        """The per-layer metadata of kernel ``key`` (``"mlp/fc"``), or None."""
        for k, metas in self.kernels:
            if k == key:
                return metas
        return None
