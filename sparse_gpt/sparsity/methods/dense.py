"""Dense training: every weight live, no topology changes (the baseline)."""

from __future__ import annotations

import dataclasses

from sparse_gpt.sparsity.methods.base import SparsityMethod


@dataclasses.dataclass(frozen=True)
class Dense(SparsityMethod):
    """``init_masks`` returns the masks unchanged; ``update`` is the identity.

    The model's masks stay all-True, so the masked matmul computes the dense product; the
    base class already implements exactly this, the subclass only names it.
    """

    starts_dense = True

    def validate(self, shapes, num_steps):
        del shapes, num_steps
        if self.settings.density != 1.0:
            raise ValueError(f"method=dense trains every weight, so density="
                             f"{self.settings.density} would be ignored; choose "
                             "--config.sparsity.method=static|gmp|set|rigl or set density=1.0.")
