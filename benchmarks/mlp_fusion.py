"""Benchmark: does a dataflow-style fused MLP (fc -> GELU -> proj per tile) beat XLA?

Run from the repository root::

    python benchmarks/mlp_fusion.py              # writes benchmarks/results/mlp_fusion_...
    python benchmarks/mlp_fusion.py --reps 3 --out -

The model's MLP is ``proj(gelu(fc(x)))`` on masked weights (``x @ where(mask, w, 0)``).
XLA fuses the mask select and the GELU (with the bias add) into elementwise loops, but the
``[T, F]`` hidden activation is written out between the two matmuls and read back (and kept
for the backward pass). The candidates stream tiles through both matmuls instead, the way a
dataflow chip would, so ``[T, F]`` never exists whole:

    xla       the model's MLP as written (the baseline)
    tokens    rows of x in tiles: fc, GELU, proj per tile (``lax.map``; rematerialised in
              the backward pass, so only one ``[tile, F]`` is alive)
    hidden    hidden units in tiles: y = sum_f gelu(x W1[:, f]) W2[f, :] (``lax.scan``),
              flash-attention style over F

Times are forward+backward (``value_and_grad`` of a scalar of the output, grads of x and
both weights), median of ``--reps`` after a warm-up, all variants interleaved in the same
rounds; ratios are xla_time / time (above 1: faster than XLA). The verdict at the end says
whether a variant is worth putting in the model (it must be faster at every shape).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._results import save_result  # noqa: E402
from benchmarks.block_sparse_matmul import machine_description  # noqa: E402


def masked(w, m):
    return jnp.where(m, w, jnp.zeros((), w.dtype))


def mlp_xla(x, w1, m1, b1, w2, m2, b2):
    return jax.nn.gelu(x @ masked(w1, m1) + b1) @ masked(w2, m2) + b2


def mlp_tokens(x, w1, m1, b1, w2, m2, b2, tile):
    w1, w2 = masked(w1, m1), masked(w2, m2)

    @jax.checkpoint
    def one(x_tile):
        return jax.nn.gelu(x_tile @ w1 + b1) @ w2 + b2
    t, d = x.shape
    return jax.lax.map(one, x.reshape(t // tile, tile, d)).reshape(t, -1)


def mlp_hidden(x, w1, m1, b1, w2, m2, b2, tile):
    f = w1.shape[1]
    w1_t = masked(w1, m1).reshape(-1, f // tile, tile).swapaxes(0, 1)   # [F/tile, D, tile]
    w2_t = masked(w2, m2).reshape(f // tile, tile, -1)                  # [F/tile, tile, D]

    @jax.checkpoint
    def step(acc, ws):
        w1_f, b1_f, w2_f = ws
        return acc + jax.nn.gelu(x @ w1_f + b1_f) @ w2_f, None
    acc = jnp.zeros((x.shape[0], w2.shape[1]), x.dtype) + b2
    return jax.lax.scan(step, acc, (w1_t, b1.reshape(-1, tile), w2_t))[0]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x128x512,2048x256x1024,1024x768x3072",
                   help="comma-separated TxDxF (tokens x d_model x d_ff)")
    p.add_argument("--tiles", default="256,512", help="tile sizes tried for both candidates")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="", help="results file ('-': stdout only)")
    return p.parse_args(argv)


def run(args) -> list[str]:
    lines = [f"machine: {machine_description()}",
             f"fp32, masks at density {args.density}, forward+backward, median of {args.reps}",
             "", f"{'T x D x F':>16} {'variant':>12} {'ms':>9} {'xla/this':>9} {'max err':>9}"]
    always_faster = {}
    for shape in args.shapes.split(","):
        t, d, f = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(keys[0], (t, d))
        w1, w2 = (jax.random.normal(keys[1], (d, f)) / d ** 0.5,
                  jax.random.normal(keys[2], (f, d)) / f ** 0.5)
        m1, m2 = (jax.random.uniform(keys[3], (d, f)) < args.density,
                  jax.random.uniform(keys[4], (f, d)) < args.density)
        b1, b2 = jnp.zeros(f), jnp.zeros(d)
        variants = {"xla": mlp_xla}
        for tile in map(int, args.tiles.split(",")):
            if t % tile == 0:
                variants[f"tokens/{tile}"] = lambda *a, tile=tile: mlp_tokens(*a, tile)
            if f % tile == 0:
                variants[f"hidden/{tile}"] = lambda *a, tile=tile: mlp_hidden(*a, tile)
        fns = {k: jax.jit(jax.value_and_grad(lambda x, w1, w2, fn=fn: jnp.sum(
            fn(x, w1, m1, b1, w2, m2, b2) ** 2), argnums=(0, 1, 2))) for k, fn in variants.items()}
        outs = {k: jax.block_until_ready(fn(x, w1, w2)) for k, fn in fns.items()}   # warm-up
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x, w1, w2))
                times[k].append(time.perf_counter() - start)
        base = statistics.median(times["xla"])
        for k in fns:
            med = statistics.median(times[k])
            err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                      for a, b in zip(jax.tree.leaves(outs[k]), jax.tree.leaves(outs["xla"])))
            lines.append(f"{shape:>16} {k:>12} {med * 1e3:>9.2f} {base / med:>9.2f} {err:>9.1e}")
            print(lines[-1], flush=True)
            if k != "xla":
                family = k.split("/")[0]
                always_faster[family] = always_faster.get(family, True) and med < base
    kept = [k for k, v in always_faster.items() if v]
    lines += ["", "verdict: " + (f"{', '.join(kept)} beat XLA at every shape" if kept else
                                 "no fused variant beats XLA at every shape; the model keeps "
                                 "XLA's MLP")]
    return lines


def main(argv):
    args = parse(argv)
    text = "\n".join(run(args)) + "\n"
    save_result(text, args.out, f"mlp_fusion_{jax.default_backend()}", "txt")


if __name__ == "__main__":
    main(sys.argv[1:])
