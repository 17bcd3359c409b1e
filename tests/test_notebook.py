"""notebooks/ablations.ipynb runs top to bottom (few steps, small model) and its table holds
numbers we can check by hand: dense FLOPs in closed form, the sparse arms below dense."""

import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, N, D, L, B, V = 8, 2, 32, 32, 4, 264


@pytest.fixture(scope="module")
def ablations(corpus, tmp_path_factory):
    path, data_dir = corpus
    workdir = str(tmp_path_factory.mktemp("ablations"))
    overrides = {"model.n_layers": N, "model.d_model": D, "model.n_heads": 2,
                 "model.max_len": L, "data.seq_len": L, "train.batch_size": B,
                 "train.warmup_steps": 2, "train.eval_batches": 2,
                 "sparsity.update_every": 2, "data.path": path, "data.data_dir": data_dir}
    env = {"ABLATION_STEPS": str(STEPS), "ABLATION_WORKDIR": workdir,
           "ABLATION_OVERRIDES": ",".join(f"{k}={v}" for k, v in overrides.items()),
           # One CPU device in the kernel (not the 8 fake ones of conftest), quick compiles.
           "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "ablations.ipynb"), as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with open(os.path.join(workdir, "ablations.json")) as f:
        return workdir, json.load(f)


def test_notebook_table_matches_closed_forms(ablations):
    workdir, out = ablations
    assert out["steps"] == STEPS
    table = {row["arm"]: row for row in out["table"]}
    assert set(table) == {"dense", "static", "rigl", "mst", "sat"}
    t = B * L
    f = 4 * D
    kernels = N * (3 * D * D + D * D + 2 * D * f)
    dense_step = 6 * t * kernels + 12 * B * D * N * L * L + 6 * t * D * V
    assert table["dense"]["flops"] == pytest.approx(STEPS * dense_step, rel=1e-6)
    for arm in ("static", "rigl", "mst", "sat"):
        assert table[arm]["flops_vs_dense"] < 1.0, arm
    # static at 25% density (ERK): the sparse kernels cost 25% of theirs, the rest is dense.
    static_step = 6 * t * 0.25 * kernels + 12 * B * D * N * L * L + 6 * t * D * V
    assert table["static"]["flops"] == pytest.approx(STEPS * static_step, rel=1e-3)
    for row in table.values():
        assert math.isfinite(row["val_loss"]) and row["val_loss"] < math.log(257)
        assert row["tokens_per_sec"] > 0
    assert os.path.getsize(os.path.join(workdir, "ablations.png")) > 10_000
