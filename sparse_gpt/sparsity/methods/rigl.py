"""RigL (Evci et al. 2020): SET with growth by dense-gradient magnitude."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparse_gpt.sparsity import prune as prune_lib
from sparse_gpt.sparsity.methods.set import SET


@dataclasses.dataclass(frozen=True)
class RigL(SET):
    """Drops the smallest ``|w|`` and regrows the dead weights with the largest ``|dL/dw|``.

    The gradient must be dense (it is zero on masked weights otherwise), so
    ``needs_dense_grads`` asks the train step for the dense gradient on update steps (on the
    ``grow_grad_steps`` steps ending at each, summed, when that is above 1).
    Everything else - cosine drop fraction, update interval, zero init, moment reset - is
    inherited from SET.
    """

    needs_dense_grads: ClassVar[bool] = True

    def grow_scores(self, params, grads, sub, rng):
        del params, rng
        return prune_lib.gradient_magnitude(grads, sub)
