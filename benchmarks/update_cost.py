"""Cost of a topology-update step of SET / RigL against a plain step of the same run.

An update step (``method.is_update_step(step)``) runs the optimizer step, then the method's
drop / grow / commit; RigL's also takes the dense gradient (``GradientGrowth``). Issue 12
asks for an update step of at most 2x a plain step at 4 layers x d_model 512, seq 256,
batch 8, density 0.25. Per arm this builds the real jitted train step
(``trainer.make_steps``), warms it up, then times plain and update steps interleaved on one
fixed random batch (the state's step is set so that the next step is or is not an update)
and reports median milliseconds; ``--alone`` also times ``method.update`` jitted by itself
on the state's trees (its share of the update step)::

    python benchmarks/update_cost.py                       # all arms, 5 pairs each
    python benchmarks/update_cost.py --arms rigl_block --reps 3 --alone --out -

A plain step of SET/RigL also runs the method's update ``lax.cond`` (its skip branch), so
the ratio is the whole price of changing the topology.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

UPDATE_EVERY = 10
SHAPE = {"model.n_layers": 4, "model.d_model": 512, "model.n_heads": 8, "model.max_len": 256,
         "data.seq_len": 256, "train.batch_size": 8, "train.num_steps": 10_000,
         "sparsity.density": 0.25, "sparsity.distribution": "uniform",
         "sparsity.update_every": UPDATE_EVERY}
BLOCK = {"sparsity.structure": "block", "sparsity.block_balance": "column",
         "sparsity.block_size": 64, "model.matmul": "block_sparse"}
ARMS = {
    "set": {"sparsity.method": "set"},
    "rigl": {"sparsity.method": "rigl"},
    "set_block": {"sparsity.method": "set", **BLOCK},
    "rigl_block": {"sparsity.method": "rigl", **BLOCK},
}


def _config(overrides):
    from sparse_gpt import cli
    from sparse_gpt import config as config_lib
    config = config_lib.get_config("tiny")
    for key, value in {**SHAPE, **overrides}.items():
        cli.apply_override(config, key, str(value))
    return config


def _timed(fn, *args):
    import jax
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, 1e3 * (time.perf_counter() - t)


def measure(name: str, reps: int, alone: bool) -> dict:
    """Median ms of plain and update steps of one arm (and of ``method.update`` alone)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sparse_gpt import plan as plan_lib
    from sparse_gpt.training import step as train_lib
    from sparse_gpt.training import trainer
    plan = plan_lib.from_config(_config(ARMS[name]))
    model, tx, method = train_lib.build(plan)
    steps = trainer.make_steps(plan, model, tx, method)
    state = steps.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, plan.config.model.vocab_size, (plan.batch_size, plan.seq_len + 1))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "weights": np.ones((plan.batch_size, plan.seq_len), np.float32)}
    update_steps = [UPDATE_EVERY * (i + 1) for i in range(reps + 1)]   # inside the window
    assert all(bool(method.is_update_step(s)) and not bool(method.is_update_step(s + 1))
               for s in update_steps)
    times = {"plain": [], "update": []}
    for i, s in enumerate(update_steps):   # the first pair is warm-up (compile)
        for kind, at in (("plain", s + 1), ("update", s)):
            state = state.replace(step=jnp.asarray(at, jnp.int32))
            (state, _), ms = _timed(steps.train_step, state, batch)
            if i:
                times[kind].append(ms)
    out = {k: statistics.median(v) for k, v in times.items()}
    if alone:
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                             state.params)   # distinct |grad| as a real gradient has
        update = jax.jit(method.update)
        args = (jnp.int32(update_steps[0]), state.params, state.masks, grads, state.opt_state,
                jax.random.key(1), state.sparsity_state)
        _timed(update, *args)
        out["alone"] = statistics.median(_timed(update, *args)[1] for _ in range(reps))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms")
    parser.add_argument("--reps", type=int, default=5, help="timed plain/update pairs per arm")
    parser.add_argument("--alone", action="store_true", help="also time method.update alone")
    parser.add_argument("--out", default="-", help="'-' prints only; else a path, or '' for "
                        "benchmarks/results/update_cost_BACKEND_DATE.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from benchmarks._results import save_result
    rows = []
    for name in args.arms.split(","):
        r = measure(name, args.reps, args.alone)
        alone = f" {r['alone']:.0f} |" if args.alone else ""
        rows.append(f"| {name} | {r['plain']:.0f} | {r['update']:.0f} | "
                    f"{r['update'] / r['plain']:.2f} |{alone}")
        print(rows[-1], file=sys.stderr)
    head = "| arm | plain ms | update ms | ratio |" + (" update() alone ms |" if args.alone
                                                      else "")
    machine = f"{platform.node()} ({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs)"
    text = "\n".join([
        f"# Update-step cost, {datetime.date.today().isoformat()}, {machine}", "",
        "4 x 512, seq 256, batch 8, density 0.25, uniform; block arms: 64x64 column-balanced "
        f"blocks, model.matmul=block_sparse. Median of {args.reps} interleaved pairs.", "",
        head, "|---" * (head.count("|") - 1) + "|", *rows, ""])
    save_result(text, args.out, f"update_cost_{jax.default_backend()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
