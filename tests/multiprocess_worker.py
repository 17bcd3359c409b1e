"""One JAX process of ``tests/test_multiprocess.py``: trains runs and records what they did.

    python tests/multiprocess_worker.py JOB.json

The environment says which process this is (``JAX_COORDINATOR_ADDRESS``,
``SPARSE_GPT_NUM_PROCESSES``, ``SPARSE_GPT_PROCESS_ID``, ``JAX_PLATFORMS=cpu``, ``XLA_FLAGS``
with the device count); ``sharding.maybe_initialize_distributed`` starts ``jax.distributed``
from it. ``JOB.json`` holds ``corpus`` (the test's corpus fixture), ``runs`` (name ->
``{"workdir", "overrides"}`` of ``helpers.small_config``, and optionally ``after``: a file to
wait for) and ``out`` (a folder): each process writes ``out/process<i>.json`` (what it read
and placed) and process 0 writes each run's record (:func:`record`) as ``out/<run>.json`` and
``out/<run>.npz``. The test calls :func:`record` too, so one process and several produce their
records the same way.
"""

import json
import os
import sys
import time

import numpy as np


def record(config, workdir: str) -> tuple[dict, list[np.ndarray]]:
    """Trains (or resumes) ``config`` in ``workdir`` with ``trainer.train``.

    Returns:
      ``({"losses": {step: loss}, "val_loss": ...}, params)``: the losses of
      ``workdir/metrics.jsonl`` (process 0; ``{}`` on the others, which do not write it) and
      the final parameters gathered from every process.
    """
    import jax
    from jax.experimental import multihost_utils
    from sparse_gpt.training import metrics
    from sparse_gpt.training import trainer
    result = trainer.train(config, workdir)
    params = [np.asarray(multihost_utils.process_allgather(p, tiled=True))
              for p in jax.tree.leaves(result["state"].params)]
    # Only process 0 writes metrics.jsonl (the others may read it before its last flush).
    losses = ({str(r["step"]): r["loss"] for r in metrics.load_metrics(workdir)}
              if jax.process_index() == 0 else {})
    return {"losses": losses, "val_loss": result["val"]["loss"]}, params


def _watch(seen: dict) -> None:
    """Records the rows each process reads and the batches it hands to ``put_batch``."""
    from sparse_gpt.data import dataset as data_lib
    from sparse_gpt.parallel import sharding
    make_data, put_batch = data_lib.make_data, sharding.put_batch

    def watched_make_data(*args, **kwargs):
        data = make_data(*args, **kwargs)
        seen["rows"].append([data.rows.start, data.rows.stop])
        return data

    def watched_put_batch(batch, *args, **kwargs):
        seen["placed_rows"].append(sorted({len(v) for v in batch.values()}))
        return put_batch(batch, *args, **kwargs)

    data_lib.make_data, sharding.put_batch = watched_make_data, watched_put_batch


def check_placement() -> dict[str, list]:
    """Places this process's block of a known global batch under three shardings.

    Returns:
      sharding name -> ``[whether each process owns its block, whether the placed array is
      the global batch]`` (read back through an all-gather).
    """
    import jax
    import ml_collections
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sparse_gpt.parallel import sharding
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1,
                                                             stage=1)))
    whole = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    block = whole[4 * jax.process_index():4 * jax.process_index() + 4]
    out = {}
    for name, spec in (("data+fsdp", P(("data", "fsdp"))), ("fsdp", P("fsdp")),
                       ("replicated", P())):
        sh = NamedSharding(mesh, spec)
        placed = sharding.put_batch({"x": block}, sh, batch_size=8)["x"]
        back = np.asarray(multihost_utils.process_allgather(placed, tiled=True))
        out[name] = [sharding._owns_its_block(sh, whole.shape),
                          bool(np.array_equal(back, whole))]
    return out


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    from sparse_gpt.parallel import sharding
    if not sharding.maybe_initialize_distributed():
        raise SystemExit("multiprocess_worker: no JAX_COORDINATOR_ADDRESS in the environment")
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if job.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", job["compile_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from helpers import small_config
    seen = {"rows": [], "placed_rows": [], "process": jax.process_index(),
            "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count()}
    _watch(seen)
    for name, run in job["runs"].items():
        config = small_config(tuple(job["corpus"]), **run["overrides"])
        deadline = time.monotonic() + 300
        while run.get("after") and not os.path.exists(run["after"]):
            if time.monotonic() > deadline:   # the test process died or never wrote it
                raise SystemExit(f"multiprocess_worker: {run['after']} never appeared")
            time.sleep(0.1)
        t = time.perf_counter()
        rec, params = record(config, run["workdir"])
        print(f"run {name}: {time.perf_counter() - t:.1f} s", flush=True)
        if jax.process_index() == 0:
            with open(os.path.join(job["out"], f"{name}.json"), "w") as f:
                json.dump(rec, f)
            np.savez(os.path.join(job["out"], f"{name}.npz"), *params)
    seen["placement"] = check_placement()
    with open(os.path.join(job["out"], f"process{jax.process_index()}.json"), "w") as f:
        json.dump(seen, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
