"""Pipeline stages over the ``stage`` mesh axis: equal to the sequential model, values and grads.

The oracle is ``train_lib.loss_fn`` (the plain ``nn.scan`` model) on the same params and masks.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparse_gpt.model import gpt as model_lib
from sparse_gpt.parallel import pipeline
from sparse_gpt.parallel import sharding
from sparse_gpt.training import step as train_lib
from sparse_gpt import config as config_lib

RULES = sharding.parse_rules(config_lib.base_config().mesh.rules)
FAST = {"xla_backend_optimization_level": 0}   # 3x faster compiles; numerics unchanged


def make_mesh(data=1, fsdp=1, tensor=1, stage=1):
    return sharding.make_mesh(ml_collections.ConfigDict(
        dict(data=data, fsdp=fsdp, tensor=tensor, stage=stage)))


def setup(n_layers=8, batch=8, **cfg):
    cfg = model_lib.ModelConfig(vocab_size=64, n_layers=n_layers, d_model=32, n_heads=4,
                                max_len=16, **cfg)
    dense = model_lib.GPT(model_lib.ModelConfig(**{**cfg.__dict__, "matmul": "masked"}))
    tokens = jax.random.randint(jax.random.key(1), (batch, 16), 0, 64)
    variables = jax.jit(dense.init, compiler_options=FAST)(jax.random.key(0), tokens)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
             "weights": jnp.ones(tokens.shape).at[0, :5].set(0.0)}
    return model_lib.GPT(cfg), dense, variables, batch


def random_masks(masks, density=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < density), masks)


def assert_trees_close(got, want, atol):
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = dict(jax.tree_util.tree_flatten_with_path(want)[0])[path]
        np.testing.assert_allclose(g, w, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def oracle():
    """(model, variables, batch, masks, [(loss, grads) sparse, (loss, grads) dense])."""
    model, _, variables, batch = setup()
    masks = random_masks(variables["masks"])
    vg = jax.value_and_grad(train_lib.loss_fn)
    want = jax.jit(lambda p, m, b: [vg(p, m, b, model), vg(p, None, b, model)],
                   compiler_options=FAST)(
        variables["params"], masks, batch)
    return model, variables, batch, masks, want


@pytest.mark.parametrize("pcfg", [
    pipeline.PipelineConfig(num_stages=4, num_microbatches=4),                    # J = 2
    pipeline.PipelineConfig(num_stages=4, num_microbatches=4, schedule="circular",
                            circular_repeats=2),                                 # J = 1
], ids=["gpipe", "circular"])
def test_pipelined_loss_and_grads_equal_the_sequential_model(oracle, pcfg):
    model, variables, batch, masks, want = oracle
    mesh = make_mesh(data=2, stage=4)
    vg = jax.value_and_grad(pipeline.pipelined_loss_fn)

    def both(params, masks, batch):   # sparse and dense in one compilation
        return (vg(params, masks, batch, model, mesh, pcfg),
                vg(params, None, batch, model, mesh, pcfg))

    replicated = NamedSharding(mesh, P())
    got = sharding.jit(both, mesh, RULES, in_shardings=replicated, compiler_options=FAST)(
        variables["params"], masks, batch)
    for (loss, grads), (want_loss, want_grads) in zip(got, want):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert_trees_close(grads, want_grads, atol=1e-6)
    # Masked weights get exactly zero gradient through the pipeline too.
    g = got[0][1]["blocks"]["mlp"]["fc"]["kernel"]
    assert float(jnp.abs(jnp.where(masks["blocks"]["mlp"]["fc"]["kernel"], 0.0, g)).max()) == 0


def test_stages_hold_layers_in_schedule_order():
    layer_N = jnp.arange(8)
    np.testing.assert_array_equal(pipeline.to_stages(layer_N, 4, 1),
                                  [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]])
    # Circular: repeat r of stage s holds layer (r * S + s) * J + j.
    np.testing.assert_array_equal(pipeline.to_stages(layer_N, 4, 2)[:, :, 0],
                                  [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_bubble_fraction_is_the_textbook_one():
    gpipe = pipeline.PipelineConfig(num_stages=4, num_microbatches=8)
    circular = pipeline.PipelineConfig(4, 8, "circular", 3)
    assert gpipe.num_ticks == 11 and gpipe.bubble_fraction == pytest.approx(3 / 11)
    assert circular.num_ticks == 27 and circular.bubble_fraction == pytest.approx(3 / 27)


@pytest.mark.parametrize("pcfg, n_layers, batch, message", [
    (pipeline.PipelineConfig(4, 4), 6, 8, "n_layers=6 is not divisible by mesh.stage=4"),
    (pipeline.PipelineConfig(2, 2, "circular", 2), 6, 8,
     "not divisible by mesh.stage=2 x circular_repeats=2"),
    (pipeline.PipelineConfig(4, 3), 8, 8, "batch_size=8 is not divisible by .*=3"),
    (pipeline.PipelineConfig(4, 2, "circular", 2), 8, 8, "num_microbatches >= stage"),
    (pipeline.PipelineConfig(4, 4, "gpipe", 2), 8, 8, "needs --config.mesh.schedule=circular"),
    (pipeline.PipelineConfig(4, 4, "1f1b"), 8, 8, "Unknown pipeline schedule '1f1b'"),
])
def test_a_schedule_that_does_not_fit_names_the_fix(pcfg, n_layers, batch, message):
    with pytest.raises(ValueError, match=message):
        pcfg.validate(n_layers, batch)


def test_stage_count_must_match_the_mesh(oracle):
    model, variables, batch, _, _ = oracle
    with pytest.raises(ValueError, match="2 stages but mesh axis 'stage' has 4 devices"):
        pipeline.pipelined_loss_fn(variables["params"], None, batch, model,
                                   make_mesh(data=2, stage=4), pipeline.PipelineConfig(2, 2))


def column_block_masks(masks, density, block, seed=0):
    """Block masks with the same live blocks in every output block column (kernel budget)."""
    rng = np.random.default_rng(seed)

    def one(m):
        n, k, f = m.shape
        keep = max(1, round(density * (k // block)))
        blocks = np.zeros((n, k // block, f // block), bool)
        for layer in range(n):
            for col in range(f // block):
                blocks[layer, rng.permutation(k // block)[:keep], col] = True
        return jnp.asarray(blocks.repeat(block, 1).repeat(block, 2))
    return jax.tree.map(one, masks)


@pytest.mark.parametrize("shape", [
    (8, 1, 1, 1), pytest.param((2, 1, 1, 4), marks=pytest.mark.slow)], ids=["data8", "stage4"])
def test_block_sparse_kernel_runs_in_shard_map_on_a_mesh(shape):
    model, dense, variables, batch = setup(n_layers=4, matmul="block_sparse", block_size=16,
                                           block_density=0.5, kernel_backend="xla")
    masks = column_block_masks(variables["masks"], 0.5, 16)
    vg = jax.value_and_grad(train_lib.loss_fn)
    want = jax.jit(vg, static_argnums=3, compiler_options=FAST)(variables["params"], masks,
                                                                 batch, dense)
    mesh = make_mesh(*shape)
    forward = (train_lib.forward if shape[3] == 1 else
               pipeline.make_forward(mesh, pipeline.PipelineConfig(4, 4)))
    step = sharding.jit(lambda p, m, b: vg(p, m, b, model, forward), mesh, RULES,
                        in_shardings=NamedSharding(mesh, P()), compiler_options=FAST)
    lowered = step.lower(variables["params"], masks, batch)
    # One manual region per kernel call: forward, dX and dW of 4 projections (scanned once).
    assert lowered.as_text().count("sdy.manual_computation") >= 12
    loss, grads = lowered.compile()(variables["params"], masks, batch)
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)
    assert_trees_close(grads, want[1], atol=1e-6)
