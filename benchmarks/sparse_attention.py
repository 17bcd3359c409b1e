"""Benchmark: block-sparse attention (MST's hybrid patterns) against dense causal attention.

Run from the repository root::

    python benchmarks/sparse_attention.py                         # platform defaults
    python benchmarks/sparse_attention.py --seq-len 1024 --reps 3 # quicker
    python benchmarks/sparse_attention.py --out benchmarks/results/sparse_attention_cpu.txt

Defaults: CPU fp32, batch 1, L=2048, 4 heads of 64, block 64; GPU bf16, batch 8, L=4096,
16 heads of 64, block 128. Columns (timed in the same interleaved rounds, medians of
``--reps`` after a warm-up, ``block_until_ready``):

    dense      jax.nn.dot_product_attention(is_causal=True): the baseline, in ms
    masked     the same with the pattern's [L, L] mask (what the masked oracle costs)
    <backend>  kernels.block_sparse_attention (xla on CPU; pallas_gpu on GPU)

Ratios are dense_time / time (above 1: faster than dense). ``blocks`` is the fraction of the
``Lb x Lb`` blocks the kernels compute; dense causal attention computes the full square
here (XLA's CPU attention does not skip the upper triangle), so the ideal ratio is about
``1 / blocks``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from benchmarks.block_sparse_matmul import machine_description, time_interleaved  # noqa: E402
from sparse_gpt.model import attention as attention_lib# noqa: E402


def _fns(f):
    """(forward, forward+backward) jitted versions of ``f(q, k, v)``."""
    def fwdbwd(q, k, v, do):
        out, pull = jax.vjp(f, q, k, v)
        return (out, *pull(do))

    return jax.jit(f), jax.jit(fwdbwd)


def columns(pattern, seq_len: int, block: int, backends: list[str]) -> dict:
    mask = jnp.asarray(attention_lib.pattern_mask(pattern, seq_len))[None, None]
    cols = {"dense": _fns(attention_lib.dense_attention),
            "masked": _fns(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))}
    for name in backends:
        cols[name] = _fns(lambda q, k, v, name=name: kernels.block_sparse_attention(
            q, k, v, pattern, block_size=block, backend=name))
    return cols


def main(argv=None) -> None:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1 if on_cpu else 8)
    p.add_argument("--seq-len", type=int, default=2048 if on_cpu else 4096)
    p.add_argument("--heads", type=int, default=4 if on_cpu else 16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64 if on_cpu else 128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--patterns", default="local,strided,local_strided,fixed")
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    p.add_argument("--backends", default="xla" if on_cpu else "pallas_gpu,xla")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    backends = args.backends.split(",")
    names = ["masked", *backends]
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape), args.dtype) for _ in range(4))
    lines = [
        "sparse_attention benchmark: speedup = dense causal attention time / time (higher is "
        f"better), medians of {args.reps} interleaved runs after warm-up",
        machine_description(),
        f"q, k, v [B={args.batch}, L={args.seq_len}, H={args.heads}, K={args.head_dim}] "
        f"{args.dtype}; block {args.block}; window {args.window}, stride {args.stride}",
        f"{'pattern':>14} {'blocks':>6} {'mode':>7} {'dense_ms':>9}  "
        + "  ".join(f"{n:>10}" for n in names),
    ]
    print("\n".join(lines), flush=True)
    for kind in args.patterns.split(","):
        pattern = attention_lib.Pattern(kind, args.window, args.stride, summary=8)
        blocks = attention_lib.block_mask(pattern, args.seq_len, args.block).mean()
        cols = columns(pattern, args.seq_len, args.block, backends)
        ref = cols["masked"][0](q, k, v).astype(jnp.float32)
        for n in backends:   # correctness guard before timing
            err = float(jnp.max(jnp.abs(cols[n][0](q, k, v).astype(jnp.float32) - ref)))
            assert err < (5e-2 if args.dtype == "bfloat16" else 1e-3), (kind, n, err)
        for mode in ("fwd", "fwd+bwd"):
            calls = {n: (c[0], (q, k, v)) if mode == "fwd" else (c[1], (q, k, v, do))
                     for n, c in cols.items()}
            t = time_interleaved(calls, args.reps)
            ratios = "  ".join(f"{t['dense'] / t[n]:>10.2f}" for n in names)
            lines.append(f"{kind:>14} {blocks:>6.3f} {mode:>7} {t['dense'] * 1e3:>9.1f}  "
                         f"{ratios}")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
