"""The GPT model: Flax modules, the SparseDense layer, hybrid attention, GPT-2 import.

Imports nothing from sparsity, data or training: it receives values (block density,
number of real tokens, kernel paths) from ``sparse_gpt.plan``.
"""
