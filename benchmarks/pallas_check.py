"""Check: the Pallas GPU kernels against their dense masked oracles, values and gradients.

Run from the repository root (``benchmarks/gpu_suite.sh`` runs it first on a GPU)::

    python benchmarks/pallas_check.py --out benchmarks/results/pallas_check.md   # GPU
    python benchmarks/pallas_check.py --smoke                                    # CPU, < 1 min

Block-sparse matmul: ``block_sparse_matmul(x, w, meta, backend=...)`` against the oracle
``x @ (w * expand(mask))`` (``kernels.reference_matmul`` under ordinary autodiff, fp32 inputs
holding the same values, ``highest`` matmul precision): the forward ``y``, ``dX`` and ``dW``
of one ``jax.vjp``, plus ``dW`` outside the mask, which must be exactly zero. Shapes (GPU),
each with ``column_topk_block_mask`` masks at densities 0.25 and 0.125 (budget
``block_budget``) and one unbalanced mask (column counts from 0 to Kb/2, an empty block
column and an empty block row, tightest budget), in fp32 and bf16:

    mid    M=2048  K=1024 N=4096 B=64
    odd    M=1000  K=832  N=1472 B=64    Kb=13, Nb=23 (not powers of two), M not a tile multiple
    big    M=16384 K=4096 N=4096 B=128   the benchmark shape, run last (a timeout keeps the
                                         report of the checks that finished)

Compact weights (kernels/bsmm/compact.py): ``compact_matmul(x, blocks, kidx, backend=...)``
with T distinct K-blocks per column in random order against the same oracle on the
densified weight, its dW gathered to the compact ``[Nb, T, B, B]`` layout: ``y``, ``dX``,
``dW``, in fp32 and bf16, on mid (T=4 of 16), odd (T=2 of 13) and, just before the dense
big, big (T=8 of 32: density 0.25).

Block-sparse attention: ``block_sparse_attention(..., backend=...)`` against
``reference_attention`` (out, dQ, dK, dV) on MST's patterns (L 2048 and 4096, head dims 64
and 128) and a band whose first query sees no key.

Errors are ``max |got - ref|`` and that over ``max |ref|`` (the output scale); a check passes
when the relative error is at most its tolerance: bf16 2e-2 (rounding of bf16 outputs, fp32
accumulation), fp32 5e-3 on GPU (Triton multiplies fp32 in TF32 at default precision, about
4e-4 expected at K=4096) and 1e-4 elsewhere. Structural bugs (a skipped or misplaced block)
give errors of order 1. Each check prints one line; ``--out`` writes them as a markdown
table with the device, jax version and date. Exit status 1 if any check fails or raises.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from benchmarks._check import Check, compare, guarded, markdown, tolerance  # noqa: E402,F401
from sparse_gpt.model.attention import Pattern  # noqa: E402

_F32 = jnp.float32


class MatmulCase(NamedTuple):
    """One matmul shape: x ``[m, k]`` @ W ``[k, n]`` in blocks of ``b``."""

    name: str
    m: int
    k: int
    n: int
    b: int


class CompactCase(NamedTuple):
    """One compact-weight shape: x ``[m, k]`` @ W ``[k, n]`` held as ``[n/b, t, b, b]`` blocks
    (``t`` live blocks per output block column, slots unsorted)."""

    name: str
    m: int
    k: int
    n: int
    b: int
    t: int


class AttentionCase(NamedTuple):
    """One attention problem: q, k, v ``[batch, seq_len, heads, head_dim]``, blocks of ``b``."""

    name: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    b: int
    mask_fn: object


@dataclasses.dataclass(frozen=True)
class Band:
    """Keys with ``lo <= q - k < hi``: with lo = 1 query 0 sees no key (its output is zero)."""

    lo: int
    hi: int

    def __call__(self, q_pos, k_pos):
        return (q_pos - k_pos >= self.lo) & (q_pos - k_pos < self.hi)


# Cheap cases first: a timeout still leaves the report of those that finished.
CASES = (
    MatmulCase("mid", 2048, 1024, 4096, 64),
    MatmulCase("odd", 1000, 832, 1472, 64),
    CompactCase("mid", 2048, 1024, 4096, 64, 4),
    CompactCase("odd", 1000, 832, 1472, 64, 2),
    AttentionCase("local_strided", 2, 2048, 4, 64, 64, Pattern("local_strided", 128, 256)),
    AttentionCase("fixed", 1, 4096, 2, 128, 128, Pattern("fixed", stride=512, summary=32)),
    AttentionCase("band", 2, 1024, 2, 64, 64, Band(1, 200)),
    CompactCase("big", 16384, 4096, 4096, 128, 8),
    MatmulCase("big", 16384, 4096, 4096, 128),
)
SMOKE_CASES = (
    MatmulCase("toy", 64, 128, 128, 16),
    MatmulCase("odd", 40, 96, 160, 32),
    CompactCase("toy", 64, 128, 128, 16, 8),
    CompactCase("odd", 40, 96, 160, 32, 1),
    AttentionCase("band", 1, 64, 2, 16, 16, Band(1, 20)),
)
DENSITIES = (0.25, 0.125)


def matmul_masks(case: MatmulCase, seed: int = 0) -> dict[str, np.ndarray]:
    """Block masks ``[Kb, Nb]``: column-top-k at ``DENSITIES``, and one unbalanced mask.

    The top-k masks keep ``block_budget(K, N, B, d).max_per_col`` blocks of random score in
    every column. The unbalanced one has expected column counts from 0 to Kb/2 and block
    column 1 and block row 1 empty.
    """
    kb, nb = case.k // case.b, case.n // case.b
    rng = np.random.default_rng(seed)
    out = {}
    for d in DENSITIES:
        per_col = kernels.block_budget(case.k, case.n, case.b, d).max_per_col
        scores = jnp.asarray(rng.random((kb, nb)))
        out[f"d{d}"] = np.asarray(kernels.column_topk_block_mask(scores, per_col))
    p_Nb = np.linspace(0.0, 0.5, nb)
    mask = rng.random((kb, nb)) < p_Nb[None, :]
    mask[rng.integers(kb), -1] = True  # at least one block
    mask[:, min(1, nb - 1)] = False
    mask[min(1, kb - 1), :] = False
    out["unbalanced"] = mask
    return out


@functools.partial(jax.jit, static_argnames=("b", "budget", "backend", "interpret"))
def _kernel_vjp(x, w, dy, mask_KbxNb, *, b, budget, backend, interpret):
    def f(x, w):
        meta = kernels.make_block_meta(mask_KbxNb, b, budget, block_mask=True)
        return kernels.block_sparse_matmul(x, w, meta, backend=backend, interpret=interpret)

    y, pull = jax.vjp(f, x, w)
    return (y, *pull(dy))


@functools.partial(jax.jit, static_argnames=("b",))
def _oracle_vjp(x, w, dy, mask_KbxNb, *, b):
    m_KxN = kernels.expand_block_mask(mask_KbxNb, b)
    f32 = [a.astype(_F32) for a in (x, w, dy)]
    y, pull = jax.vjp(lambda x, w: kernels.reference_matmul(x, w, m_KxN), *f32[:2])
    dx, dw = pull(f32[2])
    return y, dx, dw, m_KxN == 0


def check_matmul(case: MatmulCase, mask_KbxNb: np.ndarray, dtype, *, label: str = "",
                 backend: str = "pallas_gpu", interpret=False, budget=None,
                 tol: float | None = None, seed: int = 0) -> list[Check]:
    """y, dX, dW and dW-off-mask of ``backend`` against the dense masked oracle.

    Args:
      case: the shape.
      mask_KbxNb: numpy bool block mask.
      dtype: input dtype (fp32 or bf16).
      label: mask name in the check names.
      backend: a registered matmul backend name.
      interpret: run Pallas kernels in interpret mode.
      budget: the metadata budget; default the mask's tightest (largest column count, R = Nb).
      tol: tolerance; default ``tolerance(dtype)``.
      seed: seed of x, w, dY.

    Returns:
      Four ``Check``s.
    """
    kb, nb = case.k // case.b, case.n // case.b
    if budget is None:
        budget = kernels.BlockBudget(max(int(mask_KbxNb.sum(0).max()), 1), nb)
    tol = tolerance(dtype) if tol is None else tol
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (case.m, case.k), dtype)
    w = (jax.random.normal(kw, (case.k, case.n), _F32) / math.sqrt(case.k)).astype(dtype)
    dy = jax.random.normal(ky, (case.m, case.n), dtype)
    mask = jnp.asarray(mask_KbxNb)
    got = _kernel_vjp(x, w, dy, mask, b=case.b, budget=tuple(budget), backend=backend,
                      interpret=interpret)
    with jax.default_matmul_precision("highest"):
        *want, off_KxN = _oracle_vjp(x, w, dy, mask, b=case.b)
    shape = f"{case.m}x{case.k}x{case.n}/B{case.b}"
    name = f"bsmm/{case.name}/{label}/{mask_KbxNb.mean():.3f}"
    checks = [compare(f"{name}/{what}", shape, g, wt, tol)
              for what, g, wt in zip(("y", "dX", "dW"), got, want)]
    checks.append(compare(f"{name}/dW-off-mask", shape, jnp.where(off_KxN, got[2], 0),
                          jnp.zeros(off_KxN.shape, _F32), 0.0))
    return checks


@functools.partial(jax.jit, static_argnames=("b", "backend", "interpret"))
def _compact_vjp(x, blocks, dy, kidx, *, b, backend, interpret):
    def f(x, blocks):
        return kernels.compact_matmul(x, blocks, kidx, backend=backend, interpret=interpret)

    y, pull = jax.vjp(f, x, blocks)
    return (y, *pull(dy))


def check_compact(case: CompactCase, dtype, *, backend: str = "pallas_gpu", interpret=False,
                  tol: float | None = None, seed: int = 0) -> list[Check]:
    """y, dX and the compact dW of ``compact_matmul(backend=...)`` against the oracle.

    The slot index holds ``case.t`` distinct K-blocks per column in random order; the oracle
    is the dense masked product of the densified weight, its dW gathered to compact form.

    Args:
      case: the shape and slots per column.
      dtype: input dtype (fp32 or bf16).
      backend: a registered matmul backend name with compact products.
      interpret: run Pallas kernels in interpret mode.
      tol: tolerance; default ``tolerance(dtype)``.
      seed: seed of the index, x, the blocks and dY.

    Returns:
      Three ``Check``s.
    """
    kb, nb = case.k // case.b, case.n // case.b
    tol = tolerance(dtype) if tol is None else tol
    rng = np.random.default_rng(seed)
    kidx = jnp.asarray(np.argsort(rng.random((nb, kb)), axis=1)[:, :case.t], jnp.int32)
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (case.m, case.k), dtype)
    blocks = jax.random.normal(kw, (nb, case.t, case.b, case.b), _F32)
    blocks = (blocks / math.sqrt(case.t * case.b)).astype(dtype)
    dy = jax.random.normal(ky, (case.m, case.n), dtype)
    got = _compact_vjp(x, blocks, dy, kidx, b=case.b, backend=backend, interpret=interpret)
    w = kernels.densify_blocks(blocks, kidx, case.k)
    with jax.default_matmul_precision("highest"):
        *want, _ = _oracle_vjp(x, w, dy, kernels.index_block_mask(kidx, kb), b=case.b)
    want[2] = kernels.gather_blocks(want[2], kidx, case.b)
    shape = f"{case.m}x{case.k}x{case.n}/B{case.b}"
    name = f"compact/{case.name}/T{case.t}/{case.t / kb:.3f}"
    return [compare(f"{name}/{what}", shape, g, wt, tol)
            for what, g, wt in zip(("y", "dX", "dW"), got, want)]


@functools.partial(jax.jit, static_argnames=("mask_fn", "b", "backend", "interpret"))
def _attention_vjp(q, k, v, do, *, mask_fn, b, backend, interpret):
    f = functools.partial(kernels.block_sparse_attention, mask_fn=mask_fn, block_size=b,
                          backend=backend, interpret=interpret)
    o, pull = jax.vjp(f, q, k, v)
    return (o, *pull(do))


@jax.jit
def _attention_oracle_vjp(q, k, v, do, mask_LxL):
    f32 = [a.astype(_F32) for a in (q, k, v, do)]
    o, pull = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, mask_LxL), *f32[:3])
    return (o, *pull(f32[3]))


def check_attention(case: AttentionCase, dtype, *, backend: str = "pallas_gpu",
                    interpret=False, tol: float | None = None, seed: int = 0) -> list[Check]:
    """out, dQ, dK, dV of ``block_sparse_attention(backend=...)`` against the dense oracle.

    Args:
      case: the problem (shape, block size, pattern).
      dtype: q, k, v dtype.
      backend: a registered attention backend name.
      interpret: run Pallas kernels in interpret mode.
      tol: tolerance; default ``tolerance(dtype)``.
      seed: seed of q, k, v, dO.

    Returns:
      Four ``Check``s.
    """
    tol = tolerance(dtype) if tol is None else tol
    shape_BxLxHxD = (case.batch, case.seq_len, case.heads, case.head_dim)
    q, k, v, do = (jax.random.normal(key, shape_BxLxHxD, dtype)
                   for key in jax.random.split(jax.random.key(seed), 4))
    got = _attention_vjp(q, k, v, do, mask_fn=case.mask_fn, b=case.b, backend=backend,
                         interpret=interpret)
    mask_LxL = jnp.asarray(kernels.element_mask(case.mask_fn, case.seq_len))
    with jax.default_matmul_precision("highest"):
        want = _attention_oracle_vjp(q, k, v, do, mask_LxL)
    density = kernels.attention_meta(case.mask_fn, case.seq_len, case.b).density
    shape = "x".join(map(str, shape_BxLxHxD)) + f"/B{case.b}"
    name = f"attn/{case.name}/{density:.3f}"
    return [compare(f"{name}/{what}", shape, g, wt, tol)
            for what, g, wt in zip(("out", "dQ", "dK", "dV"), got, want)]


def run_checks(cases, dtypes, *, backend: str = "pallas_gpu",
               attention_backend: str | None = "pallas_gpu", interpret=False,
               on_progress=None) -> list[Check]:
    """Every check of ``cases``, printing each line as it finishes.

    Args:
      cases: ``MatmulCase``s, ``CompactCase``s and ``AttentionCase``s, run in this order.
      dtypes: input dtypes, each case runs in all of them.
      backend: the matmul backend checked.
      attention_backend: the attention backend checked; ``None`` skips attention cases.
      interpret: run Pallas kernels in interpret mode.
      on_progress: called with the checks so far after each group (writes the report).

    Returns:
      All checks; a check function that raises is one failed check naming the exception.
    """
    checks = []

    def emit(new):
        for c in new:
            print(c.line(), flush=True)
        checks.extend(new)
        if on_progress is not None:
            on_progress(checks)

    for case in cases:
        if isinstance(case, AttentionCase):
            if attention_backend is None:
                continue
            for dtype in dtypes:
                emit(guarded(lambda: check_attention(case, dtype, backend=attention_backend,
                                                      interpret=interpret),
                              f"attn/{case.name}", str(case.seq_len), dtype))
            continue
        if isinstance(case, CompactCase):
            for dtype in dtypes:
                emit(guarded(lambda: check_compact(case, dtype, backend=backend,
                                                   interpret=interpret),
                             f"compact/{case.name}/T{case.t}",
                             f"{case.m}x{case.k}x{case.n}", dtype))
            continue
        masks = matmul_masks(case)
        for dtype in dtypes:
            for label, mask in masks.items():
                budget = (kernels.block_budget(case.k, case.n, case.b, float(label[1:]))
                          if label.startswith("d") else None)
                emit(guarded(lambda: check_matmul(case, mask, dtype, label=label,
                                                   backend=backend, interpret=interpret,
                                                   budget=budget),
                              f"bsmm/{case.name}/{label}", f"{case.m}x{case.k}x{case.n}", dtype))
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="toy shapes in interpret mode (CPU, well under a minute)")
    p.add_argument("--interpret", action="store_true", help="run Pallas kernels interpreted")
    p.add_argument("--backend", default="pallas_gpu", help="matmul backend to check")
    p.add_argument("--attention-backend", default="pallas_gpu",
                   help="attention backend to check ('none' skips attention)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=None, help="write the markdown report to this file")
    args = p.parse_args(argv)

    interpret = args.interpret or args.smoke
    if not interpret and jax.default_backend() == "cpu" and "pallas" in args.backend:
        print(f"pallas_check: JAX runs on CPU ({jax.devices()[0]}), where Pallas kernels need "
              "interpret mode: run on a GPU, or pass --smoke / --interpret.", file=sys.stderr)
        return 2
    attention_backend = None if args.attention_backend == "none" else args.attention_backend
    mode = "interpret mode, toy shapes" if args.smoke else (
        "interpret mode" if interpret else "compiled")
    title = f"Pallas kernel check: {args.backend} / {attention_backend} ({mode})"

    def write(checks, done=False):
        if args.out:
            text = markdown(checks, title)
            with open(args.out, "w") as f:
                f.write(text if done else text + "(unfinished: more checks were to follow)\n")

    checks = run_checks(SMOKE_CASES if args.smoke else CASES,
                        [jnp.dtype(d) for d in args.dtypes.split(",")],
                        backend=args.backend, attention_backend=attention_backend,
                        interpret=interpret, on_progress=write)
    write(checks, done=True)
    n_fail = sum(not c.passed for c in checks)
    print(f"{len(checks) - n_fail} of {len(checks)} checks passed", flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
