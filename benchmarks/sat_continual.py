"""SAT vs standard continued training from a trained dense checkpoint, at equal tokens.

    python benchmarks/sat_continual.py                          # tiny, CPU, ~30 min
    python benchmarks/sat_continual.py --steps 100 --base_steps 100 --rates 0.5

1. Trains (or reuses) a dense `tiny` base model for ``--base_steps`` in WORKDIR/base.
2. Continues it for ``--steps`` steps from its params (``train.init_from``), once with standard
   dense training and once per SAT setting (omission rate, ladder schedule, importance
   metric), on the same data order, and reports the validation loss of each.
3. Measures the step time of every omission rate the runs use, in this one process, with the
   compiled steps interleaved round by round (medians of ``--reps``), and reports each SAT
   run's throughput as tokens / sum of its steps' times, relative to dense. The wall-clock of
   the training runs is printed too, but on a shared machine only the interleaved ratio is a
   measurement.

The issue's target: SAT within 1% of standard continued training's loss at >= 1.3x tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks._results import save_result  # noqa: E402
from sparse_gpt import cli# noqa: E402
from sparse_gpt import plan as plan_lib
from sparse_gpt.sparsity import sat
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer


def _config(args, steps: int, overrides: dict):
    base = {"train.num_steps": steps, "train.progress_bar": False,
            "train.eval_every": steps, "train.eval_batches": args.eval_batches,
            "train.checkpoint_every": steps, "train.log_every": max(steps // 10, 1)}
    config, _ = cli.parse_args([f"--config={cli.DEFAULT_CONFIG}:{args.preset}"] + [
        f"--config.{k}={v}" for k, v in {**base, **overrides}.items()])
    return config


def _run(args, name: str, steps: int, overrides: dict) -> dict:
    """Trains one arm in WORKDIR/name (reused if it already finished)."""
    workdir = os.path.join(args.workdir, name)
    done = os.path.join(workdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    config = _config(args, steps, overrides)
    start = time.perf_counter()
    result = trainer.train(config, workdir)
    row = {"name": name, "val_loss": result["val"]["loss"],
           "flops": float(result["state"].flops), "seconds": time.perf_counter() - start}
    with open(done, "w") as f:
        json.dump(row, f)
    return row


def step_times(args, rates: list[float]) -> dict[float, float]:
    """Median seconds per train step at each omission rate, compiled steps interleaved."""
    config = _config(args, 10, {})
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    state = train_lib.init_state(plan_lib.from_config(config), model, tx, method, jax.random.key(0))
    b, seq = int(config.train.batch_size), int(config.data.seq_len)
    tokens = jax.random.randint(jax.random.key(1), (b, seq + 1), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": jnp.ones((b, seq), jnp.float32)}
    steps = {}
    for rate in rates:
        plan = None
        if rate > 0:
            config.sat.update(omission_rate=rate, schedule="constant")
            plan = plan_lib.from_config(config).sat
        steps[rate] = jax.jit(train_lib.make_train_step(model, tx, method, sat=plan))
        jax.block_until_ready(steps[rate](state, batch))          # compile + warm up
    times = {r: [] for r in rates}
    for _ in range(args.reps):
        for rate, fn in steps.items():
            t = time.perf_counter()
            for _ in range(args.inner):
                jax.block_until_ready(fn(state, batch))
            times[rate].append((time.perf_counter() - t) / args.inner)
    return {r: statistics.median(v) for r, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--base_steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300, help="continued-training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="continued-training peak lr")
    p.add_argument("--rates", default="0.5,0.3", help="SAT omission rates (ladder runs)")
    p.add_argument("--metric", default="magnitude")
    p.add_argument("--extra_metrics", default="wanda,uniform",
                   help="metrics also run at the first rate")
    p.add_argument("--eval_batches", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/sparse_gpt_bench_sat")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)

    base = _run(args, "base", args.base_steps, {})
    cont = {"train.init_from": os.path.join(args.workdir, "base"), "train.lr": args.lr,
            "train.warmup_steps": max(args.steps // 20, 1)}
    rows = [_run(args, "standard", args.steps, cont)]
    rates = [float(r) for r in args.rates.split(",") if r]
    arms = [(r, args.metric) for r in rates]
    arms += [(rates[0], m) for m in args.extra_metrics.split(",") if m and m != args.metric]
    plans = {}
    for rate, metric in arms:
        name = f"sat-{rate}-{metric}"
        over = {**cont, "sat.omission_rate": rate, "sat.metric": metric}
        plans[name] = plan_lib.from_config(_config(args, args.steps, over)).sat
        rows.append(_run(args, name, args.steps, over))

    used = sorted({r for plan in plans.values() for r in plan.rates} | {0.0})
    times = step_times(args, used)
    dense_time = args.steps * times[0.0]
    for row in rows:
        plan = plans.get(row["name"])
        t = dense_time if plan is None else sum(
            times[plan.rates[int(plan.branch(s))]] for s in range(args.steps))
        row["speedup"] = dense_time / t
    write(args, base, rows, times, plans)


def write(args, base, rows, times, plans) -> None:
    std = rows[0]
    lines = [f"# SAT vs standard continued training on `{args.preset}`", "",
             f"Date: {datetime.date.today()}; machine: {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} cores, CPU (jax {jax.__version__}, "
             f"{jax.devices()[0].platform}); command: python benchmarks/sat_continual.py "
             f"--base_steps {args.base_steps} --steps {args.steps} --rates {args.rates}", "",
             f"Base: dense, {args.base_steps} steps, val loss {base['val_loss']:.4f}. "
             f"Continued: {args.steps} steps from its params, peak lr {args.lr}, same data.", "",
             "| run | omission schedule | val loss | vs standard | train FLOPs | "
             "tokens/s vs standard | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = plans.get(r["name"])
        sched = "dense" if plan is None else " / ".join(
            f"{rate:g}" for rate in plan.rates) + f" (stairs at {list(plan.boundaries)})"
        lines.append(f"| {r['name']} | {sched} | {r['val_loss']:.4f} | "
                     f"{r['val_loss'] / std['val_loss'] - 1:+.2%} | {r['flops']:.3e} "
                     f"({r['flops'] / std['flops']:.2f}x) | {r['speedup']:.2f}x | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Step time per omission rate (median of interleaved rounds, this process):",
              ""] + [f"- rate {r:g}: {t * 1e3:.1f} ms/step ({times[0.0] / t:.2f}x dense)"
                     for r, t in sorted(times.items())]
    text = "\n".join(lines) + "\n"
    save_result(text, args.out, f"sat_continual_{args.preset}")


if __name__ == "__main__":
    main()
