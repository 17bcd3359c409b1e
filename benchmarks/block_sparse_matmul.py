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
                from a traced mask (a new topology reuses the compiled program)
    xla_frozen  the same with the mask baked in at trace time (recompiles per mask)
    gemm_T      not a kernel: the dense GEMM ``x[:, :T*B] @ w[:T*B]``, the traced kernels'
                FLOPs (T blocks per column) as one GEMM of this machine; its ratio is what a
                kernel of that budget could reach if it lost nothing to gathers and slices
                (on CPU, GEMMs of small inner dimension run below the large GEMM's rate)
    compact-<backend>   kernels.compact_matmul: the weight stored as its live blocks
                only, [Nb, T, B, B] (model.sparse_storage=compact), traced slot index; dW
                comes out as blocks. compact-xla_frozen: the same with a trace-time
                topology. n/a where the mask's columns hold unequal counts (e.g. 10% of
                Kb=8): compact storage holds the same number of blocks in every column

Ratios are dense_time / time: above 1 is faster than dense. A column whose kernel fails to
build, compile or match the masked product reads ``failed`` (the error goes to stderr) and
the others still run, and the script then exits non-zero. Masks put the same number of
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


REFERENCES = ("dense", "gemm_T")   # timing references, not the masked product


class NotApplicable(Exception):
    """A column that cannot run this configuration (shown as n/a, not as failed)."""


def build(name: str, b: int, budget, interpret: bool, mask_np: np.ndarray, other_np, w, dtype):
    """Returns (fwd, fwdbwd, weight, extra_args, other_topology) for one column of the table.

    ``weight`` is what the column multiplies by (``w``, or its live blocks for the compact
    columns); ``other_topology`` is the extra args for ``other_np``, another mask of the same
    density, for the traced columns (None for the rest): they reuse one program for it.
    """
    if name == "dense":
        return (*fwd_and_fwdbwd(lambda x, w: jnp.dot(x, w)), w, (), None)
    if name == "masked":
        return (
            *fwd_and_fwdbwd(lambda x, w, m: jnp.dot(x, w * m)), w,
            (kernels.expand_block_mask(jnp.asarray(mask_np), b).astype(dtype),), None,
        )
    frozen = name in ("xla_frozen", "compact-xla_frozen")
    fmeta = kernels.make_block_meta(mask_np, b, block_mask=True, frozen=True) if frozen else None
    if name == "xla_frozen":
        return (*fwd_and_fwdbwd(lambda x, w: kernels.block_sparse_matmul(x, w, fmeta)), w, (),
                None)
    if name == "gemm_T":
        kk = budget.max_per_col * b
        return (*fwd_and_fwdbwd(lambda x, w: jnp.dot(x[:, :kk], w[:kk])), w, (), None)
    if name.startswith("compact-"):
        counts = mask_np.sum(0)
        if counts.min() != counts.max():
            raise NotApplicable(f"the mask holds {counts.min()}-{counts.max()} blocks per "
                                "column; compact storage needs the same number in each")
        backend = name.removeprefix("compact-")
        kidx = kernels.compact_index(mask_np, int(counts[0]))
        blocks = kernels.gather_blocks(w, kidx, b)
        if backend == "xla_frozen":
            return (*fwd_and_fwdbwd(lambda x, bl: kernels.compact_matmul(
                x, bl, fmeta, backend="xla")), blocks, (), None)

        def fc(x, bl, kidx_NbxT):
            return kernels.compact_matmul(x, bl, kidx_NbxT, backend=backend, interpret=interpret)

        other = kernels.compact_index(other_np, kidx.shape[1])
        return (*fwd_and_fwdbwd(fc), blocks, (kidx,), (other,))

    def f(x, w, mask_KbxNb):
        meta = kernels.make_block_meta(mask_KbxNb, b, budget, block_mask=True)
        return kernels.block_sparse_matmul(x, w, meta, backend=name, interpret=interpret)

    return (*fwd_and_fwdbwd(f), w, (jnp.asarray(mask_np),), (jnp.asarray(other_np),))


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


def run_config(args, b: int, density: float, names: list[str], rng) -> tuple[list[str], bool]:
    """Times every column at block ``b`` and ``density``: (table rows, whether one failed)."""
    dtype = jnp.dtype(args.dtype)
    kb, nb = args.k // b, args.n // b
    x = jnp.asarray(rng.standard_normal((args.m, args.k)), dtype)
    w = jnp.asarray(rng.standard_normal((args.k, args.n)) / np.sqrt(args.k), dtype)
    dy = jnp.asarray(rng.standard_normal((args.m, args.n)), dtype)
    mask_np = balanced_block_mask(kb, nb, density, rng)
    other_np = balanced_block_mask(kb, nb, density, rng)   # the same counts per column
    budget = kernels.block_budget(args.k, args.n, b, density)
    ref = jnp.dot(x, w * kernels.expand_block_mask(jnp.asarray(mask_np), b).astype(dtype))
    tol = (5e-2 if dtype == jnp.bfloat16 else 1e-3) * float(jnp.max(jnp.abs(ref)))

    cols, skipped = {}, set()
    for nm in ["dense"] + names:
        try:
            fwd, fwdbwd, weight, extra, other = build(nm, b, budget, args.interpret, mask_np,
                                                      other_np, w, dtype)
            if nm not in REFERENCES:  # correctness against the masked product, first
                err = float(jnp.max(jnp.abs(fwd(x, weight, *extra).astype(jnp.float32) - ref)))
                assert err <= tol, f"max |err| {err} > {tol}"
            jax.block_until_ready(fwdbwd(x, weight, dy, *extra))
            if other is not None:  # traced topology: a new mask reuses the program
                jax.block_until_ready(fwdbwd(x, weight, dy, *other))
                assert fwdbwd._cache_size() == 1, "recompiled for a new topology"
        except NotApplicable as e:
            print(f"{nm} B={b} d={density}: n/a: {e}", file=sys.stderr, flush=True)
            skipped.add(nm)
            continue
        except Exception as e:  # noqa: BLE001 -- one column's failure must not lose the rest
            if nm == "dense":
                raise
            print(f"{nm} B={b} d={density}: failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            continue
        cols[nm] = (fwd, fwdbwd, weight, extra)

    out = []
    for mode in ("fwd", "fwd+bwd"):
        calls = {
            nm: (c[0], (x, c[2], *c[3])) if mode == "fwd" else (c[1], (x, c[2], dy, *c[3]))
            for nm, c in cols.items()
        }
        t = time_interleaved(calls, args.reps)
        ratios = "  ".join(
            f"{t['dense'] / t[nm]:>{max(len(nm), 6)}.2f}" if nm in t
            else f"{'n/a' if nm in skipped else 'failed':>{max(len(nm), 6)}}" for nm in names)
        out.append(
            f"{b:>4} {density:>5.2f} {mask_np.mean():>6.3f} {budget.max_per_col:>3} "
            f"{mode:>7} {t['dense'] * 1e3:>9.1f}  {ratios}"
        )
        print(out[-1], flush=True)
    return out, any(nm not in cols and nm not in skipped for nm in names)


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
        help="comma list from masked,gemm_T,xla,xla_frozen,pallas_gpu,pallas_tpu,reference "
        "and compact-BACKEND (compact-xla_frozen too); default: masked, gemm_T, the "
        "platform's backends, xla_frozen and their compact columns",
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

    platform_backends = list(kernels.available_backends()[:-1])
    names = (
        args.backends.split(",")
        if args.backends
        else ["masked", "gemm_T", *platform_backends, "xla_frozen",
              *[f"compact-{nm}" for nm in platform_backends], "compact-xla_frozen"]
    )
    header = [
        "block_sparse_matmul benchmark: speedup = dense jnp.dot time / time (higher is "
        "better), medians of %d interleaved runs after warm-up" % args.reps,
        machine_description(),
        f"shape x[M={args.m}, K={args.k}] @ w[K, N={args.n}], dtype {args.dtype}; "
        f"masks column-balanced; traced backends build metadata inside jit from a traced "
        f"mask with budget block_budget(K, N, B, density) (compact: the mask's count)",
        f"{'B':>4} {'dens':>5} {'actual':>6} {'T':>3} {'mode':>7} {'dense_ms':>9}  "
        + "  ".join(f"{nm:>{max(len(nm), 6)}}" for nm in names),
    ]
    print("\n".join(header), flush=True)
    rng = np.random.default_rng(args.seed)
    rows, failed = [], False
    t0 = time.perf_counter()
    for b in [int(v) for v in args.block_sizes.split(",")]:
        for d in [float(v) for v in args.densities.split(",")]:
            out, bad = run_config(args, b, d, names, rng)
            rows, failed = rows + out, failed or bad
    footer = f"total wall time {time.perf_counter() - t0:.0f} s"
    print(footer)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows + [footer]) + "\n")
    if failed:
        sys.exit("block_sparse_matmul: a column failed (see 'failed' above and stderr).")


if __name__ == "__main__":
    main()
