"""Train-step time of every sparsity method against dense, interleaved in one process.

Run from the repository root::

    python benchmarks/step_speed.py                                   # both shapes, all arms
    python benchmarks/step_speed.py --shapes 4x128:128:16 --arms dense,static75 --steps 10
    python benchmarks/step_speed.py --preset gpt2-small --arms dense,static87.5 --batch 8 \\
        --seq 1024 --steps 10                                         # GPU suite
    python benchmarks/step_speed.py --smoke        # CPU, under a minute: 2x128, 2 rounds

A shape is ``LAYERSxD_MODEL:SEQ:BATCH`` (heads = d_model / 64, at least 2; byte vocabulary);
``--preset`` takes a preset of ``sparse_gpt/config.py`` instead. Arms (each the same model,
``trainer.make_steps`` as ``train.py`` builds it, one fixed random batch):

    plain          a minimal Flax GPT of the same shape (no masks, no bookkeeping)
    floor          static 87.5% on a stand-in kernel whose products cost nothing (each
                   output a broadcast of its input's row means; W is not read, dW not
                   written): the rest of the step, below which no arm of the same storage
                   can go. ``dense / floor`` bounds any speed-up from the sparse products
    dense          method=dense
    masked75       static 75%, column-balanced blocks, the dense masked product
    static75/87.5  the SambaNova recipe's sparsity and block size (sparse_pretrain.py) on the
                   block kernels, in the dense layout (the recipe as shipped: compact-ARM)
    set75 rigl75 gmp75   75%, column-balanced blocks on the block kernels; GMP timed at its
                   final density (after update_end)
    mst-warmup mst-ultra mst-restore   MST (ultra-sparse 87.5%, final 75%, blocks, kernels)
                   timed inside each phase
    compact-ARM    ARM (floor, static75, static87.5, set75, rigl75) with
                   model.sparse_storage=compact: only the live blocks stored, read by the
                   kernels as they are (so clipping and Adam touch only those); compact-floor
                   is the floor of the compact arms

After compiling and two warm-up steps per arm, ``--steps`` rounds time one step of every arm
in turn (A, B, C, A, B, C, ...) and each arm's median is reported. Steps where the method
changes its topology (``update_every=10``) are timed apart, in the ``update ms`` column.
Columns: ms/step, speed-up (dense ms / arm ms), the FLOP limit (dense / arm step FLOPs,
``sparse_gpt/flops.py``) and the share of the limit reached (speed-up / limit). With the
``floor`` arm, two more: the time the arm spends above the floor (its sparse layers' products
and their bookkeeping; dense's is its dense products) and the speed-up of that part over
dense's, beside its own FLOP limit (1 / density of the sparse layers); compact arms are
measured from compact-floor when it runs. An arm that fails to build (e.g. a kernel that does
not compile on this device) is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datetime  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._results import save_result  # noqa: E402
from sparse_gpt import cli, config as config_lib, flops as flops_lib, plan as plan_lib  # noqa: E402
from sparse_gpt.configs import sparse_pretrain  # noqa: E402
from sparse_gpt.training import step as train_lib, trainer  # noqa: E402

SHAPES = ("4x128:128:16", "4x512:256:8")
ARMS = ("plain", "floor", "compact-floor", "dense", "masked75", "static75", "static87.5",
        "set75", "rigl75", "gmp75", "mst-warmup", "mst-ultra", "mst-restore",
        "compact-static75", "compact-static87.5", "compact-set75", "compact-rigl75")
NUM_STEPS = 1000            # the schedules' horizon (update_end = 750, MST phases inside)


def _blocks(d: int, density: float, kernels: bool = True) -> dict:
    return {"sparsity.density": density, "sparsity.structure": "block",
            "sparsity.block_balance": "column",
            "sparsity.block_size": sparse_pretrain.block_size(d, density),
            "model.matmul": "block_sparse" if kernels else "masked"}


def arm_overrides(arm: str, d: int) -> tuple[dict, int]:
    """The config overrides of ``arm`` and the step its timing starts at."""
    dynamic = {"sparsity.update_every": 10}
    if arm.startswith("compact-"):
        over, start = arm_overrides(arm.removeprefix("compact-"), d)
        return {**over, "model.sparse_storage": "compact"}, start
    if arm == "dense":
        return {}, 0
    if arm == "floor":
        over, start = arm_overrides("static87.5", d)
        return {**over, "model.kernel_backend": FREE_BACKEND}, start
    if arm.startswith(("masked", "static")):
        density = 1 - float(arm.removeprefix("masked").removeprefix("static")) / 100
        return {"sparsity.method": "static", **_blocks(d, density, arm.startswith("static"))}, 0
    if arm in ("set75", "rigl75", "gmp75"):
        start = 800 if arm == "gmp75" else 0    # GMP: past update_end, at its final density
        return {"sparsity.method": arm[:-2], **_blocks(d, 0.25), **dynamic}, start
    if arm.startswith("mst-"):
        mst = {"sparsity.method": "mst", **_blocks(d, 0.125), **dynamic,
               "sparsity.mst_final_density": 0.25}
        # update window [0, 750]: warm-up to 187, ultra-sparse to 562, restoration to 750.
        return mst, {"mst-warmup": 100, "mst-ultra": 300, "mst-restore": 680}[arm]
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


FREE_BACKEND = "step_speed_free"


def _row_mean(a_MxK: jax.Array, n: int, out_dtype) -> jax.Array:
    # Reads all of its input, so nothing upstream is dead code, and writes [M, n].
    return jnp.broadcast_to(jnp.mean(a_MxK, axis=1, keepdims=True), (a_MxK.shape[0], n)
                            ).astype(out_dtype)


def _register_free_backend() -> None:
    """The ``floor`` arm's kernel: the three block products as (nearly) free stand-ins."""
    import kernels

    if FREE_BACKEND in kernels.available_backends():
        return

    def dw(x, dy, shape, dt):
        return jnp.zeros(shape, dt) + (x[0, 0] * dy[0, 0]).astype(dt)

    def dblocks_shape(cmeta):
        b = cmeta.block_size
        return (cmeta.shape[1] // b, cmeta.slots, b, b)

    kernels.register_backend(FREE_BACKEND, kernels.MatmulBackend(
        matmul=lambda x, w, meta, dt: _row_mean(x, w.shape[1], dt),
        matmul_t=lambda dy, w, meta, dt: _row_mean(dy, w.shape[0], dt),
        sddmm=lambda x, dy, meta, dt: dw(x, dy, meta.shape, dt),
        compact=kernels.CompactBackend(
            matmul=lambda x, blocks, cmeta, dt: _row_mean(x, cmeta.shape[1], dt),
            matmul_t=lambda dy, blocks, cmeta, dt: _row_mean(dy, cmeta.shape[0], dt),
            sddmm=lambda x, dy, cmeta, dt: dw(x, dy, dblocks_shape(cmeta), dt)),
    ))


def base_config(shape: str | None, preset: str | None, batch: int | None, seq: int | None):
    c = config_lib.get_config(preset or "tiny")
    over = {"train.num_steps": NUM_STEPS, "train.warmup_steps": 10, "train.progress_bar": False}
    if shape:
        layers, rest = shape.split("x")
        d, seq_s, batch_s = (int(v) for v in rest.split(":"))
        over.update({"model.n_layers": int(layers), "model.d_model": d,
                     "model.n_heads": max(2, d // 64), "model.max_len": int(seq_s),
                     "data.seq_len": int(seq_s), "train.batch_size": int(batch_s)})
    if batch:
        over["train.batch_size"] = batch
    if seq:
        over.update({"data.seq_len": seq, "model.max_len": max(seq, c.model.max_len)})
    for k, v in over.items():
        cli.apply_override(c, k, str(v))
    return c


class PlainGPT(nn.Module):
    """A minimal pre-LayerNorm GPT of the same shape: what a dense step is held to."""
    vocab: int
    layers: int
    d: int
    heads: int
    max_len: int

    @nn.compact
    def __call__(self, tokens_BxL):
        wte = nn.Embed(self.vocab, self.d, embedding_init=nn.initializers.normal(0.02))
        x = wte(tokens_BxL) + nn.Embed(self.max_len, self.d)(jnp.arange(tokens_BxL.shape[1]))
        b, seq_len, _ = x.shape
        for _ in range(self.layers):
            h = nn.Dense(3 * self.d)(nn.LayerNorm()(x)).reshape(b, seq_len, 3, self.heads, -1)
            a = jax.nn.dot_product_attention(h[:, :, 0], h[:, :, 1], h[:, :, 2], is_causal=True)
            x = x + nn.Dense(self.d)(a.reshape(b, seq_len, self.d))
            x = x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(nn.LayerNorm()(x))))
        return wte.attend(nn.LayerNorm()(x))


def plain_arm(c, batch):
    m = c.model
    model = PlainGPT(m.vocab_size, m.n_layers, m.d_model, m.n_heads, m.max_len)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))
    params = model.init(jax.random.key(0), batch["inputs"][:1])
    state = (params, tx.init(params))

    def loss(p):
        logp = jax.nn.log_softmax(model.apply(p, batch["inputs"]))
        return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1))

    @jax.jit
    def step(state, tokens):
        del tokens
        p, o = state
        value, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), {"loss": value}
    return step, state


def make_arm(arm: str, c0, batch):
    """``(step, state, is_update(step) -> bool, step FLOPs)`` of one arm."""
    if arm == "plain":
        step, state = plain_arm(c0, batch)
        return step, state, (lambda s: False), None
    if arm.endswith("floor"):
        _register_free_backend()
    c = c0.copy_and_resolve_references()
    over, start = arm_overrides(arm, c.model.d_model)
    for k, v in over.items():
        cli.apply_override(c, k, str(v))
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    steps = trainer.make_steps(plan, model, tx, method)
    state = steps.init(jax.random.key(0))
    if start:
        # One update step at the phase brings the masks to its scheduled density.
        while not bool(method.is_update_step(start)):
            start -= 1
        state, _ = steps.train_step(state.replace(step=jnp.asarray(start, jnp.int32)), batch)
    b, seq_len = batch["inputs"].shape
    flops = None                        # a stand-in's FLOPs are not a limit of anything
    if not arm.endswith("floor"):
        masks = jax.device_get(state.masks)
        flops = flops_lib.step_flops(model.cfg, masks, b, seq_len)
        flops["density"] = float(flops_lib.density(masks, model.cfg))
    return steps.train_step, state, (lambda s: bool(method.is_update_step(s))), flops


def run_shape(label: str, c0, arms: list[str], rounds: int) -> str:
    rng = np.random.default_rng(0)
    b, seq_len = c0.train.batch_size, c0.data.seq_len
    tokens = rng.integers(0, min(c0.model.vocab_size, 256), (b, seq_len), np.int32)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
             "weights": np.ones((b, seq_len), np.float32)}
    built, failed = {}, {}
    for arm in arms:
        t0 = time.perf_counter()
        try:
            step, state, is_update, flops = make_arm(arm, c0, batch)
            for _ in range(2):                               # compile, warm up
                state, out = step(state, batch)
                jax.block_until_ready(out)
        except Exception as e:  # noqa: BLE001 -- one arm's failure must not lose the others
            failed[arm] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {label} {arm}: FAILED {failed[arm]}", flush=True)
            continue
        built[arm] = [step, state, is_update, flops]
        print(f"  {label} {arm}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    plain_ms = {a: [] for a in built}
    update_ms = {a: [] for a in built}
    for _ in range(rounds):
        for arm in built:
            step, state, is_update, _ = built[arm]
            upd = arm != "plain" and is_update(int(state.step))
            t0 = time.perf_counter()
            state, out = step(state, batch)
            jax.block_until_ready((state, out))
            (update_ms if upd else plain_ms)[arm].append((time.perf_counter() - t0) * 1e3)
            built[arm][1] = state
    med = {a: statistics.median(v) for a, v in plain_ms.items() if v}
    ref = "dense" if "dense" in med else next(iter(med), None)
    floors = {"dense": med.get("floor"), "compact": med.get("compact-floor")}
    if ref != "dense" or not floors["dense"]:
        floors = {}
    head = "| arm | ms/step | update ms | speed-up | FLOP limit | share of limit |"
    if floors:
        head += " above floor ms | its speed-up (limit) |"
    rows = [f"\n### {label}\n", head, "|" + "---|" * (head.count("|") - 1)]
    for arm in arms:
        if arm not in med:
            rows.append(f"| {arm} | failed: {failed.get(arm, 'no plain step timed')} |")
            continue
        f = built[arm][3]
        limit = float(f["dense"] / f["sparse"]) if f is not None else None
        speed = med[ref] / med[arm]
        upd = (f"{statistics.median(update_ms[arm]):.1f} ({len(update_ms[arm])})"
               if update_ms[arm] else "-")
        row = (f"| {arm} | {med[arm]:.1f} | {upd} | {speed:.2f}x | "
               + (f"{limit:.2f}x | {speed / limit:.2f} |" if limit else "- | - |"))
        if floors:
            floor = floors["compact" if arm.startswith("compact-") else "dense"]
            above = med[arm] - floor if floor else None
            if arm.endswith("floor") or arm == "plain" or above is None:
                row += " - | - |"
            elif arm == "dense" or f is None or above <= 0:
                row += f" {above:.1f} | - |"
            else:
                row += (f" {above:.1f} | {(med['dense'] - floors['dense']) / above:.2f}x "
                        f"({1 / f['density']:.2f}x) |")
        rows.append(row)
    if floors:
        rows.append(f"\nCeiling (dense / floor: the speed-up if the sparse layers' products "
                    f"cost nothing): {med['dense'] / floors['dense']:.2f}x"
                    + (f"; stored compact (dense / compact-floor): "
                       f"{med['dense'] / floors['compact']:.2f}x" if floors["compact"] else "")
                    + ". Compact arms' time above the floor is measured from compact-floor.")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--preset", default=None, help="a sparse_gpt/config.py preset (no --shapes)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--arms", default=None, help=f"default: {','.join(ARMS)}")
    p.add_argument("--steps", type=int, default=20, help="timed rounds")
    p.add_argument("--smoke", action="store_true", help="toy shape, 2 rounds (CPU tests)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.shapes, a.preset, a.batch, a.seq, a.steps = "2x128:32:2", None, None, None, 2
        a.arms = a.arms or "dense,floor,compact-floor,static87.5,compact-static87.5,rigl75"
    a.arms = a.arms or ",".join(ARMS)
    shapes = [None] if a.preset else a.shapes.split(",")
    arms = a.arms.split(",")
    for arm in arms:
        if arm != "plain":
            arm_overrides(arm, 128)                       # an unknown arm fails here
    head = (f"# Train-step speed: {jax.devices()[0].device_kind} ({platform.machine()}, "
            f"{os.cpu_count()} CPUs), jax {jax.__version__}, "
            f"{datetime.date.today().isoformat()}\n\n"
            f"Interleaved rounds: {a.steps}; medians. Command: python benchmarks/step_speed.py "
            + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    parts = [head]
    for shape in shapes:
        c0 = base_config(shape, a.preset, a.batch, a.seq)
        label = a.preset or shape
        label += f" (layers x d_model:seq:batch = {c0.model.n_layers}x{c0.model.d_model}:" \
                 f"{c0.data.seq_len}:{c0.train.batch_size})"
        parts.append(run_shape(label, c0, arms, a.steps))
        print(parts[-1], flush=True)           # each shape's table as soon as it is done
    save_result("\n".join(parts) + "\n", a.out,
                f"step_speed_{jax.default_backend()}")


if __name__ == "__main__":
    main()
