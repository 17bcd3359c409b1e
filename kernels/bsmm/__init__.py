"""Block-sparse matmul (see kernels/__init__.py)."""
