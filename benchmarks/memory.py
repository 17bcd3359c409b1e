"""Training-state memory of dense, dense-layout sparse and compact sparse models (issue 13).

Run from the repository root::

    python benchmarks/memory.py                  # every preset, RSS + checkpoints at 4x512
    python benchmarks/memory.py --smoke          # tiny preset only, no subprocesses (seconds)
    python benchmarks/memory.py --out benchmarks/results/memory_MACHINE_DATE.md

Three arms, each the state ``step.init_state`` builds (``jax.eval_shape``: nothing is
allocated), plus the gradients, which have the params' shapes:

    dense      sparsity.method=dense
    layout     static, structure=block, block_balance=column, model.matmul=block_sparse,
               model.sparse_storage=dense: [L, K, N] weights (zeros off the live blocks) and
               [L, K, N] bool masks; gradients and Adam moments [L, K, N] as well
    compact    the same with model.sparse_storage=compact: live blocks [L, Nb, T, B, B] and
               int32 block indices [L, Nb, T] as the masks; gradients and moments mirror them

at densities 0.25 and 0.125, with ``sparse_pretrain.block_size`` (the largest of 128, 64,
32, 16 holding the density as whole blocks per output block column). The gpt-13b rows are
repeated for the ``sparse_pretrain.py:gpt-13b,75|87.5`` configs themselves (their mesh is
ignored: memory here is the whole, unsharded state). "Sparse layers" are the four
projection kernels (``gpt.KERNELS``: attn/qkv, attn/out, mlp/fc, mlp/proj); "state" is
params + gradients + optimizer state (+ the step scalars); masks are listed apart. Every
ratio divides by the dense arm's bytes without its masks (the dense method still carries
[L, K, N] all-ones bool masks, shown in its masks column).

Second, what initialising costs: XLA's buffer plan (``memory_analysis``) of
``jit(init_state)`` per preset at density 0.125, compiled, never run: the state it outputs
and the temporaries it needs on the way (a compact state is built in the dense layout and
converted).

Then, at 4 layers x d_model 512, seq 256, batch 8 (byte vocabulary), density 0.125, each
arm in its own subprocess: peak RSS (``ru_maxrss``) after imports (the baseline), after
``init`` and after 3 train steps of ``trainer.make_steps`` (compilation included), then the
on-disk size of the state saved by ``training.checkpoint.Checkpointer`` (as the trainer
saves it; orbax compresses, so zeros are nearly free on disk), then XLA's plan of the same
train step (arguments + temporaries), compiled again after the RSS readings. Without
``kernels.compact_matmul`` the compact arm's steps are skipped (its state and checkpoint
still measured).

Targets (issue 13): sparse layers' params + grads + Adam at density 0.125 <= 0.14x dense
(checked with the index masks added), and the whole sparse_pretrain gpt-13b 87.5% state
(masks included) <= 0.3x dense.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import step_speed  # noqa: E402
from benchmarks._results import save_result  # noqa: E402
from sparse_gpt import cli, config as config_lib, plan as plan_lib  # noqa: E402
from sparse_gpt.configs import sparse_pretrain  # noqa: E402
from sparse_gpt.model import gpt as model_lib  # noqa: E402
from sparse_gpt.training import step as train_lib  # noqa: E402

ARMS = ("dense", "layout", "compact")
DENSITIES = (0.25, 0.125)
RSS_SHAPE = "4x512:256:8"        # step_speed.py's second shape
RSS_DENSITY = 0.125
TARGET_SPARSE_LAYERS = 0.14      # sparse layers' P+G+Adam at density 0.125, x dense
TARGET_WHOLE_13B = 0.3           # sparse_pretrain gpt-13b 87.5% whole state, x dense
_RESULT = "MEMORY_WORKER_RESULT "


# ----------------------------------------------------------------------------- configs

def sparse_overrides(arm: str, density: float, d_model: int) -> dict:
    """Config overrides of a sparse arm (``layout`` or ``compact``); ``{}`` for dense."""
    if arm == "dense":
        return {}
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    return {"sparsity.method": "static", "sparsity.density": density,
            "sparsity.structure": "block", "sparsity.block_balance": "column",
            "sparsity.block_size": sparse_pretrain.block_size(d_model, density),
            "model.matmul": "block_sparse",
            "model.sparse_storage": "compact" if arm == "compact" else "dense"}


def arm_config(preset: str, arm: str, density: float, family: str = "preset"):
    """The config of one arm: ``config.py:PRESET`` + overrides, or (``family=
    "sparse_pretrain"``, sparse arms) ``sparse_pretrain.py:PRESET,SPARSITY`` itself with only
    ``model.sparse_storage`` set."""
    if family == "sparse_pretrain" and arm != "dense":
        pct = {v: k for k, v in sparse_pretrain.SPARSITIES.items()}[density]
        c = sparse_pretrain.get_config(f"{preset},{pct}")
        cli.apply_override(c, "model.sparse_storage",
                           "compact" if arm == "compact" else "dense")
        return c
    c = config_lib.get_config(preset)
    for k, v in sparse_overrides(arm, density, c.model.d_model).items():
        cli.apply_override(c, k, str(v))
    return c


def _devices(config) -> int:
    m = config.mesh
    return max(1, int(m.data)) * int(m.fsdp) * int(m.tensor) * int(m.stage)


def abstract_state(config):
    """``(plan, model, state)``: ``state`` the ShapeDtypeStructs of ``init_state``."""
    plan = plan_lib.from_config(config, num_devices=_devices(config))
    model, tx, method = train_lib.build(plan)
    state = jax.eval_shape(lambda r: train_lib.init_state(plan, model, tx, method, r),
                           jax.random.key(0))
    return plan, model, state


# ----------------------------------------------------------------------------- bytes

def _nbytes(leaf) -> int:
    return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _is_kernel(key_path) -> bool:
    """Whether a leaf's key path ends with one of the four projection kernels' paths."""
    keys = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", ""))))
                    for k in key_path)
    return any(keys.endswith(p) for p in model_lib.KERNELS)


def _split(tree) -> tuple[int, int]:
    """(bytes of the projection-kernel leaves, bytes of all leaves) of ``tree``."""
    kern = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        n = _nbytes(leaf)
        total += n
        kern += n if _is_kernel(path) else 0
    return kern, total


def state_bytes(state) -> dict[str, int]:
    """Bytes of a (possibly abstract) ``TrainState`` and its gradients, by part.

    Returns:
      ``params``, ``grads`` (= params), ``opt``, ``masks``, ``other`` (step, rng, counters,
      the method's state); ``sparse_layers``: params + grads + optimizer leaves of the four
      projection kernels (masks excluded); ``sparse_params``: their params alone;
      ``state``: params + grads + opt + other; ``total``: ``state`` + masks.
    """
    kp, params = _split(state.params)
    ko, opt = _split(state.opt_state)
    _, masks = _split(state.masks)
    other = sum(_split(x)[1] for x in (state.step, state.rng, state.bad_step, state.flops,
                                         state.sparsity_state))
    st = 2 * params + opt + other
    return {"params": params, "grads": params, "opt": opt, "masks": masks, "other": other,
            "sparse_layers": 2 * kp + ko, "sparse_params": kp, "state": st,
            "total": st + masks}


def memory_rows(presets, densities=DENSITIES, family_13b: bool = True) -> list[dict]:
    """One row per (preset, arm, density): the config's ``state_bytes``, its block size and
    slots, and the ratios to the preset's dense arm (``sparse_x``: sparse layers' P+G+Adam;
    ``sparse_masks_x``: the same with the masks; ``state_x``; ``total_x``: state + masks,
    all over the dense arm's bytes without its masks)."""
    rows = []
    jobs = []
    for preset in presets:
        jobs.append((preset, "preset", "dense", 1.0))
        jobs += [(preset, "preset", arm, d) for d in densities for arm in ARMS[1:]]
        if family_13b and preset == "gpt-13b":
            jobs += [(preset, "sparse_pretrain", arm, d) for d in densities
                     for arm in ARMS[1:]]
    for preset, family, arm, density in jobs:
        c = arm_config(preset, arm, density, family)
        plan, model, state = abstract_state(c)
        rows.append({"preset": preset, "family": family, "arm": arm, "density": density,
                     "block": int(c.sparsity.block_size) if arm != "dense" else None,
                     "slots": dict(model.cfg.compact_slots), **state_bytes(state)})
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """Adds each row's ratios to its preset's dense row (see :func:`memory_rows`)."""
    dense = {r["preset"]: r for r in rows if r["arm"] == "dense"}
    for r in rows:
        d = dense[r["preset"]]
        r["sparse_x"] = r["sparse_layers"] / d["sparse_layers"]
        r["sparse_masks_x"] = (r["sparse_layers"] + r["masks"]) / d["sparse_layers"]
        r["state_x"] = r["state"] / d["state"]
        r["total_x"] = r["total"] / d["state"]


def _gb(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e3:.1f} kB"


def state_table(rows: list[dict]) -> str:
    _ratios(rows)
    out = ["| preset | arm | density | B | T qkv/out/fc/proj | sparse layers P+G+Adam | "
           "x dense | state P+G+opt | x dense | masks | state + masks | x dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["preset"] if r["family"] == "preset" else f"sparse_pretrain:{r['preset']}"
        slots = "/".join(str(r["slots"].get(k.removeprefix("blocks/").removesuffix("/kernel"),
                                            "-")) for k in model_lib.KERNELS)
        out.append(
            f"| {name} | {r['arm']} | {r['density']:g} | {r['block'] or '-'} | "
            f"{slots if r['slots'] else '-'} | {_gb(r['sparse_layers'])} | "
            f"{r['sparse_x']:.4f} | {_gb(r['state'])} | {r['state_x']:.4f} | "
            f"{_gb(r['masks'])} | {_gb(r['total'])} | {r['total_x']:.4f} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, one line each, with ``met``/``NOT met``."""
    _ratios(rows)
    lines = []
    for r in rows:
        if r["arm"] == "compact" and r["density"] == 0.125 and r["family"] == "preset":
            ok = r["sparse_masks_x"] <= TARGET_SPARSE_LAYERS
            lines.append(f"- {r['preset']} compact 87.5%: sparse layers' P+G+Adam "
                         f"{r['sparse_x']:.4f}x dense ({r['sparse_masks_x']:.4f}x with the "
                         f"index masks) <= {TARGET_SPARSE_LAYERS}x: "
                         f"{'met' if ok else 'NOT met'}")
    for r in rows:
        if r["family"] == "sparse_pretrain" and r["density"] == 0.125:
            ok = r["total_x"] <= TARGET_WHOLE_13B
            lines.append(f"- sparse_pretrain:{r['preset']},87.5 {r['arm']}: whole state "
                         f"(masks included) {r['total_x']:.4f}x dense <= {TARGET_WHOLE_13B}x: "
                         f"{'met' if ok else 'NOT met'}"
                         + ("" if r["arm"] == "compact" else " (dense layout: not a target)"))
    return lines


def _planned(compiled) -> dict[str, int] | None:
    """XLA's buffer plan of a compiled computation: argument, output, alias, temp bytes."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
            ("argument", "output", "alias", "temp")}


def init_memory(config) -> dict[str, int] | None:
    """XLA's plan for ``jit(init_state)`` of ``config``: compiled, never run (no allocation).

    ``output`` is the state; ``temp`` the temporaries init needs on the way (a compact model
    is initialised in the dense layout and converted, see ``step.init_state``).
    """
    plan = plan_lib.from_config(config, num_devices=_devices(config))
    model, tx, method = train_lib.build(plan)
    init = jax.jit(lambda r: train_lib.init_state(plan, model, tx, method, r))
    return _planned(init.lower(jax.random.key(0)).compile())


def init_rows(presets, density: float = RSS_DENSITY) -> list[dict]:
    """:func:`init_memory` of each preset's dense arm and its sparse arms at ``density``."""
    rows = []
    for preset in presets:
        for arm in ARMS:
            c = arm_config(preset, arm, 1.0 if arm == "dense" else density)
            rows.append({"preset": preset, "arm": arm,
                         "density": 1.0 if arm == "dense" else density,
                         "plan": init_memory(c)})
    return rows


def init_table(rows: list[dict]) -> str:
    out = ["| preset | arm | density | state (init output) | init temporaries | "
           "init peak (output + temp) | x dense |", "|---|---|---|---|---|---|---|"]
    dense = {r["preset"]: r["plan"] for r in rows if r["arm"] == "dense"}
    for r in rows:
        m, d = r["plan"], dense[r["preset"]]
        if m is None or d is None:
            out.append(f"| {r['preset']} | {r['arm']} | {r['density']:g} | n/a | n/a | n/a | - |")
            continue
        peak, dpeak = m["output"] + m["temp"], d["output"] + d["temp"]
        out.append(f"| {r['preset']} | {r['arm']} | {r['density']:g} | {_gb(m['output'])} | "
                   f"{_gb(m['temp'])} | {_gb(peak)} | {peak / dpeak:.3f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- measured

def compact_kernels_available() -> bool:
    import kernels
    return hasattr(kernels, "compact_matmul")


def _rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` of its address space where Linux has it.

    ``ru_maxrss`` survives ``fork`` + ``exec``: a worker started by a parent that has
    compiled the 13B init would report the parent's peak. ``VmHWM`` starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kB


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def measure(arm: str, shape: str = RSS_SHAPE, density: float = RSS_DENSITY, steps: int = 3,
            ckpt: bool = True) -> dict:
    """Peak RSS around ``init`` + ``steps`` train steps of ``arm`` and its checkpoint size.

    Meant to run alone in a fresh process (``--worker``): ``ru_maxrss`` is the process's
    peak. ``steps=0`` measures the state and the checkpoint only. The compact arm's steps
    are skipped (``steps_skipped``) without ``kernels.compact_matmul``.
    """
    from sparse_gpt.training import checkpoint as ckpt_lib, trainer

    baseline = _rss_bytes()
    c = step_speed.base_config(shape, None, None, None)
    for k, v in sparse_overrides(arm, density, c.model.d_model).items():
        cli.apply_override(c, k, str(v))
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    t0 = time.perf_counter()
    if steps:
        steps_fn = trainer.make_steps(plan, model, tx, method)
        state = steps_fn.init(jax.random.key(0))
    else:  # the state alone: no mesh (a test's fake devices need not divide the batch)
        state = jax.jit(lambda r: train_lib.init_state(plan, model, tx, method, r))(
            jax.random.key(0))
    jax.block_until_ready(state)
    out = {"arm": arm, "shape": shape, "density": density, "baseline_rss": baseline,
           "init_rss": _rss_bytes(), "steps": 0, "loss": None, "steps_skipped": None,
           **{f"state_{k}": v for k, v in state_bytes(state).items()}}
    if steps and arm == "compact" and not compact_kernels_available():
        out["steps_skipped"] = "compact kernels not available"
    elif steps:
        b, seq_len = c.train.batch_size, c.data.seq_len
        tokens = np.random.default_rng(0).integers(0, min(c.model.vocab_size, 256),
                                                   (b, seq_len), np.int32)
        batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
                 "weights": np.ones((b, seq_len), np.float32)}
        try:
            for _ in range(steps):
                state, metrics = steps_fn.train_step(state, batch)
            out["loss"] = float(jax.block_until_ready(metrics)["loss"])
            out["steps"] = steps
        except Exception as e:  # a kernel still being written: report, do not hide the arm
            out["steps_skipped"] = f"step failed: {type(e).__name__}: {str(e)[:160]}"
    out["peak_rss"] = _rss_bytes()
    out["seconds"] = time.perf_counter() - t0
    if ckpt:
        tmp = tempfile.mkdtemp(prefix="memory_ckpt_")
        try:
            saver = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), keep=1,
                                          async_save=False)
            saver.save(int(state.step), state, {}, ckpt_lib.make_meta(model.cfg, state, c))
            saver.wait()
            saver.close()
            step_dir = os.path.join(tmp, "checkpoints", str(int(state.step)))
            out["ckpt_bytes"] = _dir_bytes(os.path.join(step_dir, "state"))
            out["ckpt_dir_bytes"] = _dir_bytes(step_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if steps and not out["steps_skipped"]:
        # The step make_steps builds on one device, compiled again (after the RSS readings)
        # for XLA's buffer plan: state in (donated), activations and gradients as temps.
        fixed = (train_lib.host_copy(state.masks)
                 if train_lib.keeps_fixed_masks(model, method) else None)
        step_fn = jax.jit(train_lib.make_train_step(model, tx, method, fixed_masks=fixed),
                          donate_argnums=0)
        out["step_plan"] = _planned(step_fn.lower(state, batch).compile())
    return out


def measure_subprocess(arm: str, shape: str, density: float, steps: int) -> dict:
    """:func:`measure` in a fresh Python process (its own peak RSS)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--shape", shape,
           "--density", str(density), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"memory worker {arm} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def measured_table(results: list[dict]) -> str:
    """Markdown table of :func:`measure` results (ratios to the ``dense`` arm's)."""
    dense = next(r for r in results if r["arm"] == "dense")
    dense_delta = dense["peak_rss"] - dense["baseline_rss"]
    out = ["| arm | state P+G+opt + masks | x dense | baseline RSS | peak after init | "
           "peak after steps | peak - baseline | x dense | XLA step plan: args + temp | "
           "x dense | checkpoint (state) | x dense | loss after steps |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = r["state_total"]
        row = [r["arm"], _gb(total), f"{total / dense['state_state']:.3f}",
               _gb(r["baseline_rss"]), _gb(r["init_rss"])]
        if r["steps"] > 0 and not r["steps_skipped"] and dense["steps"] > 0:
            delta = r["peak_rss"] - r["baseline_rss"]
            row += [_gb(r["peak_rss"]), _gb(delta), f"{delta / dense_delta:.3f}"]
        else:
            row += [f"n/a ({r['steps_skipped'] or 'no steps run'})", "-", "-"]
        plan, dplan = r.get("step_plan"), dense.get("step_plan")
        if plan and dplan:
            used = plan["argument"] + plan["temp"]
            row += [f"{_gb(plan['argument'])} + {_gb(plan['temp'])}",
                    f"{used / (dplan['argument'] + dplan['temp']):.3f}"]
        else:
            row += ["-", "-"]
        if "ckpt_bytes" in r:
            row += [_gb(r["ckpt_bytes"]), f"{r['ckpt_bytes'] / dense['ckpt_bytes']:.3f}"]
        else:
            row += ["-", "-"]
        row.append("-" if r["loss"] is None else f"{r['loss']:.3f}")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def header(argv) -> str:
    return (f"# Training-state memory: {jax.devices()[0].device_kind} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs), jax {jax.__version__}, "
            f"{datetime.date.today().isoformat()}\n\nCommand: python benchmarks/memory.py "
            + " ".join(argv) + "\n")


def main(argv=None) -> str:
    """Runs the benchmark; returns the markdown text (also printed and saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default=",".join(config_lib.PRESETS))
    p.add_argument("--shape", default=RSS_SHAPE, help="LAYERSxD_MODEL:SEQ:BATCH of the RSS "
                   "and checkpoint runs")
    p.add_argument("--density", type=float, default=RSS_DENSITY)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess measurements")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset; checkpoints in-process at 2x128, no RSS (seconds)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.worker:
        print(_RESULT + json.dumps(measure(a.worker, a.shape, a.density, a.steps)),
              flush=True)
        return ""
    presets = ["tiny"] if a.smoke else [s for s in a.presets.split(",") if s]
    parts = [header(argv)]
    measured = []
    if not a.smoke and not a.no_rss:  # first: workers of a small parent start small
        results = []
        for arm in ARMS:
            results.append(measure_subprocess(arm, a.shape, a.density, a.steps))
            print(f"  {arm}: {results[-1]['seconds']:.1f} s", flush=True)
        note = ("" if compact_kernels_available() else
                " (kernels.compact_matmul is not available: the compact arm's steps are "
                "skipped)")
        measured = [f"## Measured at {a.shape} (layers x d_model:seq:batch, byte vocabulary), "
                    f"density {a.density:g}, init + {a.steps} train steps, one subprocess per "
                    f"arm{note}\n",
                    "Peak RSS: the process's `VmHWM` (`ru_maxrss` without the parent's peak, "
                    "compilation included); the baseline is the peak after imports, before "
                    "init. XLA step plan: `memory_analysis` of the same train step (state in, "
                    "donated; temporaries). Checkpoint: the `state` item of one "
                    "`Checkpointer.save` after the steps (orbax compresses).\n",
                    measured_table(results), ""]
        print("\n".join(measured), flush=True)
    rows = memory_rows(presets)
    parts += ["## State bytes (jax.eval_shape of step.init_state; gradients = params)\n",
              state_table(rows), "", "Targets:", *targets(rows), ""]
    parts += ["## Init memory planned by XLA (jit(init_state) compiled, not run; "
              "unsharded)\n", init_table(init_rows(presets)), ""]
    if a.smoke:
        shape = "2x128:32:2"
        results = [measure(arm, shape, a.density, steps=0) for arm in ARMS]
        parts += [f"## Checkpoints at {shape}, density {a.density:g} (smoke: in-process, "
                  "no steps, no RSS)\n", measured_table(results), ""]
    parts += measured
    text = "\n".join(parts) + "\n"
    save_result(text, a.out, f"memory_{jax.default_backend()}")
    return text


if __name__ == "__main__":
    main()
