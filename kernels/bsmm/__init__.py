"""Block-sparse matmul ``x @ (w * expand(block_mask))``; its public API is re-exported by
``kernels``.

Files: meta.py (mask -> static-shape metadata and budgets), compact.py (the compact layout
of column-balanced weights: live blocks ``[Nb, T, B, B]`` + slot index), reference.py (the
dense masked oracle), ops.py (the ``custom_vjp`` public ops and the backend registry), and
one backend per file: xla.py, pallas_gpu.py, pallas_tpu.py. Dimension letters: x ``[M, K]``,
W ``[K, N]`` (in-features x out-features), B the block size (meta.py lists the rest).
"""
