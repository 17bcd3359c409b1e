"""Block-sparse matmul kernels (Pallas GPU/TPU, pure XLA, dense reference)."""
