"""Runs that cannot be lost: the workdir lock, SIGTERM / SIGINT, resume settings, bad values.

Each test checks what is on disk afterwards (checkpoint steps, metrics rows, config history,
the lock file) or the parameters against an uninterrupted run, not only that something ran.
"""

import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from sparse_gpt import cli
from sparse_gpt import flops
from sparse_gpt.evaluation import sampling
from sparse_gpt.training import checkpoint
from sparse_gpt.training import metrics as metrics_lib
from sparse_gpt.training import trainer
from sparse_gpt.training import workdir as workdir_lib
from sparse_gpt.training.metrics import load_metrics

from helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.masks))]


def steps_on_disk(workdir):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A finished 8-step run (static sparsity 0.25) with checkpoints at steps 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = small_config(corpus, **{"sparsity.method": "static", "sparsity.density": 0.25})
    trainer.train(config, workdir)
    return config, workdir


# ------------------------------------------------------------------------- 1: the lock

HOLD_LOCK = """
import sys
sys.path.insert(0, sys.argv[2])
from sparse_gpt.training import workdir
lock = workdir.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        corpus, tmp_path, capfd):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir, ROOT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = small_config(corpus, **{"train.num_steps": 4})
        with pytest.raises(workdir_lib.WorkdirInUseError,
                           match=rf"PID {holder.pid} on host {socket.gethostname()}"):
            trainer.train(config, workdir)
        assert os.listdir(workdir) == ["run.lock"]   # refused before anything was written
    finally:
        holder.kill()   # SIGKILL: the holder never releases, the kernel drops its flock
        holder.wait()
    result = trainer.train(config, workdir)
    err = capfd.readouterr().err
    assert "taking over the lock of a run that ended without releasing it" in err
    assert f"PID {holder.pid}" in err
    assert result["step"] == 4 and steps_on_disk(workdir) == [4]
    # Released on exit: the record is cleared and the lock can be taken again at once.
    assert open(os.path.join(workdir, "run.lock")).read() == ""
    workdir_lib.WorkdirLock(workdir).acquire().release()


def test_workdir_that_is_a_file_is_refused(corpus, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        trainer.train(small_config(corpus), str(path))
    with pytest.raises(FileNotFoundError, match="is a file, not a run folder"):
        trainer.load_run(str(path))
    assert path.read_text() == "x"


# ------------------------------------------------------------------------- 4: signals

def train_py_args(corpus, workdir, **overrides):
    path, data_dir = corpus
    values = {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
              "model.max_len": 32, "data.seq_len": 32, "data.path": path,
              "data.data_dir": data_dir, "train.batch_size": 4, "train.warmup_steps": 2,
              "train.eval_every": 1000, "train.eval_batches": 2, "train.sample_tokens": 8,
              "train.progress_bar": "false", **overrides}
    return (["train.py", "--config", "sparse_gpt/config.py:tiny", f"--workdir={workdir}"]
            + [f"--config.{k}={v}" for k, v in values.items()])


def wait_for_rows(workdir, n, timeout=240, process=None):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} metrics rows in {timeout} s")


def test_sigterm_saves_the_current_step_and_a_second_run_is_refused_meanwhile(
        corpus, tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPARSE_GPT_JAX_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_backend_optimization_level=0")   # faster compiles
    # Periodic checkpoints never come (checkpoint_every > any step reached): a checkpoint
    # on disk can only be the signal's.
    args = train_py_args(corpus, workdir, **{"train.num_steps": 100000, "train.log_every": 1,
                                             "train.checkpoint_every": 100000})
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_rows(workdir, 2, process=first)
        second = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                capture_output=True, timeout=120)
        assert second.returncode == 1
        assert f"is in use by another run (PID {first.pid} on host {socket.gethostname()}" \
            in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == workdir_lib.STOPPED_EXIT_CODE == 75, err[-2000:]
    assert "Traceback" not in err
    last_line = err.strip().splitlines()[-1]
    step = int(last_line.split("after step ")[1].split(":")[0])
    assert last_line.startswith(f"stopped by SIGTERM after step {step}: checkpoint {step} is in")
    assert steps_on_disk(workdir) == [step]
    # Metrics flushed up to the saved step, one row per step (log_every=1), none past it.
    assert [r["step"] for r in load_metrics(workdir)] == list(range(1, step + 1))
    assert open(os.path.join(workdir, "run.lock")).read() == ""


def test_sigint_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(corpus, tmp_path):
    config = small_config(corpus, **{"train.num_steps": 100000, "train.log_every": 1,
                                     "train.checkpoint_every": 100000})
    workdir = str(tmp_path / "run")
    done = threading.Event()

    def interrupt():   # Ctrl-C once the run is training
        wait_for_rows(workdir, 3)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)
    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    try:
        with pytest.raises(workdir_lib.Stopped) as stopped:
            trainer.train(config, workdir, stop_after=3000)
    finally:
        done.set()
    step = stopped.value.step
    assert stopped.value.signal_name == "SIGINT" and step >= 3
    assert steps_on_disk(workdir) == [step]
    assert [r["step"] for r in load_metrics(workdir)] == list(range(1, step + 1))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # given back
    resumed = trainer.train(config, workdir, stop_after=step + 3)
    reference = trainer.train(config, str(tmp_path / "reference"), stop_after=step + 3)
    assert int(resumed["state"].step) == step + 3
    for a, b in zip(leaves(reference["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert load_metrics(workdir) == [
        {**r, "tokens_per_sec": s["tokens_per_sec"]}
        for r, s in zip(load_metrics(str(tmp_path / "reference")), load_metrics(workdir))]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPARSE_GPT_JAX_CACHE=str(tmp_path / "cache"),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SPARSE_GPT_NUM_PROCESSES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0")
    args = train_py_args(corpus, workdir, **{
        "train.num_steps": 100000, "train.log_every": 1, "train.checkpoint_every": 100000,
        "train.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4})
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                              env=dict(env, SPARSE_GPT_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    try:
        wait_for_rows(workdir, 3, process=procs[0])
        procs[1].send_signal(signal.SIGTERM)   # process 0 hears of it only through JAX
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], [e[-1500:] for e in errs]
    lines = [e.strip().splitlines()[-1] for e in errs]
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert lines == [lines[0]] * 2 and lines[0].startswith(f"stopped by SIGTERM after step "
                                                           f"{step}: checkpoint {step}")
    assert steps_on_disk(workdir) == [step]


SIGNAL_TWICE = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from sparse_gpt.training import workdir
with workdir.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    print("asked to stop:", stop.should_stop(1), stop.signal_name, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once(corpus):
    start = time.time()
    run = subprocess.run([sys.executable, "-c", SIGNAL_TWICE, ROOT], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == -signal.SIGTERM   # ended by the signal itself, not after 10 s
    assert time.time() - start < 9
    assert run.stdout.strip() == "asked to stop: True SIGTERM"
    assert "SIGTERM again: exiting at once, without a checkpoint." in run.stderr
    # In-process SIGINT: the second one is the previous handler's KeyboardInterrupt.
    with workdir_lib.StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)   # the handler runs in the main thread, at the next chance
        assert stop.should_stop(5) and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -------------------------------------------------------- 2 and 6: values refused early

@pytest.mark.parametrize("overrides, message", [
    ({"train.keep_checkpoints": 0}, r"train.keep_checkpoints=0 must be at least 1 \(0 would "
                                    r"delete every checkpoint"),
    ({"train.keep_checkpoints": -1}, r"train.keep_checkpoints=-1 must be at least 1"),
    ({"train.eval_batches": 0}, r"train.eval_batches=0 must be at least 1"),
    ({"train.lr": "nan"}, r"train.lr=nan must be a finite number > 0"),
    ({"train.lr": -1.0}, r"train.lr=-1.0 must be a finite number > 0"),
    ({"train.lr": "inf"}, r"train.lr=inf must be"),
    ({"train.b2": 1.5}, r"train.b2=1.5 must be a finite number in \[0, 1\)"),
    ({"train.sample_tokens": -1}, r"train.sample_tokens=-1 must be >= 0"),
])
def test_bad_train_values_are_refused_before_the_workdir_is_touched(corpus, tmp_path,
                                                                    overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.train(small_config(corpus, **overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_checkpointer_refuses_to_keep_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints=0.*at least the newest"):
        checkpoint.Checkpointer(str(tmp_path / "c"), keep=0)


def test_sampling_and_cli_values_are_refused():
    for kwargs, message in [({"num_tokens": -5}, "num_tokens=-5 must be an integer >= 0"),
                            ({"temperature": -1.0}, "temperature=-1.0 must be a finite"),
                            ({"temperature": float("nan")}, "temperature=nan must be"),
                            ({"top_k": -1}, "top_k=-1 must be an integer >= 0"),
                            ({"top_k": 300}, "top_k=300 .*<= the vocabulary size 257")]:
        request = {"num_tokens": 4, "temperature": 0.0, "top_k": 0, **kwargs}
        with pytest.raises(ValueError, match=message):
            sampling.check_request([1, 2], request.pop("num_tokens"), 32, vocab_size=257,
                                   **request)
    with pytest.raises(ValueError, match="exceed the model context of 32; lower --num_tokens "
                                         "to at most 30"):
        sampling.check_request([1, 2], 31, 32)
    with pytest.raises(ValueError, match="shorten --prompt to fewer than 32 tokens"):
        sampling.check_request(list(range(40)), 3, 32)
    with pytest.raises(cli.ConfigError, match="README.md: not a Python file"):
        cli.parse_args(["--config", os.path.join(ROOT, "README.md")])


def test_config_file_with_an_error_is_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(preset):\n    return {\n")
    with pytest.raises(cli.ConfigError, match=r"bad.py line \d does not load \(SyntaxError"):
        cli.parse_args(["--config", str(bad)])


@pytest.mark.parametrize("flag, value, message", [
    ("--eval_batches", "-1", "must be at least 1"), ("--eval_batches", "0", "must be at least 1"),
    ("--num_tokens", "-5", "must be >= 0"), ("--temperature", "-1", "must be a finite number"),
    ("--temperature", "nan", "must be a finite number"), ("--top_k", "-1", "must be >= 0"),
])
def test_eval_py_flags_are_refused_before_loading(tmp_path, flag, value, message):
    run = subprocess.run([sys.executable, "eval.py", f"--workdir={tmp_path}", flag, value],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"argument {flag}: {value} {message}" in run.stderr
    assert "Traceback" not in run.stderr


def load_eval_script():
    spec = importlib.util.spec_from_file_location("eval_script", os.path.join(ROOT, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_errors_of_a_trained_run(trained, monkeypatch, tmp_path):
    config, workdir = trained
    with pytest.raises(FileNotFoundError,
                       match=r"no checkpoint of step 7; it has checkpoints of steps 4, 8\."):
        trainer.load_run(workdir, step=7)
    # A prompt too long for the context fails before the (long) evaluation.
    monkeypatch.setattr(trainer, "evaluate", lambda *a: pytest.fail("evaluated first"))
    with pytest.raises(SystemExit) as exit_:
        load_eval_script().main([f"--workdir={workdir}", "--prompt=" + "x" * 30,
                                 "--num_tokens=5"])
    assert str(exit_.value.code).startswith("error: Prompt (30 tokens) + 5 new tokens exceed "
                                            "the model context of 32")
    # A corrupt checkpoint is named in one short line.
    broken = str(tmp_path / "broken")
    shutil.copytree(workdir, broken)
    for path in glob.glob(os.path.join(broken, "checkpoints", "8", "state", "**", "*"),
                          recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    with pytest.raises(checkpoint.CheckpointError) as err:
        trainer.load_run(broken)
    message = str(err.value)
    assert "checkpoints/8 is corrupt or incomplete" in message and "Delete that step" in message
    assert "\n" not in message and len(message) < 600


def test_reopening_a_finished_run_reports_its_last_row(trained):
    config, workdir = trained
    rows = load_metrics(workdir)
    result = trainer.train(config, workdir)
    assert result["step"] == result["start_step"] == 8
    assert result["loss"] == rows[-1]["loss"]
    assert result["val"]["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-6)
    assert load_metrics(workdir) == rows


# --------------------------------------------------------------- 3: resume settings

def test_resume_with_other_sparsity_is_refused_and_safe_changes_are_recorded(trained,
                                                                             tmp_path):
    config, source = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    before = {name: open(os.path.join(workdir, name)).read()
              for name in ("config.json", "config_history.jsonl", "metrics.jsonl")}
    changed = small_config(corpus_of(config), **{
        "sparsity.method": "static", "sparsity.density": 0.125, "train.seed": 1,
        "train.num_steps": 12})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"checkpoints/8 was trained with other settings than this run: "
                             r"sparsity.density: 0.25 -> 0.125; train.seed: 0 -> 1\. "):
        trainer.train(changed, workdir)
    for name, text in before.items():   # a refused resume writes nothing
        assert open(os.path.join(workdir, name)).read() == text, name
    assert steps_on_disk(workdir) == [4, 8]
    # num_steps (extension), lr and logging may change: accepted, and recorded.
    more = small_config(corpus_of(config), **{
        "sparsity.method": "static", "sparsity.density": 0.25, "train.num_steps": 12,
        "train.lr": 1e-3, "train.log_every": 4})
    result = trainer.train(more, workdir)
    assert result["step"] == 12 and steps_on_disk(workdir) == [4, 8, 12]
    history = read_jsonl(os.path.join(workdir, "config_history.jsonl"))
    assert history[:-1] == read_jsonl(os.path.join(source, "config_history.jsonl"))
    assert (history[0]["event"], history[0]["step"]) == ("start", 0)
    assert (history[-1]["event"], history[-1]["step"]) == ("resume", 8)
    assert history[-1]["changes"] == {"train.log_every": [2, 4], "train.lr": [3e-3, 1e-3],
                                      "train.num_steps": [8, 12]}
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["lr"] == 1e-3
    assert [r["step"] for r in load_metrics(workdir)] == [2, 4, 6, 8, 12]
    # Each checkpoint keeps the config it was written under; eval uses the checkpoint's.
    for step, lr in ((8, 3e-3), (12, 1e-3)):
        ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
        assert ckpt.read_meta(step)[1]["config"]["train"]["lr"] == lr
        ckpt.close()
    loaded, _, _, _, state = trainer.load_run(workdir, step=8)
    assert loaded.train.lr == 3e-3 and loaded.sparsity.density == 0.25
    assert float(flops.density(state.masks)) == 0.25
    # Shortening below the checkpoint is refused, naming the key.
    with pytest.raises(ValueError, match=r"train.num_steps=10 is below step 12"):
        trainer.train(small_config(corpus_of(config), **{
            "sparsity.method": "static", "sparsity.density": 0.25, "train.num_steps": 10}),
            workdir)


def corpus_of(config):
    return config.data.path, config.data.data_dir


# ------------------------------------------------------------------ 6: metrics.jsonl

def test_torn_last_metrics_line_is_dropped_with_a_warning_and_the_rewrite_is_atomic(
        tmp_path, capfd, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo'
    path.write_text(text)
    # A failed rewrite (here: the rename) leaves the old file whole.
    monkeypatch.setattr(metrics_lib.os, "replace", lambda *a: (_ for _ in ()).throw(OSError))
    with pytest.raises(OSError):
        metrics_lib.MetricsWriter(str(tmp_path), resume_step=4, tensorboard=False)
    assert path.read_text() == text
    monkeypatch.undo()
    writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=6, tensorboard=False)
    writer.write({"step": 8, "loss": 0.1})
    writer.close()
    assert f"warning: {path}: dropped its torn last line 4" in capfd.readouterr().err
    assert load_metrics(str(tmp_path)) == rows + [{"step": 8, "loss": 0.1}]
    path.write_text(json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 2 is not JSON"):
        metrics_lib.MetricsWriter(str(tmp_path), resume_step=4, tensorboard=False)


def test_only_the_primary_process_writes_metrics(tmp_path):
    """Processes 1.. of a multi-process run write nothing (no rewrite, no rows, no
    TensorBoard files) but still know the resumed row and the rows they were given."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    other = metrics_lib.MetricsWriter(str(tmp_path), resume_step=4, primary=False)
    assert other.last == rows[1]
    other.write({"step": 6, "loss": 0.5})
    assert other.last == {"step": 6, "loss": 0.5}
    other.close()
    assert path.read_text() == text                       # not truncated to step 4 either
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
