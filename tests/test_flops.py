"""FLOP accounting against a hand count, and density summaries."""

import jax
import jax.numpy as jnp
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt import flops as F
from sparse_gpt import plan as plan_lib
from sparse_gpt.model.gpt import ModelConfig

# 2 layers, D=8, F=32, V=16: kernels per layer qkv 8x24=192, out 8x8=64, fc 8x32=256,
# proj 32x8=256, i.e. 768 weights per layer, 1536 in all.
CFG = ModelConfig(n_layers=2, d_model=8, n_heads=2, d_ff=0, vocab_size=16)
B, L = 2, 4  # T = 8 tokens


def _masks():
    qkv = jnp.zeros((2, 8, 24), bool)
    qkv = qkv.at[0].set(jnp.arange(192).reshape(8, 24) < 10)   # 10 live
    qkv = qkv.at[1].set(jnp.arange(192).reshape(8, 24) < 20)   # 20 live
    fc = jnp.broadcast_to(jnp.arange(256).reshape(8, 32) % 4 == 0, (2, 8, 32))  # 64 + 64
    proj = jnp.ones((2, 32, 8), bool)
    return {"blocks": {"attn": {"qkv": {"kernel": qkv}},        # out has no mask: dense
                       "mlp": {"fc": {"kernel": fc}, "proj": {"kernel": proj}}}}


def test_kernel_shapes_follow_the_model_config():
    assert CFG.kernel_shapes() == {
        "blocks/attn/qkv/kernel": (2, 8, 24), "blocks/attn/out/kernel": (2, 8, 8),
        "blocks/mlp/fc/kernel": (2, 8, 32), "blocks/mlp/proj/kernel": (2, 32, 8)}
    tiny = plan_lib.from_config(config_lib.get_config("tiny")).model
    assert tiny.kernel_shapes()["blocks/mlp/fc/kernel"] == (4, 128, 512)


def test_step_flops_hand_count():
    attn = 12 * B * L * L * 8 * 2        # (QK^T + PV) * 2 FLOPs * 3 passes * layers = 6144
    head = 6 * B * L * 8 * 16            # 6144
    dense = 6 * 8 * 1536 + attn + head   # 86016
    live = 30 + 128 + 128 + 512          # qkv + out (dense) + fc + proj = 798
    sparse = 6 * 8 * live + attn + head  # 50592
    got = F.step_flops(CFG, _masks(), B, L)
    assert float(got["dense"]) == dense == 86016
    assert float(got["sparse"]) == sparse == 50592
    # Dense weight gradient (RigL update steps): dW counted over all 1536 weights.
    dw = F.step_flops(CFG, _masks(), B, L, dense_weight_grad=True)
    assert float(dw["sparse"]) == 2 * 8 * (2 * live + 1536) + attn + head == 62400
    # No masks at all: sparse == dense.
    empty = F.step_flops(CFG, {}, B, L)
    assert float(empty["sparse"]) == float(empty["dense"]) == dense


def test_step_flops_inside_jit_matches():
    jitted = jax.jit(lambda m, g: F.step_flops(CFG, m, B, L, dense_weight_grad=g))(
        _masks(), jnp.bool_(False))
    assert float(jitted["sparse"]) == 50592 and float(jitted["dense"]) == 86016


def test_density_report():
    rep = F.density_report(_masks())
    assert float(rep["blocks/attn/qkv/kernel"]) == pytest.approx(30 / 384)
    assert float(rep["blocks/attn/qkv/kernel[0]"]) == pytest.approx(10 / 192)
    assert float(rep["blocks/attn/qkv/kernel[1]"]) == pytest.approx(20 / 192)
    assert float(rep["blocks/mlp/fc/kernel"]) == pytest.approx(0.25)
    assert float(rep["blocks/mlp/proj/kernel[1]"]) == 1.0
    total = (30 + 128 + 512) / (384 + 512 + 512)
    assert float(rep["total"]) == pytest.approx(total)
    assert float(F.density(_masks())) == pytest.approx(total)
    assert set(F.density_report(_masks(), per_matrix=False)) == {
        "total", "blocks/attn/qkv/kernel", "blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel"}
