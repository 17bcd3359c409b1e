"""The training loop: data, state, steps, evaluation, metrics, checkpoints, resume.

``train(config, workdir)`` is everything ``python train.py`` does. Re-running it on the same
workdir resumes from the newest checkpoint (state and data position), so a killed run ends
with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparse_gpt.training import checkpoint as ckpt_lib
from sparse_gpt import plan as plan_lib
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.parallel import pipeline
from sparse_gpt.evaluation import sampling
from sparse_gpt.parallel import sharding
from sparse_gpt.training import optim
from sparse_gpt.training import step as train_lib
from sparse_gpt.training.metrics import MetricsWriter
from sparse_gpt.training import workdir as workdir_lib


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the run stopped at the last good checkpoint."""


class Steps(NamedTuple):
    """The jitted, sharded functions of a run; the steps take host (numpy) batches."""
    mesh: Mesh
    init: Callable            # rng -> TrainState (sharded)
    train_step: Callable      # (state, batch) -> (state, metrics); donates state
    eval_step: Callable       # (state, batch) -> {"loss_sum", "weight"}


def make_steps(plan: plan_lib.Plan, model, tx, method, mesh: Mesh | None = None,
               compiler_options: dict | None = None) -> Steps:
    """Builds init, train and eval steps for ``config.mesh`` (or ``mesh``).

    Shardings come from the model's logical axis names and ``config.mesh.rules``; with more
    than one pipeline stage the model runs through ``pipeline.make_forward``; a block-sparse
    model whose method may go dense through ``train_lib.dense_when_all_live`` (a compact
    one changes layout instead: :func:`build_steps`). A
    block-sparse model whose masks never change gets steps specialised to the masks of the
    first state they are called with (``step.keeps_fixed_masks``): every later state must
    hold the same masks, as every state of one run does.
    ``compiler_options`` go to XLA for every step (tests use
    ``{"xla_backend_optimization_level": 0}``: 3x faster compiles of slower code).
    """
    mesh = sharding.make_mesh(plan.config.mesh) if mesh is None else mesh
    forward = train_lib.forward
    if mesh.shape["stage"] > 1:
        if plan.pipeline is None or plan.pipeline.num_stages != mesh.shape["stage"]:
            raise ValueError(f"The mesh has {mesh.shape['stage']} pipeline stages but the "
                             f"config plans {getattr(plan.pipeline, 'num_stages', 1)}; set "
                             "--config.mesh.stage to match the mesh.")
        forward = pipeline.make_forward(mesh, plan.pipeline)
    if model.cfg.matmul == "block_sparse" and method.goes_dense and not model.cfg.compact_slots:
        forward = train_lib.dense_when_all_live(forward)  # the dense phase leaves the kernel

    def init_fn(rng):
        return train_lib.init_state(plan, model, tx, method, rng)

    state_sh = sharding.state_shardings(init_fn, model, tx, mesh, plan.rules, plan.seq_len)
    batch_sh = sharding.batch_sharding(mesh, plan.rules, plan.batch_size)
    replicated = NamedSharding(mesh, P())
    jit = functools.partial(sharding.jit, mesh=mesh, rules=plan.rules,
                            compiler_options=compiler_options)
    init = jit(init_fn, out_shardings=state_sh)
    put = functools.partial(sharding.put_batch, sharding=batch_sh, batch_size=plan.batch_size)

    def build(fixed_masks):
        train = jit(train_lib.make_train_step(model, tx, method, forward,
                                              attention=plan.attention, sat=plan.sat,
                                              fixed_masks=fixed_masks),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                    donate_argnums=0)
        evaluate_ = jit(train_lib.make_eval_step(model, forward, method, fixed_masks),
                        in_shardings=(state_sh, batch_sh), out_shardings=replicated)
        return (lambda state, batch: train(state, put(batch)),
                lambda state, batch: evaluate_(state, put(batch)))

    if not train_lib.keeps_fixed_masks(model, method, mesh.shape["stage"]):
        return Steps(mesh, init, *build(None))
    built: list = []

    def steps_of(state):  # the first state's masks are the run's (the method never changes them)
        if not built:
            built.extend(build(train_lib.host_copy(state.masks)))
        return built

    return Steps(mesh, init, lambda state, batch: steps_of(state)[0](state, batch),
                 lambda state, batch: steps_of(state)[1](state, batch))


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


def build_steps(config: ml_collections.ConfigDict, step: int = 0):
    """``(model, init, train_step, eval_step)`` of the run's phase holding a state of ``step``
    steps (``plan.for_step``: a compact run trains the dense layout in its dense phase)."""
    run_plan = plan_lib.for_step(plan_lib.from_config(config), step)
    model, tx, method = train_lib.build(run_plan)
    steps = make_steps(run_plan, model, tx, method)
    return model, steps.init, steps.train_step, steps.eval_step


def setup(config: ml_collections.ConfigDict, step: int = 0):
    """Builds data, model, optimizer, method and the jitted steps of a run (of its phase at
    ``step``, see :func:`build_steps`)."""
    plan_lib.from_config(config)
    plan_lib.check_vocabulary(config)
    data = data_lib.make_data(config.data, config.train.batch_size, config.data.seed)
    return (data, *build_steps(config, step))


def _dense_phase(config, compact_cfg, state, step: int):
    """At a compact run's dense switch (``step``): the densified state, the dense layout's
    ``(model, init, train_step, eval_step)`` and its checkpoint meta."""
    model, init, train_step, eval_step = build_steps(config, step)
    abstract = jax.eval_shape(init, jax.random.key(config.train.seed))
    state = jax.jit(lambda s: train_lib.dense_phase_state(compact_cfg, s),
                    out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(state)
    meta = ckpt_lib.make_meta(model.cfg, abstract, config)
    return state, (model, init, train_step, eval_step), meta


def restore_or_init(config, workdir: str, model, init, data_iter):
    """The newest checkpoint's state (checked against this run's config), else a new one.

    Returns:
      (state, checkpointer, meta, changes): ``changes`` are the settings this run changes
      relative to the checkpoint it resumes, ``{key: (old, new)}`` (only
      ``checkpoint.RESUMABLE`` keys get this far); empty for a fresh run.

    Raises:
      CheckpointError: the checkpoint is of another model, state structure or settings
        (the differing keys are listed), or unreadable.
      ValueError: ``train.num_steps`` is below the checkpoint's step.
    """
    rng = jax.random.key(config.train.seed)
    abstract = jax.eval_shape(init, rng)
    meta = ckpt_lib.make_meta(model.cfg, abstract, config)
    # Each save is on disk before training goes on: a SIGKILL then loses at most
    # train.checkpoint_every steps (an asynchronous save in flight would add the steps
    # taken while it is written; fault_injection.py measured up to 19 lost at 10).
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints, async_save=False)
    try:
        latest = ckpt.latest_step()
        if latest is None:
            state = init(rng)
            if config.train.get("init_from"):  # a fresh run starting from other weights
                from sparse_gpt.training import init_from
                state = init_from.warm_start(config, model, state, rng)
            return state, ckpt, meta, {}
        changes = ckpt.check_resume(meta, latest)
        if latest > config.train.num_steps:
            raise ValueError(
                f"train.num_steps={config.train.num_steps} is below step {latest} of the "
                f"newest checkpoint in {ckpt.directory}; pass --config.train.num_steps={latest} "
                "or more (or a fresh --workdir).")
        state, data_state, _ = ckpt.restore(abstract, meta, latest)
    except BaseException:
        ckpt.close()
        raise
    data_iter.set_state(data_state)
    if jax.process_index() == 0:
        changed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        print(f"resuming {workdir} from step {latest}" + (f" (changed: {changed})"
                                                          if changed else ""),
              file=sys.stderr, flush=True)
    return state, ckpt, meta, changes


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_after: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``.

    The run holds ``workdir``'s lock from start to end, and the first SIGTERM or SIGINT
    stops it after the current step with a checkpoint of that step (see
    ``sparse_gpt/training/workdir.py``).

    Args:
      config: a run config (``sparse_gpt.config.get_config``).
      workdir: run folder: checkpoints/, metrics.jsonl, tensorboard/, sample.txt,
        config.json (the current config), config_history.jsonl (one row per start).
      stop_after: stop (without a final checkpoint, like a crash) once this step is reached;
        used by tests to simulate an interrupted run.

    Returns:
      The last logged metrics, with the final validation metrics under ``"val"``, the state
      under ``"state"`` and the step this call started from under ``"start_step"``.

    Raises:
      ValueError: a bad config value or workdir (before anything is written).
      WorkdirInUseError: another live run holds ``workdir``.
      CheckpointError: the workdir's checkpoint does not fit this config.
      NonFiniteLossError: a non-finite loss or gradient; the newest checkpoint is the last
        good one.
      Stopped: a signal stopped the run; the newest checkpoint is of the step it names.
    """
    # Bad values fail here, before the workdir is touched.
    switch = plan_lib.dense_switch(plan_lib.from_config(config))
    workdir = workdir_lib.prepare(workdir)
    t = config.train
    with contextlib.ExitStack() as stack:   # closed in reverse: the lock is released last
        stack.enter_context(workdir_lib.WorkdirLock(workdir, jax.process_index()))
        stop = stack.enter_context(workdir_lib.StopOnSignal())
        data, model, init, train_step, eval_step = setup(config, ckpt_lib.latest_step(
            os.path.join(workdir, "checkpoints")))
        train_iter = data.train_iterator()
        state, ckpt, meta, changes = restore_or_init(config, workdir, model, init, train_iter)
        stack.callback(ckpt.close)
        start = saved = int(state.step)
        tokens_per_step = t.batch_size * config.data.seq_len
        writer = MetricsWriter(workdir, resume_step=start, primary=jax.process_index() == 0)
        stack.callback(writer.close)
        if jax.process_index() == 0:
            workdir_lib.record_start(workdir, ckpt_lib.config_dict(config), start, changes)
        val_batches = data.val_batches(t.eval_batches)
        last, val, stopped = {}, None, None
        pbar = _progress(t, start)
        if pbar is not None:
            stack.callback(pbar.close)
        tick, tick_step = time.perf_counter(), start
        for step in range(start, t.num_steps):
            state, metrics = train_step(state, next(train_iter))
            done = step + 1
            if done == switch:   # a compact run goes on in the dense layout
                state, (model, init, train_step, eval_step), meta = _dense_phase(
                    config, model.cfg, state, done)
                tick = time.perf_counter()  # the switch's compile is not training throughput
            is_last = done == t.num_steps
            if done % t.log_every == 0 or is_last:
                metrics = jax.device_get(metrics)
                _check_finite(state, ckpt)
                now = time.perf_counter()
                last = {"step": done, "loss": float(metrics["loss"]),
                        "grad_norm": float(metrics["grad_norm"]),
                        "lr": float(optim.lr_schedule(t)(step)),
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
                saved = done
            # Asked every step (multi-process: the preemption sync point); a signal after
            # the last step lets the finished run end normally.
            if stop.should_stop(done) and not is_last:
                if saved != done:
                    _check_finite(state, ckpt)
                    ckpt.save(done, state, train_iter.get_state(), meta)
                stopped = workdir_lib.Stopped(stop.signal_name, done, ckpt.directory)
                break
            if stop_after is not None and done >= stop_after:
                break
        ckpt.wait()
        if stopped is not None:
            raise stopped
        if start >= t.num_steps:   # a finished run, reopened: report its last row
            last = dict(writer.last)
        if stop_after is None or int(state.step) >= t.num_steps:
            _write_sample(config, workdir, model, state, data.tokenizer)
        if val is None and int(state.step) >= t.num_steps:  # a finished run, reopened
            val = evaluate(eval_step, state, val_batches, data.bytes_per_token)
    last.setdefault("step", int(state.step))
    last["val"] = val
    last["state"] = state
    last["start_step"] = start
    return last


def _check_finite(state: train_lib.TrainState, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = int(state.bad_step)
    if bad >= 0:
        ckpt.wait()
        latest = ckpt.latest_step()
        good = (f"The last good checkpoint is step {latest} in {ckpt.directory}"
                if latest is not None else "No checkpoint was written before it")
        raise NonFiniteLossError(
            f"Loss or gradient became NaN/inf at step {bad + 1}; stopped. {good}. Lower "
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
    if jax.process_index() != 0:   # every process samples (the state is sharded); one writes
        return
    with open(os.path.join(workdir, "sample.txt"), "w") as f:
        f.write(t.sample_prompt + tokenizer.decode(tokens) + "\n")


def open_run(workdir: str, step: int | None = None, *, for_eval: bool = True,
             what: str = "--workdir"):
    """Restores one checkpoint of a run folder under the config stored with it.

    The one restore sequence behind :func:`load_run` (evaluation) and ``init_from`` (weights
    of another run): the config comes from the checkpoint's meta (``config.json`` for
    checkpoints written before configs were stored), so a run is always rebuilt with the
    settings it was trained with.

    Args:
      workdir: a ``train.py`` run folder.
      step: the checkpoint step; default the newest.
      for_eval: build the run's data and jitted eval step (the state sharded on this host's
        mesh); else only the model, and the state is restored onto one device.
      what: how messages name ``workdir`` (the flag it came from).

    Returns:
      (config, model, state, data, eval_step); data and eval_step are None unless
      ``for_eval``.

    Raises:
      FileNotFoundError: no run, no checkpoint, or no checkpoint of ``step`` there.
      CheckpointError: the checkpoint is unreadable or does not fit its config.
    """
    path = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir, config_path = os.path.join(path, "checkpoints"), os.path.join(path, "config.json")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {workdir} is a file, not a run folder; pass the "
                                "--workdir of a train.py run.")
    if not os.path.isdir(ckpt_dir) and not os.path.isfile(config_path):
        raise FileNotFoundError(f"{what} {workdir} holds no run (no checkpoints/ or "
                                "config.json); pass the --workdir of a train.py run.")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
    try:
        steps = ckpt.steps() if os.path.isdir(ckpt_dir) else []
        if not steps:
            raise FileNotFoundError(f"{what} {workdir} has no checkpoint yet; train it first.")
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"{what} {workdir} has no checkpoint of step {step}; it has checkpoints of "
                f"steps {', '.join(map(str, steps))}. Pick one of those, or leave the step out "
                "for the newest.")
        step, saved = ckpt.read_meta(step)
        if "config" in saved:
            config = ml_collections.ConfigDict(saved["config"])
        elif os.path.isfile(config_path):
            with open(config_path) as f:
                config = ml_collections.ConfigDict(json.load(f))
        else:
            raise FileNotFoundError(f"{what} {workdir}: its checkpoint stores no config and "
                                    "config.json is missing; restore config.json.")
        data = eval_step = None
        if for_eval:
            data, model, init, _, eval_step = setup(config, step)
            abstract = jax.eval_shape(init, jax.random.key(config.train.seed))
        else:
            run_plan = plan_lib.for_step(plan_lib.from_config(config), step)
            model, tx, method = train_lib.build(run_plan)
            abstract = jax.eval_shape(lambda rng: train_lib.init_state(
                run_plan, model, tx, method, rng), jax.random.key(0))
            # Restore on one device whatever mesh wrote it (init_from reshards to its run).
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state, _, _ = ckpt.restore(abstract, ckpt_lib.make_meta(model.cfg, abstract), step)
    finally:
        ckpt.close()
    return config, model, state, data, eval_step


def load_run(workdir: str, step: int | None = None):
    """Loads a run for evaluation: (config, data, model, eval_step, state).

    Raises:
      FileNotFoundError: ``workdir`` holds no run, no checkpoint, or none of ``step``.
      CheckpointError: the checkpoint is unreadable or does not fit its config.
    """
    config, model, state, data, eval_step = open_run(workdir, step)
    return config, data, model, eval_step, state
