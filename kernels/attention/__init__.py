"""Block-sparse attention over a static pattern; its public API is re-exported by ``kernels``.

Files: meta.py (pattern -> block lists, the ``mask_fn`` contract), reference.py (the dense
masked oracle), ops.py (the ``custom_vjp`` public op and the backend registry), and one
backend per file: xla.py, pallas_gpu.py. Dimension letters: backends work on ``[G, L, D]``
(G = batch x heads, L sequence length, D head dimension), B the block size.
"""
