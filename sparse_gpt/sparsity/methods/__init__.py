"""Sparsity methods, one file each, and the registry ``sparse_gpt.plan`` builds them from.

=======  ==========================================================================
dense    every weight live (the baseline)
static   fixed random (or magnitude) topology at init, uniform / ERK / explicit densities;
         optionally dense after ``dense_finetune_start`` steps (masks lifted to all ones)
gmp      gradual magnitude pruning, dense -> sparse on Zhu & Gupta's cubic schedule
set      SET: magnitude drop, random regrowth, cosine-decayed drop fraction
rigl     RigL: magnitude drop, regrowth by dense-gradient magnitude
mst      MST: warm-up pruning, ultra-sparse evolution, restoration; mixed growing
=======  ==========================================================================

A method is a frozen dataclass: the shared :class:`Settings` plus its own fields, each filled
from the ``config.sparsity`` key of the same name. A notebook or a test adds its own::

    @dataclasses.dataclass(frozen=True)
    class MyMethod(methods.SET):
        my_knob: float = 0.5                 # read from config.sparsity.my_knob if present
        def grow_scores(self, params, grads, sub, rng): ...

    methods.register_method("mine", MyMethod)   # then sparsity.method=mine
"""

from __future__ import annotations

import dataclasses

from sparse_gpt.sparsity.methods.base import GradientGrowth, Settings, SparsityMethod
from sparse_gpt.sparsity.methods.dense import Dense
from sparse_gpt.sparsity.methods.gmp import GMP
from sparse_gpt.sparsity.methods.mst import MST
from sparse_gpt.sparsity.methods.rigl import RigL
from sparse_gpt.sparsity.methods.set import SET
from sparse_gpt.sparsity.methods.static import Static

METHODS: dict[str, type[SparsityMethod]] = {
    "dense": Dense, "static": Static, "gmp": GMP, "set": SET, "rigl": RigL, "mst": MST}

__all__ = ["METHODS", "Settings", "SparsityMethod", "GradientGrowth", "register_method",
           "method_fields", "Dense", "Static", "GMP", "SET", "RigL", "MST"]


def register_method(name: str, cls: type[SparsityMethod]) -> None:
    """Makes ``cls`` available as ``sparsity.method=name``.

    Raises:
      TypeError: ``cls`` is not a frozen dataclass subclass of :class:`SparsityMethod`.
      ValueError: ``name`` is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, SparsityMethod)
            and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"register_method({name!r}, {cls!r}): a method is a "
                        "@dataclasses.dataclass(frozen=True) subclass of SparsityMethod.")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"sparsity method {name!r} is already registered as "
                         f"{METHODS[name].__name__}; choose another name.")
    METHODS[name] = cls


def method_fields(cls: type[SparsityMethod]) -> dict[str, dataclasses.Field]:
    """The method's own fields (``config.sparsity`` keys), without the shared settings."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "settings"}
