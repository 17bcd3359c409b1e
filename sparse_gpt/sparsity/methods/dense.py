"""Dense training: every weight live, no topology changes (the baseline)."""

from __future__ import annotations

import dataclasses

from sparse_gpt.sparsity.methods.base import SparsityMethod


@dataclasses.dataclass(frozen=True)
class Dense(SparsityMethod):
    """``init_masks`` returns the masks unchanged; ``update`` is the identity.

    The model's masks stay all-True (they are kept in the state, so checkpoints have the
    layout of every other method's), and the train step applies the model without them:
    a dense run costs what a plain GPT step costs.
    """

    starts_dense = True
    always_dense = True

    def validate(self, shapes, num_steps):
        del shapes, num_steps
        if self.settings.density != 1.0:
            raise ValueError(f"method=dense trains every weight, so density="
                             f"{self.settings.density} would be ignored; choose "
                             "--config.sparsity.method=static|gmp|set|rigl or set density=1.0.")
