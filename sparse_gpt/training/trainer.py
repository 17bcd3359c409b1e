"""The training loop: data, state, steps, evaluation, metrics, checkpoints, resume.

``train(config, workdir)`` is everything ``python train.py`` does. Re-running it on the same
workdir resumes from the newest checkpoint (state and data position), so a killed run ends
with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_gpt.model import attention as attention_lib
from sparse_gpt.training import checkpoint as ckpt_lib
from sparse_gpt import plan
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.parallel import pipeline
from sparse_gpt.evaluation import sampling
from sparse_gpt.parallel import sharding
from sparse_gpt.sparsity import sat as sat_lib
from sparse_gpt.training import step as train_lib
from sparse_gpt.training.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the run stopped at the last good checkpoint."""


class Steps(NamedTuple):
    """The jitted, sharded functions of a run; the steps take host (numpy) batches."""
    mesh: Mesh
    init: Callable            # rng -> TrainState (sharded)
    train_step: Callable      # (state, batch) -> (state, metrics); donates state
    eval_step: Callable       # (state, batch) -> {"loss_sum", "weight"}


def make_steps(config: ml_collections.ConfigDict, model, tx, method,
               mesh: Mesh | None = None, compiler_options: dict | None = None) -> Steps:
    """Builds init, train and eval steps for ``config.mesh`` (or ``mesh``).

    Shardings come from the model's logical axis names and ``config.mesh.rules``; with more
    than one pipeline stage the model runs through ``pipeline.make_forward``; a block-sparse
    model with a dense phase through ``train_lib.dense_when_all_live``.
    ``compiler_options`` go to XLA for every step (tests use
    ``{"xla_backend_optimization_level": 0}``: 3x faster compiles of slower code).
    """
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.parse_rules(config.mesh.rules)
    forward = train_lib.forward
    if mesh.shape["stage"] > 1:
        pcfg = pipeline.PipelineConfig.from_config(config.mesh, mesh.shape["stage"])
        pcfg.validate(config.model.n_layers, config.train.batch_size)
        forward = pipeline.make_forward(mesh, pcfg)
    if model.cfg.matmul == "block_sparse" and method.settings.dense_finetune_start >= 1:
        forward = train_lib.dense_when_all_live(forward)  # the dense phase leaves the kernel

    def init_fn(rng):
        return train_lib.init_state(config, model, tx, method, rng)

    state_sh = sharding.state_shardings(init_fn, model, tx, mesh, rules, config.data.seq_len)
    batch_sh = sharding.batch_sharding(mesh, rules, config.train.batch_size)
    replicated = NamedSharding(mesh, P())
    jit = functools.partial(sharding.jit, mesh=mesh, rules=rules,
                            compiler_options=compiler_options)
    init = jit(init_fn, out_shardings=state_sh)
    train = jit(train_lib.make_train_step(model, tx, method, forward,
                                          attention=attention_lib.from_config(config),
                                          sat=sat_lib.from_config(config)),
                in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                donate_argnums=0)
    evaluate_ = jit(train_lib.make_eval_step(model, forward), in_shardings=(state_sh, batch_sh),
                    out_shardings=replicated)
    put = functools.partial(sharding.put_batch, sharding=batch_sh,
                            batch_size=config.train.batch_size)
    return Steps(mesh, init, lambda state, batch: train(state, put(batch)),
                 lambda state, batch: evaluate_(state, put(batch)))


def evaluate(eval_step, state: train_lib.TrainState, batches: list[dict],
             bytes_per_token: float) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and bits per UTF-8 byte."""
    loss_sum, weight = 0.0, 0.0
    for batch in batches:
        out = jax.device_get(eval_step(state, batch))
        loss_sum += float(out["loss_sum"])
        weight += float(out["weight"])
    loss = loss_sum / max(weight, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token}


def setup(config: ml_collections.ConfigDict):
    """Builds data, model, optimizer, method and the jitted steps of a run."""
    plan.validate(config)
    data = data_lib.make_data(config.data, config.train.batch_size, config.data.seed)
    if data.tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"The {config.data.tokenizer} tokenizer has {data.tokenizer.vocab_size} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set --config.model.vocab_size to at "
            f"least {data.tokenizer.vocab_size}.")
    model, tx, method = train_lib.build(config)
    steps = make_steps(config, model, tx, method)
    return data, model, steps.init, steps.train_step, steps.eval_step


def restore_or_init(config, workdir: str, model, init, data_iter):
    """Returns (state, checkpointer, meta): the newest checkpoint's state, else a new one."""
    rng = jax.random.key(config.train.seed)
    abstract = jax.eval_shape(init, rng)
    meta = ckpt_lib.make_meta(model.cfg, abstract)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints)
    if ckpt.latest_step() is None:
        state = init(rng)
        if config.train.get("init_from"):  # a fresh run starting from other weights
            from sparse_gpt.training import init_from
            state = init_from.warm_start(config, model, state, rng)
        return state, ckpt, meta
    state, data_state, _ = ckpt.restore(abstract, meta)
    data_iter.set_state(data_state)
    return state, ckpt, meta


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``.

    Args:
      config: a run config (``sparse_gpt.config.get_config``).
      workdir: run folder: checkpoints/, metrics.jsonl, tensorboard/, sample.txt.
      stop_after: stop (without a final checkpoint, like a crash) once this step is reached;
        used by tests to simulate an interrupted run.

    Returns:
      The last logged metrics, with the final validation metrics under ``"val"``.

    Raises:
      NonFiniteLossError: a non-finite loss or gradient; the newest checkpoint is the last
        good one.
    """
    os.makedirs(workdir, exist_ok=True)
    data, model, init, train_step, eval_step = setup(config)
    train_iter = data.train_iterator()
    state, ckpt, meta = restore_or_init(config, workdir, model, init, train_iter)
    start = int(state.step)
    t = config.train
    tokens_per_step = t.batch_size * config.data.seq_len
    writer = MetricsWriter(workdir, resume_step=start)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    val_batches = data.val_batches(t.eval_batches)
    last, val = {}, None
    pbar = _progress(t, start)
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, t.num_steps):
            state, metrics = train_step(state, next(train_iter))
            done = step + 1
            is_last = done == t.num_steps
            if done % t.log_every == 0 or is_last:
                metrics = jax.device_get(metrics)
                _check_finite(state, ckpt)
                now = time.perf_counter()
                last = {"step": done, "loss": float(metrics["loss"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(train_lib.lr_schedule(t)(step)),
                        "tokens_per_sec": (done - tick_step) * tokens_per_step / (now - tick),
                        "flops": float(state.flops),
                        "dense_flops_per_step": float(metrics["dense_flops"]),
                        "density": float(metrics["density"])}
                for key in ("sparse_attention", "omission_rate"):  # MST window, SAT rate
                    if key in metrics:
                        last[key] = float(metrics[key])
                tick, tick_step = now, done
                if pbar is not None:
                    pbar.set_postfix(loss=f"{last['loss']:.3f}",
                                     tok_s=f"{last['tokens_per_sec']:.0f}")
                if done % t.eval_every == 0 or is_last:
                    val = evaluate(eval_step, state, val_batches, data.bytes_per_token)
                    last.update({f"val_{k}": v for k, v in val.items()})
                    tick = time.perf_counter()  # evaluation time is not training throughput
                writer.write(last)
            if pbar is not None:
                pbar.update(1)
            if done % t.checkpoint_every == 0 or is_last:
                _check_finite(state, ckpt)
                ckpt.save(done, state, train_iter.get_state(), meta)
            if stop_after is not None and done >= stop_after:
                break
        ckpt.wait()
    finally:
        if pbar is not None:
            pbar.close()
        ckpt.close()
        writer.close()
    if stop_after is None or int(state.step) >= t.num_steps:
        _write_sample(config, workdir, model, state, data.tokenizer)
    if val is None and int(state.step) >= t.num_steps:  # a finished run, reopened
        val = evaluate(eval_step, state, val_batches, data.bytes_per_token)
    last["val"] = val
    last["state"] = state
    return last


def _check_finite(state: train_lib.TrainState, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = int(state.bad_step)
    if bad >= 0:
        ckpt.wait()
        raise NonFiniteLossError(
            f"Loss or gradient became NaN/inf at step {bad + 1}; stopped. The last good "
            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower "
            "--config.train.lr, raise --config.train.warmup_steps or check the data.")


def _progress(t: ml_collections.ConfigDict, start: int):
    if not t.progress_bar:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _write_sample(config, workdir: str, model, state, tokenizer) -> None:
    t = config.train
    prompt = tokenizer.encode(t.sample_prompt) or [tokenizer.eot_id]
    n = max(0, min(t.sample_tokens, model.cfg.max_len - len(prompt)))
    tokens = sampling.generate(model, state.params, state.masks, prompt, n, temperature=0.8,
                               top_k=40, seed=t.seed, vocab_size=tokenizer.vocab_size)
    with open(os.path.join(workdir, "sample.txt"), "w") as f:
        f.write(t.sample_prompt + tokenizer.decode(tokens) + "\n")


def load_run(workdir: str, step: int | None = None):
    """Loads a run for evaluation: (config, data, model, eval_step, state).

    Raises:
      FileNotFoundError: ``workdir`` holds no run (no config.json or no checkpoint).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run (no config.json); pass the --workdir "
                                "of a train.py run.")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    data, model, init, _, eval_step = setup(config)
    abstract = jax.eval_shape(init, jax.random.key(config.train.seed))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet; train first.")
        state, _, _ = ckpt.restore(abstract, ckpt_lib.make_meta(model.cfg, abstract), step)
    finally:
        ckpt.close()
    return config, data, model, eval_step, state
