"""sparse_gpt: GPT training with sparsity in JAX/Flax.

A GPT is a pure function of three pytrees, ``params``, ``masks`` and ``tokens``; every sparsity
method is a pure function over those trees. See README.md for the tour.
"""

__version__ = "0.1.0"
