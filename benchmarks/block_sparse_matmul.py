"""Benchmark: block-sparse matmul backends against dense ``jnp.dot``, forward and fwd+bwd.

Run from the repository root::

    python benchmarks/block_sparse_matmul.py                      # platform defaults
    python benchmarks/block_sparse_matmul.py --m 512 --reps 3     # quicker
    python benchmarks/block_sparse_matmul.py --backends xla,pallas_gpu --interpret  # CPU

Defaults: on GPU/TPU bf16, M=16384, K=N=4096, block sizes 64 and 128; on CPU fp32,
M=2048, K=1024, N=4096, block 128. Columns (each timed in the same interleaved rounds as
dense, median of ``--reps`` runs after a warm-up, ``block_until_ready``):

    dense       x @ w with jnp.dot: the baseline, in ms
    masked      x @ (w * expand(mask)) with a traced mask (what a masked layer costs)
    <backend>   kernels.block_sparse_matmul with metadata built inside the jitted function
                from a traced mask (topology can change without recompiling; checked)
    xla_frozen  the same with the mask baked in at trace time (recompiles per mask)

Ratios are dense_time / time: above 1 is faster than dense. Masks put the same number of
blocks (+-1) in every output block column, which is what the per-column budget
``kernels.block_budget(K, N, B, density)`` assumes; at low density and small Kb the budget
rounds up (e.g. 10% of Kb=8 -> 1 block per column), and the table shows both densities.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402


def machine_description() -> str:
    """CPU model, core count, accelerator and versions, for the results file."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}; CPU {cpu}, "
        f"{os.cpu_count()} cores; JAX device {dev.platform}:{dev.device_kind} "
        f"(x{jax.device_count()}); jax {jax.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}"
    )


def balanced_block_mask(kb: int, nb: int, density: float, rng) -> np.ndarray:
    """Random block mask with round(density*Kb*Nb) blocks spread evenly over the columns."""
    total = int(round(density * kb * nb))
    per_col = np.full(nb, total // nb)
    per_col[rng.permutation(nb)[: total % nb]] += 1
    mask = np.zeros((kb, nb), bool)
    for j, c in enumerate(per_col):
        mask[rng.permutation(kb)[:c], j] = True
    return mask


def fwd_and_fwdbwd(f):
    """(forward, forward+backward) jitted versions of ``f(x, w, *rest)``."""
    fwd = jax.jit(f)

    def vjp(x, w, dy, *rest):
        y, pull = jax.vjp(lambda x, w: f(x, w, *rest), x, w)
        return (y, *pull(dy))

    return fwd, jax.jit(vjp)


def build(name: str, b: int, budget, interpret: bool, mask_np: np.ndarray, dtype):
    """Returns (fwd, fwdbwd, extra_args) for one column of the table."""
    if name == "dense":
        return (*fwd_and_fwdbwd(lambda x, w: jnp.dot(x, w)), ())
    if name == "masked":
        return (
            *fwd_and_fwdbwd(lambda x, w, m: jnp.dot(x, w * m)),
            (kernels.expand_block_mask(jnp.asarray(mask_np), b).astype(dtype),),
        )
    if name == "xla_frozen":
        fmeta = kernels.make_block_meta(mask_np, b, block_mask=True, frozen=True)
        return (*fwd_and_fwdbwd(lambda x, w: kernels.block_sparse_matmul(x, w, fmeta)), ())

    def f(x, w, mask_KbxNb):
        meta = kernels.make_block_meta(mask_KbxNb, b, budget, block_mask=True)
        return kernels.block_sparse_matmul(x, w, meta, backend=name, interpret=interpret)

    return (*fwd_and_fwdbwd(f), (jnp.asarray(mask_np),))


def time_interleaved(calls: dict, reps: int) -> dict:
    """Median seconds per call; one warm-up each, then ``reps`` rounds over all calls."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_config(args, b: int, density: float, names: list[str], rng) -> list[str]:
    dtype = jnp.dtype(args.dtype)
    kb, nb = args.k // b, args.n // b
    x = jnp.asarray(rng.standard_normal((args.m, args.k)), dtype)
    w = jnp.asarray(rng.standard_normal((args.k, args.n)) / np.sqrt(args.k), dtype)
    dy = jnp.asarray(rng.standard_normal((args.m, args.n)), dtype)
    mask_np = balanced_block_mask(kb, nb, density, rng)
    budget = kernels.block_budget(args.k, args.n, b, density)
    cols = {nm: build(nm, b, budget, args.interpret, mask_np, dtype) for nm in ["dense"] + names}

    # Correctness and "no recompile" guard before timing.
    ref = cols["masked"][0](x, w, *cols["masked"][2]) if "masked" in cols else None
    for nm in names:
        fwd, fwdbwd, extra = cols[nm]
        if ref is not None and nm != "masked":
            err = float(jnp.max(jnp.abs(fwd(x, w, *extra).astype(jnp.float32) - ref)))
            tol = (5e-2 if dtype == jnp.bfloat16 else 1e-3) * float(jnp.max(jnp.abs(ref)))
            assert err <= tol, f"{nm} B={b} d={density}: max |err| {err} > {tol}"
        if extra and extra[0].dtype == jnp.bool_:  # traced metadata: a new mask, same program
            other = jnp.asarray(balanced_block_mask(kb, nb, density, rng))
            jax.block_until_ready(fwdbwd(x, w, dy, other))
            jax.block_until_ready(fwdbwd(x, w, dy, *extra))
            assert fwdbwd._cache_size() == 1, f"{nm} recompiled for a new topology"

    out = []
    for mode in ("fwd", "fwd+bwd"):
        calls = {
            nm: (c[0], (x, w, *c[2])) if mode == "fwd" else (c[1], (x, w, dy, *c[2]))
            for nm, c in cols.items()
        }
        t = time_interleaved(calls, args.reps)
        ratios = "  ".join(f"{t['dense'] / t[nm]:>{max(len(nm), 6)}.2f}" for nm in names)
        out.append(
            f"{b:>4} {density:>5.2f} {mask_np.mean():>6.3f} {budget.max_per_col:>3} "
            f"{mode:>7} {t['dense'] * 1e3:>9.1f}  {ratios}"
        )
        print(out[-1], flush=True)
    return out


def main(argv=None) -> None:
    on_cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=2048 if on_cpu else 16384)
    p.add_argument("--k", type=int, default=1024 if on_cpu else 4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument(
        "--dtype", default="float32" if on_cpu else "bfloat16", choices=["float32", "bfloat16"]
    )
    p.add_argument("--block-sizes", default="128" if on_cpu else "64,128")
    p.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    p.add_argument(
        "--backends",
        default=None,
        help="comma list from masked,xla,xla_frozen,pallas_gpu,pallas_tpu,reference"
        " (default: masked, the platform's backends and xla_frozen)",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="run Pallas backends in interpret mode (CPU; use tiny --m/--k/--n)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)

    names = (
        args.backends.split(",")
        if args.backends
        else ["masked", *kernels.available_backends()[:-1], "xla_frozen"]
    )
    header = [
        "block_sparse_matmul benchmark: speedup = dense jnp.dot time / time (higher is "
        "better), medians of %d interleaved runs after warm-up" % args.reps,
        machine_description(),
        f"shape x[M={args.m}, K={args.k}] @ w[K, N={args.n}], dtype {args.dtype}; "
        f"masks column-balanced; traced backends build metadata inside jit from a traced "
        f"mask with budget block_budget(K, N, B, density)",
        f"{'B':>4} {'dens':>5} {'actual':>6} {'T':>3} {'mode':>7} {'dense_ms':>9}  "
        + "  ".join(f"{nm:>{max(len(nm), 6)}}" for nm in names),
    ]
    print("\n".join(header), flush=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    t0 = time.perf_counter()
    for b in [int(v) for v in args.block_sizes.split(",")]:
        for d in [float(v) for v in args.densities.split(",")]:
            rows += run_config(args, b, d, names, rng)
    footer = f"total wall time {time.perf_counter() - t0:.0f} s"
    print(footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows + [footer]) + "\n")


if __name__ == "__main__":
    main()
