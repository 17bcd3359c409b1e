"""The GPU suite (benchmarks/gpu_suite.sh) and its kernel check (benchmarks/pallas_check.py).

The check must fail for a wrong kernel, so its comparison is tested on registered stub
backends that perturb one product (the others delegate to the dense oracle) and expect
exactly that product's line to fail (compact weights too: a dW with its slots out of order
must fail); ``gpu_suite.sh --smoke`` is then run end to end on CPU
(Pallas kernels in interpret mode) and its report must say PASS on every line.
"""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

import kernels
from kernels.attention import reference as attention_reference
from kernels.bsmm import reference as bsmm_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pc = _load("pallas_check")


def _verdicts(checks):
    """{product: passed} from check names ``.../<product>``."""
    return {c.name.rsplit("/", 1)[1]: c.passed for c in checks}


def test_compare_passes_within_tolerance_and_fails_outside_or_on_nan():
    want = jnp.linspace(-2.0, 4.0, 64, dtype=jnp.float32).reshape(8, 8)
    ok = pc.compare("c", "8x8", want + 1e-3, want, tol=1e-3)
    assert ok.passed and math.isclose(ok.max_rel, 1e-3 / 4.0, rel_tol=1e-3)
    bad = pc.compare("c", "8x8", want.at[3, 5].add(0.05), want, tol=1e-3)
    assert not bad.passed and "FAIL" in bad.line()
    assert math.isclose(bad.max_abs, 0.05, rel_tol=1e-3)
    assert not pc.compare("c", "8x8", want.at[0, 0].set(jnp.nan), want, tol=1.0).passed
    assert not pc.compare("c", "8x8", want[:4], want, tol=1.0).passed   # shape mismatch
    zero = jnp.zeros((8, 8))
    assert pc.compare("c", "8x8", zero, zero, tol=0.0).passed            # "exactly zero"
    assert not pc.compare("c", "8x8", zero.at[1, 1].set(1e-30), zero, tol=0.0).passed


def _stub_matmul(forward_scale=1.0, dense_dw=False):
    """The oracle's three products with the forward scaled and/or dW not masked."""
    def matmul(x, w, meta, out_dtype):
        return (bsmm_reference.matmul(x, w, meta, jnp.float32) * forward_scale).astype(out_dtype)

    def sddmm(x, dy, meta, out_dtype):
        if not dense_dw:
            return bsmm_reference.sddmm(x, dy, meta, out_dtype)
        return jnp.dot(x.T, dy, preferred_element_type=jnp.float32).astype(out_dtype)

    return kernels.MatmulBackend(matmul, bsmm_reference.matmul_t, sddmm)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_check_matmul_fails_exactly_the_wrong_product(dtype):
    case = pc.MatmulCase("odd", 40, 96, 160, 32)    # empty block row and column
    mask = pc.matmul_masks(case)["unbalanced"]
    assert not mask.any(0).all() and not mask.any(1).all()
    kernels.register_backend("stub_wrong_fwd", _stub_matmul(forward_scale=1.05))
    kernels.register_backend("stub_dense_dw", _stub_matmul(dense_dw=True))
    try:
        got = {b: _verdicts(pc.check_matmul(case, mask, dtype, backend=b))
               for b in ("reference", "stub_wrong_fwd", "stub_dense_dw")}
    finally:
        kernels.unregister_backend("stub_wrong_fwd")
        kernels.unregister_backend("stub_dense_dw")
    everything = {"y": True, "dX": True, "dW": True, "dW-off-mask": True}
    assert got["reference"] == everything
    assert got["stub_wrong_fwd"] == {**everything, "y": False}
    assert got["stub_dense_dw"] == {**everything, "dW": False, "dW-off-mask": False}


def _stub_compact(forward_scale=1.0, reversed_slots=False):
    """The oracle's compact products with the forward scaled and/or dW's slots reversed."""
    def matmul(x, blocks, cmeta, out_dtype):
        y = bsmm_reference.compact_matmul(x, blocks, cmeta, jnp.float32)
        return (y * forward_scale).astype(out_dtype)

    def sddmm(x, dy, cmeta, out_dtype):
        dblocks = bsmm_reference.compact_sddmm(x, dy, cmeta, out_dtype)
        return dblocks[:, ::-1] if reversed_slots else dblocks

    compact = kernels.CompactBackend(matmul, bsmm_reference.compact_matmul_t, sddmm)
    return kernels.MatmulBackend(bsmm_reference.matmul, bsmm_reference.matmul_t,
                                 bsmm_reference.sddmm, compact=compact)


def test_check_compact_fails_exactly_the_wrong_product():
    case = pc.CompactCase("odd", 40, 96, 160, 32, 2)    # T = 2 of Kb = 3, slots unsorted
    kernels.register_backend("stub_compact_fwd", _stub_compact(forward_scale=1.05))
    kernels.register_backend("stub_compact_slots", _stub_compact(reversed_slots=True))
    try:
        got = {b: _verdicts(pc.check_compact(case, jnp.float32, backend=b))
               for b in ("reference", "stub_compact_fwd", "stub_compact_slots")}
    finally:
        kernels.unregister_backend("stub_compact_fwd")
        kernels.unregister_backend("stub_compact_slots")
    everything = {"y": True, "dX": True, "dW": True}
    assert got["reference"] == everything
    assert got["stub_compact_fwd"] == {**everything, "y": False}
    assert got["stub_compact_slots"] == {**everything, "dW": False}


def test_check_attention_fails_a_wrong_forward():
    def forward(q, k, v, meta, mask_fn, scale):
        o, lse = attention_reference.forward(q, k, v, meta, mask_fn, scale)
        return o * 1.05, lse

    case = pc.SMOKE_CASES[-1]
    assert isinstance(case, pc.AttentionCase)
    kernels.register_attention_backend(
        "stub_wrong_out", kernels.AttentionBackend(forward, attention_reference.backward))
    try:
        bad = _verdicts(pc.check_attention(case, jnp.float32, backend="stub_wrong_out"))
    finally:
        kernels.unregister_attention_backend("stub_wrong_out")
    assert not bad["out"]
    assert all(_verdicts(pc.check_attention(case, jnp.float32, backend="reference")).values())


def test_a_check_that_raises_is_a_fail_line(capsys):
    def broken(*args):
        raise RuntimeError("Triton lowering failed\nsecond line")

    kernels.register_backend("stub_raises", kernels.MatmulBackend(broken, broken, broken))
    try:
        checks = pc.run_checks(pc.SMOKE_CASES[:1], [jnp.float32],
                               backend="stub_raises", attention_backend=None)
    finally:
        kernels.unregister_backend("stub_raises")
    assert len(checks) == 3 and not any(c.passed for c in checks)   # one per mask
    assert "RuntimeError: Triton lowering failed" in checks[0].line()
    assert "FAIL (RuntimeError" in pc.markdown(checks, "t")
    assert "Triton lowering failed" in capsys.readouterr().err      # the traceback


def _run_suite(tmp_path, **env):
    out = tmp_path / "suite"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke"],
        env={**os.environ, "OUT": str(out), **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600)
    return proc, out


def _step_rows(summary):
    """{step: (status, rc)} from summary.md's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("step", "---"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def _assert_checks_and_bench_ok(proc, out):
    rows = _step_rows((out / "summary.md").read_text())
    assert rows["pallas_check"] == ("ok", "0"), proc.stdout[-3000:]
    assert rows["bsmm_bench"] == ("ok", "0"), proc.stdout[-3000:]
    report = (out / "pallas_check.md").read_text()
    assert "device cpu:" in report and "jax " in report
    lines = [l for l in report.splitlines() if l.startswith(("| bsmm/", "| attn/", "| compact/"))]
    assert len(lines) >= 60, report
    assert all(l.endswith("| PASS |") for l in lines), report
    assert {"y", "dX", "dW", "dW-off-mask", "out", "dQ", "dK", "dV"} <= {
        l.split(" | ")[0].rsplit("/", 1)[1] for l in lines}
    assert {l.split(" | ")[0].rsplit("/", 1)[1] for l in lines
            if l.startswith("| compact/")} == {"y", "dX", "dW"}
    table = (out / "block_sparse_matmul.txt").read_text()
    assert "compact-pallas_gpu" in table and "fwd+bwd" in table
    assert "failed" not in table, table
    for step in ("preflight", "pallas_check", "bsmm_bench"):
        assert (out / f"{step}.log").exists()
    return rows


def test_gpu_suite_smoke_checks_and_matmul_benchmark(tmp_path):
    """The suite's smoke run without the (separately owned) step-speed benchmark: < 1 min."""
    proc, out = _run_suite(tmp_path, SUITE_SKIP="step_speed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = _assert_checks_and_bench_ok(proc, out)
    assert rows["step_speed"][0] == "skipped: in SUITE_SKIP"


def test_gpu_suite_reports_a_failing_step_and_exits_non_zero(tmp_path):
    # A Python that fails at once: every step fails, the script still reaches its summary.
    proc, out = _run_suite(tmp_path, PYTHON="false")
    assert proc.returncode == 1
    rows = _step_rows((out / "summary.md").read_text())
    assert rows["preflight"] == ("FAIL", "1")
    assert rows["pallas_check"][0].startswith("skipped: preflight failed")


def test_gpu_suite_step_timeout_is_a_failure(tmp_path):
    proc, out = _run_suite(tmp_path, SUITE_TIMEOUT_CHECK="1", SUITE_SKIP="bsmm_bench,step_speed")
    assert proc.returncode == 1
    rows = _step_rows((out / "summary.md").read_text())
    assert rows["preflight"] == ("ok", "0")
    assert rows["pallas_check"] == ("TIMEOUT after 1s", "124")
    # A deadline too short for any step: nothing runs, and that is a failure too.
    proc, out = _run_suite(tmp_path, SUITE_DEADLINE="10")
    assert proc.returncode == 1
    rows = _step_rows((out / "summary.md").read_text())
    assert rows["preflight"][0].startswith("FAIL: no time left")


@pytest.mark.slow
def test_gpu_suite_smoke_every_step(tmp_path):
    """The whole smoke run, step-speed benchmark included (skipped only while it is missing)."""
    proc, out = _run_suite(tmp_path)
    rows = _assert_checks_and_bench_ok(proc, out)
    if (ROOT / "benchmarks" / "step_speed.py").exists():
        assert rows["step_speed"] == ("ok", "0"), (out / "step_speed.log").read_text()[-3000:]
        assert (out / "step_speed.md").exists()
    else:
        assert rows["step_speed"][0] == "skipped: benchmarks/step_speed.py missing"
    assert proc.returncode == 0, proc.stdout[-3000:]
