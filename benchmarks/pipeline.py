"""Benchmark: pipeline bubble and step time, measured against theory (GPipe and circular).

Run from the repository root (it sets up 8 fake CPU devices itself when on CPU)::

    python benchmarks/pipeline.py                        # writes benchmarks/results/...
    python benchmarks/pipeline.py --microbatches 4,8 --repeats 1,2 --reps 3   # quicker

Each row times one forward+backward step (``jax.value_and_grad`` of the loss, jitted) of an
S-stage pipeline with M microbatches of a fixed size and R layer repeats per stage (R = 1 is
GPipe), and two sequential baselines on one device: ``ref``, the plain model on the whole
batch, and ``ref/mb``, the same model applied microbatch by microbatch (``lax.map``), which
does the pipeline's work at the pipeline's matmul sizes. All
functions of one M are timed in the same interleaved rounds after a warm-up; the bubble uses
the fastest of ``--reps`` rounds (other load on a shared machine only ever adds time), and
the median is shown beside it.

How the bubble is measured. Every stage runs all ``T = R M + S - 1`` ticks (idle ticks
compute on garbage, as in any SPMD pipeline), so at a fixed microbatch size a step should
cost ``a + b T``: ``b`` the time of one tick (all stages' work and the ppermute), ``a`` what
runs outside the pipeline (embedding, head, loss, optimizer-free here). ``b`` and ``a`` are
fitted per schedule over the M values (least squares on the fastest times), and

    measured bubble = (S - 1) b / step time        vs theory (S - 1) / (R M + S - 1),

the share of the step spent in fill/drain ticks. It differs from theory by ``a`` (pulls it
down) and by tick costs that are not constant (pushes either way). A check that does not
depend on the fit: at the same M (same data, same matmul sizes) a schedule's step costs
``T J`` layer-ticks (J = N / (S R) layers per tick), so theory predicts
``step / step_gpipe = ((R M + S - 1) / R) / (M + S - 1)``; ``vs gpipe`` and ``theory`` show
measured and predicted ratios. ``ref``, ``ref/mb`` and
``pipe/ref_mb`` show the step time against the sequential model: ``ref/mb`` is the plain
model applied microbatch by microbatch (``lax.map``) on one device, the pipeline's work at
its matmul sizes. On fake CPU devices the S "devices" share 2 cores (a device running small
ops uses about one), so ``pipe/ref_mb`` is neither S-way parallel nor fully serial; on real
accelerators the ideal pipelined step is ``ref_mb / S`` and the bubble is idle time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--no-fake-devices" not in sys.argv:  # must precede the first jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks._results import save_result  # noqa: E402
from benchmarks.block_sparse_matmul import machine_description  # noqa: E402
from sparse_gpt.model import gpt as model_lib# noqa: E402
from sparse_gpt.parallel import pipeline# noqa: E402
from sparse_gpt.parallel import sharding
from sparse_gpt.training import step as train_lib
from sparse_gpt import config as config_lib  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", default="4,8,16", help="comma-separated M values")
    p.add_argument("--repeats", default="1,2,4", help="R values; 1 = GPipe, >1 = circular")
    p.add_argument("--microbatch_size", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--n_layers", type=int, default=16)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="", help="results file (default benchmarks/results/"
                   "pipeline_<platform>_<date>.txt; '-' for stdout only)")
    p.add_argument("--no-fake-devices", action="store_true",
                   help="do not force 8 CPU devices (use the real accelerators)")
    return p.parse_args(argv)


def timed(fns: dict, args, reps: int) -> dict[str, list[float]]:
    """Times every function once per round, ``reps`` rounds, after one warm-up call each."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))      # compile + warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - start)
    return times


def run(args) -> list[str]:
    s = args.stages
    cfg = model_lib.ModelConfig(vocab_size=256, n_layers=args.n_layers, d_model=args.d_model,
                                n_heads=4, max_len=args.seq_len)
    model = model_lib.GPT(cfg)
    devices = jax.devices()[:s]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, stage=s)), devices)
    ref_mesh = sharding.make_mesh(ml_collections.ConfigDict(
        dict(data=1, fsdp=1, tensor=1, stage=1)), devices[:1])
    rules = sharding.parse_rules(config_lib.base_config().mesh.rules)
    vg = jax.value_and_grad(train_lib.loss_fn)
    ref_step = sharding.jit(lambda p, m, b: vg(p, m, b, model), ref_mesh, rules,
                            in_shardings=NamedSharding(ref_mesh, P()))

    def microbatched_loss(params, masks, batch, m):
        split = lambda a: a.reshape(m, -1, *a.shape[1:])  # noqa: E731
        return jnp.mean(jax.lax.map(lambda mb: train_lib.loss_fn(params, masks, mb, model),
                                    jax.tree.map(split, batch)))
    rows = []
    for m in map(int, args.microbatches.split(",")):
        batch_size = m * args.microbatch_size
        tokens = jax.random.randint(jax.random.key(1), (batch_size, args.seq_len), 0, 256)
        batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1),
                 "weights": jnp.ones(tokens.shape)}
        variables = jax.jit(model.init)(jax.random.key(0), tokens[:1])
        ref_mb_step = sharding.jit(
            jax.value_and_grad(lambda p, mk, b, m=m: microbatched_loss(p, mk, b, m)),
            ref_mesh, rules, in_shardings=NamedSharding(ref_mesh, P()))
        fns, pcfgs = {"ref": ref_step, "ref_mb": ref_mb_step}, {}
        for r in map(int, args.repeats.split(",")):
            pcfg = pipeline.PipelineConfig(s, m, "gpipe" if r == 1 else "circular", r)
            try:
                pcfg.validate(cfg.n_layers, batch_size)
            except ValueError as e:
                print(f"skipped R={r} M={m}: {e}")
                continue
            pcfgs[r] = pcfg
            fns[r] = sharding.jit(
                lambda p, mk, b, pcfg=pcfg: vg(p, mk, b, model, pipeline.make_forward(mesh, pcfg)),
                mesh, rules, in_shardings=NamedSharding(mesh, P()))
        times = timed(fns, (variables["params"], variables["masks"], batch), args.reps)
        for r, pcfg in pcfgs.items():
            rows.append(dict(pcfg=pcfg, ref=times["ref"], ref_mb=times["ref_mb"], pipe=times[r]))
            print(pcfg, f"{min(times[r]) * 1e3:.1f} ms", flush=True)
    return report(args, cfg, rows)


def fit_ticks(rows) -> tuple[float, float]:
    """Least-squares ``time = a + b * ticks`` over one schedule's rows (fastest times)."""
    ticks = np.array([row["pcfg"].num_ticks for row in rows], float)
    times = np.array([min(row["pipe"]) for row in rows])
    if len(rows) < 2:
        return 0.0, float(times[0] / ticks[0])
    b, a = np.polyfit(ticks, times, 1)
    return float(a), float(b)


def report(args, cfg, rows) -> list[str]:
    s = args.stages
    ms = lambda t: f"{min(t) * 1e3:>7.1f} ({statistics.median(t) * 1e3:>5.0f})"  # noqa: E731
    lines = [f"machine: {machine_description()} (fake CPU devices; no GPU in this session)",
             f"model: {cfg.n_layers} layers x d_model {cfg.d_model}, seq {args.seq_len}, "
             f"vocab {cfg.vocab_size}, fp32; {s} stages on {s} fake devices; microbatch = "
             f"{args.microbatch_size} sequences; step = value_and_grad of the loss; times in "
             f"ms, best (median) of {args.reps} interleaved rounds",
             "",
             f"{'schedule':>9} {'R':>2} {'M':>3} {'T':>3} {'ref':>15} {'ref/mb':>15} "
             f"{'pipe':>15} {'pipe/ref_mb':>11} {'bubble':>7} {'theory':>7} "
             f"{'vs gpipe':>8} {'theory':>7}"]
    fits = {}
    for r in sorted({row["pcfg"].repeats for row in rows}):
        fits[r] = fit_ticks([row for row in rows if row["pcfg"].repeats == r])
    gpipe = {row["pcfg"].num_microbatches: min(row["pipe"]) for row in rows
             if row["pcfg"].repeats == 1}
    for row in sorted(rows, key=lambda row: (row["pcfg"].repeats, row["pcfg"].num_microbatches)):
        pcfg, pipe = row["pcfg"], min(row["pipe"])
        _, b = fits[pcfg.repeats]
        m = pcfg.num_microbatches
        ratio = f"{pipe / gpipe[m]:>8.2f}" if m in gpipe else f"{'-':>8}"
        predicted = (pcfg.num_ticks / pcfg.repeats) / (m + s - 1)
        lines.append(
            f"{pcfg.schedule:>9} {pcfg.repeats:>2} {pcfg.num_microbatches:>3} "
            f"{pcfg.num_ticks:>3} {ms(row['ref'])} {ms(row['ref_mb'])} {ms(row['pipe'])} "
            f"{pipe / min(row['ref_mb']):>11.2f} {(s - 1) * b / pipe:>7.3f} "
            f"{pcfg.bubble_fraction:>7.3f} {ratio} {predicted:>7.2f}")
    lines += ["", "per-schedule fit  step = a + b * T:"]
    for r, (a, b) in fits.items():
        lines.append(f"  R={r}: a = {a * 1e3:7.1f} ms outside the ticks, b = {b * 1e3:6.2f} ms "
                     f"per tick ({b * 1e3 / (cfg.n_layers // (s * r)):.2f} ms per layer-tick)")
    return lines


def main(argv):
    args = parse(argv)
    lines = run(args)
    text = "\n".join(lines) + "\n"
    save_result(text, args.out, f"pipeline_{jax.default_backend()}", "txt")


if __name__ == "__main__":
    main(sys.argv[1:])
