"""Fixed-seed loss curves of short runs: a behaviour fingerprint for refactors.

Trains each arm for a few dozen steps on the bundled corpus (a 2 x 64 byte model, so the
dynamic methods' updates, MST's three phases and SAT's ladder all happen) and prints, per
arm, the training loss of every step, the validation loss and a checksum of the final
parameters, at full float precision. Run it before and after a change that must not change
behaviour and compare the two JSON files::

    python benchmarks/fixed_seed_losses.py --out /tmp/before.json
    ... change the code ...
    python benchmarks/fixed_seed_losses.py --out /tmp/after.json --compare /tmp/before.json

``--compare`` exits non-zero and lists the arms whose numbers differ, or that the earlier
file does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.max_len": 64,
         "data.seq_len": 64, "train.batch_size": 4, "train.num_steps": 40,
         "train.warmup_steps": 4, "train.log_every": 1, "train.eval_every": 40,
         "train.eval_batches": 2, "train.checkpoint_every": 40, "train.sample_tokens": 4,
         "train.progress_bar": False, "sparsity.block_size": 16, "sparsity.update_every": 5}
SPARSE = {"sparsity.density": 0.25, "sparsity.distribution": "uniform"}
ARMS = {
    "dense": {},
    "static": {"sparsity.method": "static", **SPARSE},
    "set": {"sparsity.method": "set", **SPARSE},
    "rigl": {"sparsity.method": "rigl", **SPARSE},
    "gmp": {"sparsity.method": "gmp", **SPARSE},
    "mst": {"sparsity.method": "mst", **SPARSE, "sparsity.mst_final_density": 0.5,
            "attention.sparse_end": 20, "attention.window": 16, "attention.stride": 16,
            "attention.block_size": 16},
    "sat": {"sat.omission_rate": 0.5, "sat.metric": "wanda"},
    "static_block_kernels": {"sparsity.method": "static", **SPARSE, "sparsity.structure": "block",
                             "model.matmul": "block_sparse"},
    "sparse_pretrain_local": "sparse_pretrain.py:tiny,75,local",
}


def run_arm(name: str, overrides, workdir: str) -> dict:
    """Trains one arm in ``workdir``; returns its loss curve, val loss and param checksum."""
    import jax
    import jax.numpy as jnp
    from sparse_gpt import cli
    from sparse_gpt.training import metrics
    from sparse_gpt.training import trainer
    if isinstance(overrides, str):
        config = cli.load_config(os.path.join(ROOT, "sparse_gpt", "configs", overrides))
        cli.apply_override(config, "train.progress_bar", "false")
        cli.apply_override(config, "train.log_every", "1")
    else:
        config = cli.load_config("")
        for key, value in {**SMALL, **overrides}.items():
            cli.apply_override(config, key, str(value))
    result = trainer.train(config, workdir)
    rows = metrics.load_metrics(workdir)
    leaves = jax.tree.leaves(result["state"].params)
    checksum = float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves))
    return {"loss": [r["loss"] for r in rows], "val_loss": result["val"]["loss"],
            "param_abs_sum": checksum, "flops": float(result["state"].flops)}


def compare(out: dict, before: dict, name: str = "the earlier file") -> tuple[str, bool]:
    """``(report, ok)``: each arm of ``out`` against ``before``. An arm that ``before`` lacks
    is reported missing and is not ok (nothing shows it unchanged); arms of ``before`` that
    this run did not train are listed, and do not count against it."""
    lines, differ, missing = [], 0, 0
    for n, arm in out.items():
        if n not in before:
            missing += 1
            lines.append(f"MISSING {n}: not in {name}, nothing to compare it with")
        elif json.dumps(arm) != json.dumps(before[n]):     # NaN equals NaN here
            differ += 1
            old = before[n]
            first = next((i for i, (a, b) in enumerate(zip(arm["loss"], old["loss"]))
                          if json.dumps(a) != json.dumps(b)), None)
            fields = [k for k in sorted(set(arm) | set(old))
                      if json.dumps(arm.get(k)) != json.dumps(old.get(k))]
            where = (f"first differing step {first}" if first is not None
                     else f"steps {len(old['loss'])} -> {len(arm['loss'])}"
                     if len(arm["loss"]) != len(old["loss"]) else "losses equal")
            lines.append(f"DIFFERS {n}: {where}; fields {', '.join(fields)}; val "
                         f"{old['val_loss']!r} -> {arm['val_loss']!r}")
    not_run = [n for n in before if n not in out]
    if not_run:
        lines.append(f"not run (in {name} only): {', '.join(not_run)}")
    same = len(out) - differ - missing
    lines.append(f"{same} identical, {differ} differ, {missing} missing from the comparison")
    return "\n".join(lines), not (differ or missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="write the JSON here (default: stdout)")
    parser.add_argument("--compare", default="", help="a previous --out to compare against")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = {}
    for name in args.arms.split(","):
        with tempfile.TemporaryDirectory() as workdir:
            out[name] = run_arm(name, ARMS[name], workdir)
        print(f"{name}: final loss {out[name]['loss'][-1]!r} val {out[name]['val_loss']!r}",
              file=sys.stderr)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        report, ok = compare(out, before, args.compare)
        print(report, file=sys.stderr)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
