"""Quality benchmark: dense vs static vs GMP vs SET vs RigL at equal steps.

    python benchmarks/sparsity_methods.py                      # tiny preset, CPU, ~1 hour
    python benchmarks/sparsity_methods.py --steps 300 --densities 0.25 --methods dense,rigl
    python benchmarks/sparsity_methods.py --methods rigl --variant rigl:sparsity.update_every=100

Trains the `tiny` preset on the bundled corpus once per (method, sparsity) with the same
seed, data order and number of steps, then writes a table of final validation loss and
training FLOPs (counted from the actual masks) to benchmarks/results/. Static, SET and RigL
use ERK layer densities (as in the RigL paper); GMP prunes each layer to the target on the
cubic schedule. The expected shape (RigL paper): RigL <= SET <= static in loss at equal
sparsity, RigL at 75% sparsity within a few percent of dense. The paper trains with SGD and
momentum: on `tiny` the ordering holds with ``--override train.optimizer=sgd``, while with
the default AdamW RigL comes last (benchmarks/results/sparsity_methods_tiny_1200steps_*.md).
``--variant METHOD:KEY=VALUE`` adds runs of METHOD with config overrides, as rows labelled
``METHOD [KEY=VALUE]``; ``--override KEY=VALUE`` changes every run (e.g.
``train.optimizer=sgd``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._results import save_result  # noqa: E402
from sparse_gpt import cli# noqa: E402
from sparse_gpt.training import trainer


def run(method: str, density: float, args, label: str | None = None,
        extra: dict | None = None) -> dict:
    overrides = {"train.num_steps": args.steps, "train.progress_bar": False,
                 "train.eval_every": args.steps, "train.eval_batches": args.eval_batches,
                 "train.checkpoint_every": args.steps, "train.log_every": args.steps,
                 "sparsity.method": method}
    if method != "dense":
        overrides["sparsity.density"] = density
        overrides["sparsity.distribution"] = "uniform" if method == "gmp" else "erk"
    overrides.update(dict(o.split("=", 1) for o in args.override))
    overrides.update(extra or {})
    label = label or method
    config, _ = cli.parse_args([f"--config={cli.DEFAULT_CONFIG}:{args.preset}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()])
    workdir = os.path.join(args.workdir, re.sub(r"[^\w.=-]+", "_", f"{label}-{density}"))
    shutil.rmtree(workdir, ignore_errors=True)   # a fresh run, never a resume
    start = time.perf_counter()
    result = trainer.train(config, workdir)
    state = result["state"]
    return {"method": label, "sparsity": 0.0 if method == "dense" else 1 - density,
            "val_loss": result["val"]["loss"], "flops": float(state.flops),
            "density": result["density"], "seconds": time.perf_counter() - start}


DEFAULTS = {"preset": "tiny", "methods": "dense,static,gmp,set,rigl",
            "densities": "0.25,0.5,0.1"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=DEFAULTS["preset"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval_batches", type=int, default=32)
    p.add_argument("--methods", default=DEFAULTS["methods"])
    p.add_argument("--densities", default=DEFAULTS["densities"],
                   help="densities of sparse runs")
    p.add_argument("--variant", action="append", default=[], metavar="METHOD:KEY=VALUE[:...]",
                   help="extra runs of METHOD at every density with these config overrides, "
                        "e.g. rigl:sparsity.update_every=100 (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. train.optimizer=sgd (repeatable)")
    p.add_argument("--workdir", default="/tmp/sparse_gpt_bench_methods")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/...)")
    p.add_argument("--table_only", action="store_true",
                   help="write the table of the runs in WORKDIR/rows.jsonl, run nothing")
    args = p.parse_args(argv)
    # Finished runs are kept in WORKDIR/rows.jsonl, so an interrupted benchmark resumes where
    # it stopped; runs go density by density, so the first ones already compare all methods.
    os.makedirs(args.workdir, exist_ok=True)
    rows_path = os.path.join(args.workdir, "rows.jsonl")
    rows = []
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    methods = args.methods.split(",")
    variants = [parse_variant(v) for v in args.variant]
    plan = [("dense", 1.0, None, None)] if "dense" in methods else []
    plan += [(m, float(d), None, None) for d in args.densities.split(",") for m in methods
             if m != "dense"]
    plan += [(m, float(d), label, extra) for d in args.densities.split(",")
             for m, label, extra in variants]
    for method, density, label, extra in ([] if args.table_only else plan):
        sparsity = 0.0 if method == "dense" else 1 - density
        if any(r["method"] == (label or method) and abs(r["sparsity"] - sparsity) < 1e-9
               for r in rows):
            continue
        rows.append(run(method, density, args, label, extra))
        print(rows[-1], flush=True)
        with open(rows_path, "a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    write_table(rows, args)


def parse_variant(spec: str) -> tuple[str, str, dict]:
    """``"rigl:sparsity.update_every=100"`` -> ``("rigl", "rigl [update_every=100]", {...})``."""
    method, *items = spec.split(":")
    if not items or not all("=" in i for i in items):
        raise SystemExit(f"--variant {spec!r}: expected METHOD:KEY=VALUE[:KEY=VALUE...], e.g. "
                         "rigl:sparsity.update_every=100")
    extra = dict(i.split("=", 1) for i in items)
    short = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in extra.items())
    return method, f"{method} [{short}]", extra


def write_table(rows: list[dict], args) -> None:
    """Writes the markdown table of ``rows`` to ``args.out`` (and prints it)."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    command = " ".join(["python benchmarks/sparsity_methods.py", f"--steps {args.steps}"] + [
        f"--{k} {getattr(args, k)}" for k in ("preset", "methods", "densities")
        if getattr(args, k) != DEFAULTS[k]] + [f"--override {o}" for o in args.override] + [
        f"--variant {v}" for v in args.variant])
    lines = [f"# Sparsity methods on `{args.preset}`, {args.steps} steps, bundled corpus",
             "", f"Date: {datetime.date.today()}; machine: {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} cores, CPU; command: {command}", "",
             "| method | sparsity | val loss | vs dense | train FLOPs | FLOPs vs dense | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["method"])):
        rel = f"{r['val_loss'] / dense['val_loss'] - 1:+.1%}" if dense else "-"
        frel = f"{r['flops'] / dense['flops']:.2f}x" if dense else "-"
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['val_loss']:.4f} | {rel} | "
                     f"{r['flops']:.3e} | {frel} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    save_result(text, args.out, f"sparsity_methods_{args.preset}")


if __name__ == "__main__":
    main()
