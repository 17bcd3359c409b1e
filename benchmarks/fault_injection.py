"""Fault injection: SIGKILL and SIGTERM at random moments, each run resumed to the end.

Trains one uninterrupted reference run with ``train.py``, then ``--runs`` runs of the same
command, each hit by 1..``--max_faults`` faults (SIGKILL or SIGTERM, chosen at random, at a
random moment: a quarter at a random time of start-up -- imports, data, compilation,
restore --, the others 0-0.15 s after a random step of the steps left, which lands inside a
checkpoint save when that step writes one) and re-run after each until it finishes. Counts:

* runs that lost more than one checkpoint interval: for each fault, the steps between the
  last step the killed process logged (``log_every=1``) and the newest finished checkpoint
  left on disk, which the next launch resumes from (checked against its "resuming ... from
  step N" line, when it got that far); must be 0;
* SIGTERM faults caught by the run (exit 75) that lost any step: must be 0;
* runs whose final parameters, optimizer state and masks differ from the uninterrupted
  run's (exact equality), and runs whose metrics.jsonl (every column but tokens_per_sec)
  differs: must be 0;
* launches that failed otherwise (an exit status not explained by the fault).

    python benchmarks/fault_injection.py --runs 20 --seed 0

A dynamic sparsity method (SET, mask updates every 10 steps) so masks, optimizer moments and
the data position all have to survive. Takes about 15 s per run on a 2-core VM.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2, "model.max_len": 32,
         "data.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 10,
         "train.log_every": 1, "train.eval_every": 50, "train.eval_batches": 2,
         "train.sample_tokens": 8, "train.progress_bar": "false", "train.keep_checkpoints": 3,
         "sparsity.method": "set", "sparsity.density": 0.5, "sparsity.update_every": 10}


JITTER_S = 0.15   # fault offset after the target step's metrics row (a save is ~0.1 s here)


def write_corpus(folder: str) -> str:
    """The first 6 documents of the bundled corpus (10 KB each) as .txt files."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(ROOT, "sparse_gpt", "corpus", "shakespeare.jsonl.gz")) as f:
        docs = [json.loads(line)["text"] for line in f][:6]
    for i, doc in enumerate(docs):
        with open(os.path.join(folder, f"doc{i}.txt"), "w") as f:
            f.write(doc[:10_000])
    return folder


def last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    step = 0
    with open(path) as f:
        for line in f:
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass   # a torn last line
    return step


def trained(workdir: str, proc, restored: int) -> int:
    """The last step this launch logged; ``restored`` while the file still holds only the
    rows of earlier launches (which this launch truncates to its restored step on start)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path) or os.path.getmtime(path) < proc.started:
        return restored
    return max(restored, last_logged_step(workdir))


def newest_checkpoint(workdir: str) -> int:
    """The newest finished step folder (orbax renames a save's temporary folder when done)."""
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=0)


class Launcher:
    def __init__(self, args_for, env, logs: str):
        self.args_for, self.env, self.logs, self.count = args_for, env, logs, 0

    def start(self, workdir: str):
        self.count += 1
        out = open(os.path.join(self.logs, f"launch{self.count}.out"), "w")
        err_path = os.path.join(self.logs, f"launch{self.count}.err")
        err = open(err_path, "w")
        proc = subprocess.Popen([sys.executable, "train.py", *self.args_for(workdir)], cwd=ROOT,
                                env=self.env, stdout=out, stderr=err)
        proc.err_path = err_path
        proc.started = time.time()
        return proc


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def wait_until(pred, timeout: float, proc=None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def fault_run(launcher: Launcher, workdir: str, rng: random.Random, max_faults: int,
              ref: dict, num_steps: int) -> dict:
    """One run: its faults, then a last launch to the end. Returns the run's record."""
    faults, unexpected, n_faults = [], [], rng.randint(1, max_faults)
    for i in range(n_faults + 1):
        restored_guess = newest_checkpoint(workdir)
        proc = launcher.start(workdir)
        if i > 0:
            faults[-1]["launch"] = proc
        if i == n_faults:   # the last launch runs to the end
            rc = proc.wait(timeout=900)
            if rc != 0:
                unexpected.append(f"final launch exit {rc}: {read(proc.err_path)[-300:]}")
            break
        kind = rng.choice(["SIGKILL", "SIGTERM"])
        if rng.random() < 0.25:   # start-up: imports, data, compilation, restore
            wait_until(lambda: False, rng.uniform(0.0, ref["startup_s"]), proc)
        else:   # training: a random step of what is left, then a random offset (which
            # lands in a save when that step writes one: a save takes several steps' time)
            target = rng.randint(min(restored_guess + 1, num_steps), num_steps)
            wait_until(lambda: last_logged_step(workdir) >= target and os.path.getmtime(
                os.path.join(workdir, "metrics.jsonl")) >= proc.started, 600, proc)
            wait_until(lambda: False, rng.uniform(0.0, JITTER_S), proc)
        at = time.time() - proc.started
        phase = "training" if trained(workdir, proc, restored_guess) > restored_guess \
            else "start-up"
        if proc.poll() is not None:   # finished before the fault landed
            if proc.returncode != 0:
                unexpected.append(f"launch exit {proc.returncode} before the fault")
            faults.append({"kind": "none (finished first)", "phase": phase, "at": at,
                           "reached": trained(workdir, proc, restored_guess),
                           "rc": proc.returncode})
            break
        proc.send_signal(getattr(signal, kind))
        rc = proc.wait(timeout=600)
        reached = trained(workdir, proc, restored_guess)
        expected = {"SIGKILL": (-9,), "SIGTERM": (75, -15, 0)}[kind]
        if rc not in expected:
            unexpected.append(f"{kind}: exit {rc}: {read(proc.err_path)[-300:]}")
        # What the next launch restores: orbax renames a save's temporary folder when done.
        faults.append({"kind": kind, "phase": phase, "at": at, "reached": reached, "rc": rc,
                       "resumed": newest_checkpoint(workdir)})
        if rc == 0:   # the signal came after the last step: the run is complete
            break
    for fault in faults:   # cross-check: the step the next launch said it resumed from
        launch = fault.pop("launch", None)
        if launch is None:
            continue
        fault["lost"] = max(0, fault["reached"] - fault["resumed"])
        text = read(launch.err_path)
        match = re.search(r"resuming .* from step (\d+)", text)
        if match and int(match.group(1)) != fault["resumed"]:
            unexpected.append(f"next launch resumed from {match.group(1)}, the newest "
                              f"checkpoint after the fault was {fault['resumed']}")
        elif not match and fault["resumed"] and (launch.returncode in (0, 75)):
            unexpected.append(f"next launch trained without resuming from {fault['resumed']}")
    return {"faults": faults, "unexpected": unexpected}


def compare(workdir: str, ref_state, ref_rows) -> tuple[bool, bool]:
    """(parameters equal, metrics equal) of a finished run and the reference."""
    import jax
    import numpy as np
    from sparse_gpt.training import metrics, trainer
    *_, state = trainer.load_run(workdir)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves((ref_state.params, ref_state.opt_state, ref_state.masks)),
        jax.tree.leaves((state.params, state.opt_state, state.masks))))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_sec"}  # noqa: E731
                          for r in rows]
    return same, strip(metrics.load_metrics(workdir)) == strip(ref_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--max_faults", type=int, default=3, help="faults per run: 1..this")
    p.add_argument("--num_steps", type=int, default=200)
    p.add_argument("--checkpoint_every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default="2-core CPU VM")
    p.add_argument("--keep", default="", help="keep the run folders here (default: deleted)")
    p.add_argument("--out", default="", help="result path ('-': print only)")
    args = p.parse_args(argv)
    tmp = args.keep or tempfile.mkdtemp(prefix="fault_injection_")
    os.makedirs(tmp, exist_ok=True)
    corpus = write_corpus(os.path.join(tmp, "corpus"))
    values = {**SMALL, "train.num_steps": args.num_steps,
              "train.checkpoint_every": args.checkpoint_every, "data.path": corpus,
              "data.data_dir": os.path.join(tmp, "tfds")}
    overrides = [f"--config.{k}={v}" for k, v in values.items()]

    def args_for(workdir):
        return ["--config", "sparse_gpt/config.py:tiny", f"--workdir={workdir}", *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               SPARSE_GPT_JAX_CACHE=os.path.join(tmp, "jax_cache"))
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs, exist_ok=True)
    launcher = Launcher(args_for, env, logs)
    begin = time.time()

    # The reference, run twice: the first fills the data and compilation caches, the
    # second times start-up and training as every later launch sees them.
    ref = {}
    for name in ("warm-up", "reference"):
        workdir = os.path.join(tmp, name)
        proc = launcher.start(workdir)
        assert wait_until(lambda: last_logged_step(workdir) > 0, 900, proc), read(proc.err_path)
        first_row = time.time()
        wait_until(lambda: last_logged_step(workdir) >= args.num_steps, 900, proc)
        ref = {"startup_s": first_row - proc.started, "train_s": time.time() - first_row}
        assert proc.wait(timeout=900) == 0, read(proc.err_path)
    from sparse_gpt.training import metrics, trainer
    *_, ref_state = trainer.load_run(os.path.join(tmp, "reference"))
    ref_rows = metrics.load_metrics(os.path.join(tmp, "reference"))

    rng = random.Random(args.seed)
    records = []
    for i in range(args.runs):
        workdir = os.path.join(tmp, f"run{i}")
        record = fault_run(launcher, workdir, rng, args.max_faults, ref, args.num_steps)
        record["same_params"], record["same_metrics"] = (
            compare(workdir, ref_state, ref_rows) if not record["unexpected"] else (False, False))
        records.append(record)
        summary = ", ".join(
            f"{f['kind']}@{f['phase']} {f['at']:.1f}s: reached {f['reached']}, resumed "
            f"{f.get('resumed', '-')}, rc {f['rc']}" for f in record["faults"])
        print(f"run {i}: {summary}; params {'same' if record['same_params'] else 'DIFFER'}",
              flush=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    faults = [f for r in records for f in r["faults"] if f["kind"] in ("SIGKILL", "SIGTERM")]
    kills = [f for f in faults if f["kind"] == "SIGKILL"]
    terms = [f for f in faults if f["kind"] == "SIGTERM"]
    caught = [f for f in terms if f["rc"] == 75]
    lost_too_much = sum(any(f.get("lost", 0) > args.checkpoint_every for f in r["faults"])
                        for r in records)
    lines = [
        f"# Fault injection, {args.machine}, {datetime.date.today().isoformat()}",
        "",
        f"`python benchmarks/fault_injection.py --runs {args.runs} --max_faults "
        f"{args.max_faults} --num_steps {args.num_steps} --checkpoint_every "
        f"{args.checkpoint_every} --seed {args.seed}`",
        "",
        f"Config: `sparse_gpt/config.py:tiny` with {json.dumps(SMALL)}, "
        f"num_steps={args.num_steps}, checkpoint_every={args.checkpoint_every}; corpus: the "
        "first 6 documents of the bundled corpus (10 KB each). Reference (uninterrupted) "
        f"launch: {ref['startup_s']:.1f} s to the first step, {ref['train_s']:.1f} s from "
        "there to the last. Phase: where the run was when the signal landed. Total wall "
        f"time {time.time() - begin:.0f} s, {launcher.count} launches of train.py.",
        "",
        "| | |",
        "|---|---|",
        f"| runs | {len(records)} |",
        f"| faults | {len(faults)} ({len(kills)} SIGKILL, {len(terms)} SIGTERM; "
        f"{sum(f['phase'] == 'start-up' for f in faults)} during start-up) |",
        f"| runs that lost more than one checkpoint interval ({args.checkpoint_every} steps) "
        f"| **{lost_too_much}** |",
        f"| most steps lost by one SIGKILL | {max((f.get('lost', 0) for f in kills), default=0)} |",
        f"| SIGTERMs caught (exit 75) / that lost a step | {len(caught)} / "
        f"**{sum(f.get('lost', 0) > 0 for f in caught)}** |",
        f"| runs whose final params/opt state/masks differ from the uninterrupted run | "
        f"**{sum(not r['same_params'] for r in records)}** |",
        f"| runs whose metrics.jsonl differs (all but tokens_per_sec) | "
        f"**{sum(not r['same_metrics'] for r in records)}** |",
        f"| launches that failed unexpectedly | "
        f"**{sum(len(r['unexpected']) for r in records)}** |",
        "",
        "Per fault: signal @ phase, seconds after launch, last step logged before it, step the",
        "next launch resumed from, steps lost, exit status.",
        "",
        "| run | fault | phase | at (s) | reached | resumed | lost | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(records):
        for f in r["faults"]:
            lines.append(f"| {i} | {f['kind']} | {f['phase']} | {f['at']:.1f} | {f['reached']} "
                         f"| {f.get('resumed', '-')} | {f.get('lost', '-')} | {f['rc']} |")
        for u in r["unexpected"]:
            lines.append(f"| {i} | unexpected: {u!r} | | | | | | |")
    from benchmarks._results import save_result
    save_result("\n".join(lines) + "\n", args.out, "fault_injection_2-core-cpu-vm")
    bad = lost_too_much + sum(not r["same_params"] for r in records) + sum(
        len(r["unexpected"]) for r in records)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
