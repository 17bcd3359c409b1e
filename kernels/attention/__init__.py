"""Block-sparse attention (see kernels/__init__.py)."""
