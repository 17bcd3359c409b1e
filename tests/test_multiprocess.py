"""Two JAX processes on this machine (4 fake CPU devices each) train like one process of 8.

The processes (``tests/multiprocess_worker.py``) start ``jax.distributed`` over loopback
(CPU collectives: gloo, JAX's default), run ``trainer.train`` on a data x fsdp = 2 x 4 mesh,
read only their own block of every global batch and place it on their own devices. The oracle
is the same config trained in this pytest process on its 8 devices: the same losses, the same
parameters, and checkpoints that resume across the two process counts in both directions.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import multiprocess_worker as worker
from sparse_gpt.data import dataset as data_lib
from helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Batch 8 splits over all 8 devices: process p holds rows [4p, 4p + 4) of every batch.
OVERRIDES = {"mesh.data": 2, "mesh.fsdp": 4, "train.batch_size": 8, "train.num_steps": 4,
             "train.log_every": 1, "train.eval_every": 2, "train.checkpoint_every": 2}
TIMEOUT_S = 240    # for the whole test; ~45 s on an idle 2-core machine
# Cross-process all-reduces (gloo) may sum in another order than one process's XLA: measured
# loss differences up to 1e-7 relative, parameter differences up to 5e-7.
RTOL, ATOL = 1e-6, 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(job: dict, folder, n: int = 2) -> list:
    """Starts ``n`` workers on ``job``; returns ``(process, log path)`` pairs."""
    job_path = os.path.join(folder, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               SPARSE_GPT_NUM_PROCESSES=str(n), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    started = []
    try:
        for i in range(n):
            log = os.path.join(folder, f"process{i}.log")
            with open(log, "w") as f:
                started.append((subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                     job_path], env=dict(env, SPARSE_GPT_PROCESS_ID=str(i)), stdout=f,
                    stderr=subprocess.STDOUT, start_new_session=True), log))
    except BaseException:
        stop_processes(started)
        raise
    return started


def stop_processes(started: list) -> None:
    """Kills what still runs (with anything it started) and reaps it."""
    for p, _ in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def wait_processes(started: list, deadline: float) -> None:
    """Waits for the workers; fails with their logs if one fails or time runs out."""
    try:
        # A process that fails leaves the others waiting in a collective: stop at once.
        while (any(p.poll() is None for p, _ in started)
               and not any(p.poll() for p, _ in started) and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        stop_processes(started)
    codes = [p.returncode for p, _ in started]
    if codes != [0] * len(started):
        tails = "\n".join(f"--- process {i} (exit {c}):\n{open(log).read()[-3000:]}"
                          for i, (c, (_, log)) in enumerate(zip(codes, started)))
        pytest.fail(f"worker processes failed or ran past {TIMEOUT_S} s:\n{tails}")


def resumable_copy(workdir, to):
    """A copy of a finished run whose newest checkpoint is step 2 (step 4 deleted)."""
    shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("run.lock*"))
    shutil.rmtree(os.path.join(to, "checkpoints", "4"))
    return str(to)


def assert_close(params_a, params_b):
    assert len(params_a) == len(params_b)
    for a, b in zip(params_a, params_b):
        np.testing.assert_allclose(a, b, rtol=10 * RTOL, atol=ATOL)


def test_two_processes_train_and_resume_like_one(corpus, tmp_path):
    config = small_config(corpus, **OVERRIDES)
    out, marker = tmp_path / "out", tmp_path / "one_copy" / "config.json"
    out.mkdir()
    job = {"corpus": list(corpus), "out": str(out), "compile_cache": str(tmp_path / "xla"),
           "runs": {"fresh": {"workdir": str(tmp_path / "two"), "overrides": OVERRIDES},
                    # The single process's run, finished at step 4: train() restores it
                    # and evaluates. Started once this process has trained it.
                    "reopened": {"workdir": str(tmp_path / "one_copy"), "after": str(marker),
                                 "overrides": OVERRIDES}}}
    data_lib.make_data(config.data, 8)   # built here first: the workers then only read it
    started = start_processes(job, str(tmp_path))   # they train while this process does
    deadline = time.monotonic() + TIMEOUT_S
    try:
        one, one_params = worker.record(config, str(tmp_path / "one"))
        shutil.copytree(tmp_path / "one", tmp_path / "one_copy.tmp",
                        ignore=shutil.ignore_patterns("run.lock*"))
        os.rename(tmp_path / "one_copy.tmp", tmp_path / "one_copy")   # config.json appears
    except BaseException:
        stop_processes(started)
        raise
    wait_processes(started, deadline)
    assert sorted(one["losses"]) == ["1", "2", "3", "4"] and marker.exists()

    runs = {name: (json.load(open(out / f"{name}.json")),
                   list(np.load(out / f"{name}.npz").values())) for name in job["runs"]}
    # Two processes of 4 devices = one process of 8: losses, validation loss, parameters.
    two, two_params = runs["fresh"]
    assert two["losses"].keys() == one["losses"].keys()
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, rel=RTOL), step
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL)
    assert_close(two_params, one_params)
    # Process 0 alone wrote the run's files: one row per step, one TensorBoard event file.
    written = [json.loads(line)["step"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert written == [1, 2, 3, 4]
    assert len(os.listdir(tmp_path / "two" / "tensorboard")) == 1
    # The single process's checkpoint, restored by two processes: the same state, exactly.
    reopened, reopened_params = runs["reopened"]
    for a, b in zip(reopened_params, one_params):
        np.testing.assert_array_equal(a, b)
    assert reopened["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL)
    # Each process read only its block of each batch of 8 and placed only those rows.
    for p in range(2):
        seen = json.load(open(out / f"process{p}.json"))
        assert (seen["process"], seen["processes"], seen["devices"],
                seen["local_devices"]) == (p, 2, 8, 4)
        assert seen["rows"] == [[4 * p, 4 * p + 4]] * 2           # one make_data per run
        assert seen["placed_rows"] and all(r == [4] for r in seen["placed_rows"])
        # Blocks go straight to their devices where each process owns its block; otherwise
        # they are gathered first. Either way the array is the global batch.
        # (fsdp only: process 0's devices hold all 8 rows; replicated: every device does.)
        assert seen["placement"] == {"data+fsdp": [True, True], "fsdp": [False, True],
                                     "replicated": [False, True]}

    # The two processes' step-2 checkpoint, resumed by one process, trains on to the same end.
    back, back_params = worker.record(config, resumable_copy(tmp_path / "two",
                                                             tmp_path / "from_two"))
    for step in ("3", "4"):
        assert back["losses"][step] == pytest.approx(one["losses"][step], rel=RTOL)
    assert_close(back_params, one_params)


# ----------------------------------------------------------------- in this process (no workers)

def test_distributed_start_reads_count_and_id(monkeypatch):
    from sparse_gpt.parallel import sharding
    calls = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize",
                        lambda **kw: calls.append(kw))
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "SPARSE_GPT_NUM_PROCESSES": "2",
           "SPARSE_GPT_PROCESS_ID": "1"}
    assert sharding.maybe_initialize_distributed(env)
    assert calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                          process_id=1)]
    for bad in ({"SPARSE_GPT_PROCESS_ID": None}, {"SPARSE_GPT_PROCESS_ID": "2"},
                {"SPARSE_GPT_NUM_PROCESSES": "two"}):
        env_bad = {k: v for k, v in {**env, **bad}.items() if v is not None}
        with pytest.raises(ValueError, match="set both SPARSE_GPT_NUM_PROCESSES.*"
                                             "JAX_COORDINATOR_ADDRESS"):
            sharding.maybe_initialize_distributed(env_bad)
    assert len(calls) == 1


def test_put_batch_refuses_a_batch_of_another_size():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sparse_gpt.parallel import sharding
    sh = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    x = np.arange(8 * 2, dtype=np.int32).reshape(8, 2)
    placed = sharding.put_batch({"x": x}, sh, batch_size=8)["x"]
    np.testing.assert_array_equal(np.asarray(placed), x)
    assert placed.sharding == sh
    with pytest.raises(ValueError, match="A batch of 4 rows: expected the global batch of "
                                         "train.batch_size=8 rows"):
        sharding.put_batch({"x": x[:4]}, sh, batch_size=8)
