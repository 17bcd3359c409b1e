"""RigL (Evci et al. 2020): SET with growth by dense-gradient magnitude."""

from __future__ import annotations

import dataclasses

from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity.methods.base import GradientGrowth
from sparse_gpt.sparsity.methods.set import SET


@dataclasses.dataclass(frozen=True)
class RigL(GradientGrowth, SET):
    """Drops the smallest ``|w|`` and regrows the dead weights with the largest ``|dL/dw|``.

    The gradient must be dense (it is zero on masked weights otherwise): ``GradientGrowth``
    asks the train step for it on update steps (on the ``grow_grad_steps`` steps ending at
    each, summed, when that is above 1). Everything else - cosine drop fraction, update
    interval, zero init, moment reset, fused qkv as three matrices - is SET's.
    """

    def grow_scores(self, params, grads, sub, rng):
        del params, rng
        return prune_lib.gradient_magnitude(grads, sub)
