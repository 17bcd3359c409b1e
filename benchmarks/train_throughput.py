"""Training tokens/s of ``python train.py`` (the default) against its dense baseline.

Run from the repository root::

    python benchmarks/train_throughput.py                    # 3 rounds of 150 steps per arm
    python benchmarks/train_throughput.py --rounds 1 --steps 30 --out -     # a quick look

Each arm is ``train.py`` itself, run as a subprocess in a fresh workdir with the arm's
arguments (no evaluation, checkpoint or sample inside the timed steps):

    default         no --config: sparse_pretrain.py:tiny,75, the README's first command
    dense           --config sparse_gpt/config.py:tiny, the dense baseline the README names
    default-layout  the default with --config.model.sparse_storage=dense ([L, K, N] weights)

Runs alternate (default, dense, default-layout, default, ...) so a slow spell of the shared
machine hits every arm. Per run, the tokens/s of every logged interval after the first (it
holds the compilation) is kept; the table gives each arm's median over all of them, its
ratio to dense, and beside it the FLOP limit (dense / arm training FLOPs per step from the
runs' own ``flops`` counter, ``sparse_gpt/flops.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import save_result  # noqa: E402

ARMS = {
    "default": [],
    "dense": ["--config", "sparse_gpt/config.py:tiny"],
    "default-layout": ["--config.model.sparse_storage=dense"],
}


def run_once(args: list[str], steps: int, log_every: int) -> tuple[list[float], float]:
    """One ``train.py`` run: (tokens/s of each logged interval after the first, FLOPs/step)."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, "--workdir", workdir,
               f"--config.train.num_steps={steps}", f"--config.train.log_every={log_every}",
               f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
               "--config.train.sample_tokens=0", "--config.train.progress_bar=false",
               "--config.train.eval_batches=1"]
        env = {**os.environ, "SPARSE_GPT_JAX_CACHE": os.path.join(workdir, "jax_cache")}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    train = [r for r in rows if "tokens_per_sec" in r]
    flops = [r["flops"] for r in train]
    per_step = (flops[-1] - flops[0]) / (train[-1]["step"] - train[0]["step"])
    return [r["tokens_per_sec"] for r in train[1:]], per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150, help="steps per run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.steps < 2 * a.log_every:
        raise SystemExit(f"--steps {a.steps} must be at least 2 x --log-every ({a.log_every}): "
                         "the first logged interval holds the compilation and is dropped.")
    arms = a.arms.split(",")
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    toks = {arm: [] for arm in arms}
    flops = {}
    for r in range(a.rounds):
        for arm in arms:
            t, flops[arm] = run_once(ARMS[arm], a.steps, a.log_every)
            toks[arm] += t
            print(f"round {r + 1} {arm}: median {statistics.median(t):.0f} tokens/s",
                  flush=True)
    med = {arm: statistics.median(v) for arm, v in toks.items()}
    ref = "dense" if "dense" in med else arms[0]
    lines = [f"# Training throughput of train.py: {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{datetime.date.today().isoformat()}\n",
             f"Command: python benchmarks/train_throughput.py "
             + " ".join(argv if argv is not None else sys.argv[1:]),
             f"Rounds: {a.rounds} x {a.steps} steps per arm, alternating; medians of the "
             f"{a.log_every}-step intervals after each run's first.\n",
             "| arm | tokens/s | vs dense | FLOP limit |", "|---|---|---|---|"]
    for arm in arms:
        lines.append(f"| {arm} | {med[arm]:.0f} | {med[arm] / med[ref]:.2f}x | "
                     f"{flops[ref] / flops[arm]:.2f}x |")
    save_result("\n".join(lines) + "\n", a.out, "train_throughput")


if __name__ == "__main__":
    main()
