"""benchmarks/memory.py: state bytes against closed forms of the tiny preset, the targets'
verdicts, and the smoke run (tables, checkpoints) end to end."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# tiny: 4 layers x d_model 128, d_ff 512, byte vocabulary 264, context 256; fp32 params.
L, D, F, V, CTX = 4, 128, 512, 264, 256
KERNELS = {"qkv": (D, 3 * D), "out": (D, D), "fc": (D, F), "proj": (F, D)}   # (K, N)
KERNEL_WEIGHTS = L * sum(k * n for k, n in KERNELS.values())                 # 786432
OTHER_WEIGHTS = (L * (3 * D + D + F + D)    # biases of the four projections
                 + L * 4 * D                # ln1, ln2 scale and bias
                 + 2 * D + CTX * D + V * D)  # ln_f, wpe, wte (tied head)
# step, rng[2], bad_step, flops; Adam's count and the schedule's count: int32/uint32/fp32.
SCALARS = 4 + 8 + 4 + 4 + 4 + 4


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_memory",
                                                  ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def memory():
    return _load()


@pytest.fixture(scope="module")
def rows(memory):
    return memory.memory_rows(["tiny"])


def _row(rows, arm, density):
    (r,) = [r for r in rows if r["arm"] == arm and r["density"] == density]
    return r


def test_dense_arm_matches_the_closed_form(rows):
    assert KERNEL_WEIGHTS == 786432
    dense = _row(rows, "dense", 1.0)
    # 4 bytes x weights x (params, grads, Adam mu, Adam nu).
    assert dense["sparse_params"] == 4 * KERNEL_WEIGHTS
    assert dense["sparse_layers"] == 4 * 4 * KERNEL_WEIGHTS
    assert dense["params"] == 4 * (KERNEL_WEIGHTS + OTHER_WEIGHTS)
    assert dense["opt"] == 2 * 4 * (KERNEL_WEIGHTS + OTHER_WEIGHTS) + 8
    assert dense["state"] == 16 * (KERNEL_WEIGHTS + OTHER_WEIGHTS) + SCALARS
    assert dense["masks"] == KERNEL_WEIGHTS        # the dense method's all-ones bool masks


@pytest.mark.parametrize("density,block", [(0.25, 32), (0.125, 16)])
def test_sparse_arms_match_the_closed_form(rows, density, block):
    layout, compact = _row(rows, "layout", density), _row(rows, "compact", density)
    assert layout["block"] == compact["block"] == block
    # Dense layout: everything [L, K, N] as for dense, plus one bool per weight.
    assert layout["sparse_layers"] == 16 * KERNEL_WEIGHTS
    assert layout["masks"] == KERNEL_WEIGHTS
    assert layout["state"] == 16 * (KERNEL_WEIGHTS + OTHER_WEIGHTS) + SCALARS
    # Compact: T = density * K / B live blocks in each of the N / B block columns, so
    # exactly density x the weights; one int32 index per live block.
    slots = {k: round(density * kk / block) for k, (kk, _) in KERNELS.items()}
    assert compact["slots"] == {f"{'attn' if k in ('qkv', 'out') else 'mlp'}/{k}": t
                                for k, t in slots.items()}
    blocks = L * sum((n // block) * slots[k] for k, (_, n) in KERNELS.items())
    live = blocks * block * block
    assert live * 8 == round(8 * density) * KERNEL_WEIGHTS        # exactly density x dense
    assert compact["sparse_params"] == 4 * live
    assert compact["sparse_layers"] == 16 * live
    assert compact["masks"] == 4 * blocks
    assert compact["state"] == 16 * (live + OTHER_WEIGHTS) + SCALARS
    assert compact["sparse_x"] == density
    assert compact["total_x"] == pytest.approx(
        (16 * (live + OTHER_WEIGHTS) + SCALARS + 4 * blocks)
        / (16 * (KERNEL_WEIGHTS + OTHER_WEIGHTS) + SCALARS), rel=1e-12)


def test_targets_flag_a_state_over_the_line(memory, rows):
    lines = memory.targets(rows)
    assert lines == [l for l in lines if l.startswith("- tiny compact 87.5%")]
    assert lines[0].endswith(": met")
    # The same row with the compact arm holding 15% of the dense sparse-layer bytes fails.
    fat = [dict(r) for r in rows]
    over = _row(fat, "compact", 0.125)
    over["sparse_layers"] = int(0.15 * _row(fat, "dense", 1.0)["sparse_layers"])
    assert memory.targets(fat)[0].endswith("NOT met")
    # The 13B whole-state target reads the sparse_pretrain rows' total (masks included).
    fam = [dict(r, family="sparse_pretrain") for r in fat if r["arm"] != "dense"]
    verdicts = memory.targets([_row(fat, "dense", 1.0)] + fam)
    whole = [l for l in verdicts if "whole state" in l and " compact:" in l]
    assert len(whole) == 1 and whole[0].endswith(": met")       # tiny: 0.20x <= 0.3x


@pytest.fixture(scope="module")
def init(memory):
    return memory.init_rows(["tiny"])


def test_init_plan_outputs_the_state(init, rows):
    """XLA's planned init output is the state without gradients (masks included)."""
    for r in init:
        state = _row(rows, r["arm"], r["density"])
        expected = state["total"] - state["grads"]
        assert r["plan"]["output"] == pytest.approx(expected, rel=1e-3)
        assert r["plan"]["temp"] > 0
    compact = [r for r in init if r["arm"] == "compact"][0]
    assert compact["plan"]["output"] < 0.2 * init[0]["plan"]["output"]


def test_measured_table_reports_missing_compact_kernels(memory):
    base = {"baseline_rss": 100 << 20, "init_rss": 200 << 20, "peak_rss": 300 << 20,
            "state_total": 1000, "state_state": 1000, "ckpt_bytes": 400, "loss": 5.0,
            "steps": 3, "steps_skipped": None}
    base["step_plan"] = {"argument": 600, "output": 600, "alias": 600, "temp": 400}
    results = [dict(base, arm="dense"),
               dict(base, arm="layout", peak_rss=250 << 20, ckpt_bytes=100,
                    step_plan={"argument": 600, "output": 600, "alias": 600, "temp": 1400}),
               dict(base, arm="compact", state_total=150, steps=0, loss=None,
                    steps_skipped="compact kernels not available", ckpt_bytes=50,
                    step_plan=None)]
    table = memory.measured_table(results).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert cells[0][7] == "1.000" and cells[1][7] == "0.750"      # (250-100)/(300-100)
    assert cells[1][9] == "2.000" and cells[2][9] == "-"          # (600+1400)/(600+400)
    assert cells[1][11] == "0.250" and cells[2][11] == "0.125"    # checkpoint ratios
    assert cells[2][5] == "n/a (compact kernels not available)" and cells[2][2] == "0.150"


def test_smoke_run_writes_tables_and_checkpoints(memory, init, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "init_rows", lambda presets: init)   # compiled above
    out = tmp_path / "memory.md"
    text = memory.main(["--smoke", "--out", str(out)])
    assert out.read_text() == text
    assert text.startswith("# Training-state memory: ")
    assert "- tiny compact 87.5%: sparse layers' P+G+Adam 0.1250x dense" in text
    assert "| tiny | compact | 0.125 |" in text.split("## Init memory")[1]
    ckpt = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 13 and cells[0] in ("dense", "layout", "compact"):
            ckpt[cells[0]] = float(cells[11])
    assert set(ckpt) == {"dense", "layout", "compact"} and ckpt["dense"] == 1.0
    # Live blocks only (and fresh, zero Adam moments) must write less than the dense state.
    assert ckpt["compact"] < 0.5
