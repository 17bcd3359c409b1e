"""Meshes, derived shardings and sharded training (8 fake CPU devices from conftest.py).

The oracle for every sharded run is the same config trained on one device.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparse_gpt import cli, plan
from sparse_gpt import plan as plan_lib
from sparse_gpt.training import checkpoint
from sparse_gpt.parallel import sharding
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer
from sparse_gpt import config as config_lib
from sparse_gpt.model import gpt as model_lib

STEPS = 3
FAST = {"xla_backend_optimization_level": 0}   # 3x faster compiles; numerics unchanged


def small_config(**overrides):
    c = config_lib.get_config("tiny")
    for key, value in dict({
            "model.n_layers": 4, "model.d_model": 32, "model.n_heads": 4, "model.max_len": 16,
            "model.vocab_size": 64, "data.seq_len": 16, "train.batch_size": 8,
            "train.num_steps": STEPS, "train.warmup_steps": 1, "sparsity.method": "static",
            "sparsity.density": 0.5}, **overrides).items():
        cli.apply_override(c, key, str(value))
    return c


def mesh_config(data=1, fsdp=1, tensor=1, stage=1, **extra):
    return ml_collections.ConfigDict(dict(
        config_lib.base_config().mesh, data=data, fsdp=fsdp, tensor=tensor, stage=stage,
        **extra))


def batches(config, n=STEPS):
    """The same random batch n times, so that the loss falls."""
    shape = (config.train.batch_size, config.data.seq_len)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape, np.int32)
    return [{"inputs": tokens, "targets": np.roll(tokens, -1, axis=1),
             "weights": np.ones(shape, np.float32)}] * n


def train_curve(config, devices):
    """Losses of STEPS steps on a mesh over ``devices`` (config.mesh sizes), final state."""
    plan = plan_lib.from_config(config, num_devices=len(devices))
    model, tx, method = train_lib.build(plan)
    mesh = sharding.make_mesh(config.mesh, devices)
    steps = trainer.make_steps(plan, model, tx, method, mesh, compiler_options=FAST)
    state = steps.init(jax.random.key(0))
    losses = []
    for batch in batches(config):
        state, metrics = steps.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def one_device():
    config = small_config(**{"mesh.data": 1})
    return train_curve(config, jax.devices()[:1])


@pytest.mark.parametrize("shape, extra", [
    ((8, 1, 1, 1), {}),
    ((2, 1, 1, 4), {}),                                               # GPipe, M = 4
    ((1, 2, 2, 2), {"mesh.schedule": "circular", "mesh.circular_repeats": 2}),
], ids=["data8", "data2-stage4-gpipe", "fsdp2-tensor2-stage2-circular"])
def test_sharded_training_matches_one_device(one_device, shape, extra):
    overrides = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.stage"), shape))
    config = small_config(**overrides, **extra)
    losses, state = train_curve(config, jax.devices())
    ref_losses, ref_state = one_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(ref_state.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The arrays really are split: [N, D, F] = [4, 32, 128] over (stage, fsdp, tensor).
    data, fsdp, tensor, stage = shape
    kernel = state.params["blocks"]["mlp"]["fc"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (4 // stage, 32 // fsdp, 128 // tensor)
    assert state.masks["blocks"]["mlp"]["fc"]["kernel"].sharding == kernel.sharding


def test_masks_and_optimizer_state_take_their_params_shardings():
    config = small_config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.stage": 2})
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.parse_rules(config.mesh.rules)
    init_fn = lambda rng: train_lib.init_state(plan_lib.from_config(config), model, tx, method, rng)  # noqa: E731
    sh = sharding.state_shardings(init_fn, model, tx, mesh, rules, config.data.seq_len)
    params = sh.params["blocks"]
    assert params["mlp"]["fc"]["kernel"].spec == P("stage", "fsdp", "tensor")
    assert params["attn"]["out"]["kernel"].spec == P("stage", "tensor", "fsdp")
    assert sh.params["wte"]["embedding"].spec == P("tensor", "fsdp")
    assert sh.params["ln_f"]["scale"].spec == P(None)
    for group, name in (("attn", "qkv"), ("attn", "out"), ("mlp", "fc"), ("mlp", "proj")):
        assert sh.masks["blocks"][group][name]["kernel"] == params[group][name]["kernel"]
    adam = sh.opt_state[1][0]
    assert adam.mu == sh.params and adam.nu == sh.params
    assert adam.count == NamedSharding(mesh, P()) and sh.step == NamedSharding(mesh, P())


def test_a_checkpoint_restores_onto_the_mesh(tmp_path):
    config = small_config(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2, "mesh.stage": 2})
    model, tx, method = train_lib.build(plan_lib.from_config(config))
    steps = trainer.make_steps(plan_lib.from_config(config), model, tx, method, compiler_options=FAST)
    state = steps.init(jax.random.key(0))
    abstract = jax.eval_shape(steps.init, jax.random.key(0))   # what restore_or_init uses
    meta = checkpoint.make_meta(model.cfg, abstract)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(0, state, {}, meta)
    restored, _, _ = ckpt.restore(abstract, meta)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    assert restored.params["blocks"]["mlp"]["fc"]["kernel"].sharding.spec == P(
        "stage", "fsdp", "tensor")


def test_distributed_start_only_when_the_environment_asks(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    assert not sharding.maybe_initialize_distributed({})
    assert sharding.maybe_initialize_distributed({"SPARSE_GPT_DISTRIBUTED": "1"})
    assert sharding.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert len(calls) == 2


def test_every_variable_has_logical_names_and_masks_mirror_kernels():
    model = model_lib.GPT(model_lib.ModelConfig(vocab_size=64, n_layers=2, d_model=32,
                                                n_heads=4, max_len=16))
    specs = sharding.logical_specs(model, 16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    for spec, shape in zip(jax.tree.leaves(specs["params"], is_leaf=lambda x: isinstance(x, P)),
                           jax.tree.leaves(shapes["params"])):
        assert len(spec) == len(shape.shape)
    blocks = specs["params"]["blocks"]
    assert blocks["mlp"]["fc"]["kernel"] == P("layers", "embed", "mlp")
    assert specs["masks"]["blocks"]["mlp"]["fc"]["kernel"] == blocks["mlp"]["fc"]["kernel"]
    # Plain init stays unboxed: no other code ever sees the annotations.
    assert isinstance(shapes["params"]["blocks"]["mlp"]["fc"]["kernel"], jax.ShapeDtypeStruct)


def test_mesh_shape_fills_minus_one_and_names_the_fix():
    assert sharding.mesh_shape(mesh_config(data=-1, stage=4), 8) == dict(
        data=2, fsdp=1, tensor=1, stage=4)
    assert sharding.make_mesh(mesh_config(data=-1)).shape["data"] == 8
    with pytest.raises(ValueError, match=r"needs 12 devices but 8.*--config.mesh.data=-1"):
        sharding.mesh_shape(mesh_config(data=3, stage=4), 8)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.mesh_shape(mesh_config(data=-1, stage=3), 8)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.mesh_shape(mesh_config(data=-1, fsdp=-1), 8)


def test_a_batch_too_small_for_the_mesh_is_repeated_with_a_warning(caplog):
    mesh = sharding.make_mesh(mesh_config(data=4, fsdp=2))
    rules = sharding.parse_rules(config_lib.base_config().mesh.rules)
    assert sharding.batch_sharding(mesh, rules, 16).spec == P(("data", "fsdp"), None)
    assert not caplog.records
    assert sharding.batch_sharding(mesh, rules, 4).spec == P(("data",), None)
    assert "batch_size=4 does not split over mesh axes dataxfsdp" in caplog.text
    assert sharding.batch_sharding(mesh, rules, 3).spec == P(None, None)


def test_rules_parse_and_reject_unknown_axes():
    assert sharding.parse_rules("batch=data+fsdp, mlp=tensor,length=") == (
        ("batch", ("data", "fsdp")), ("mlp", ("tensor",)), ("length", ()))
    with pytest.raises(ValueError, match="mesh.rules.*axes from"):
        sharding.parse_rules("mlp=model")


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 3, "mesh.stage": 4}, "needs 12 devices but 8 are available"),
    ({"mesh.data": 2, "mesh.stage": 4, "model.n_layers": 6},
     "n_layers=6 is not divisible by mesh.stage=4"),
    ({"mesh.data": 2, "mesh.stage": 4, "mesh.num_microbatches": 3},
     "batch_size=8 is not divisible by mesh.num_microbatches=3"),
    ({"mesh.data": 1, "mesh.tensor": 8, "model.vocab_size": 68},
     "size 68, not divisible by mesh axes tensor = 8.*'vocab'"),
])
def test_a_mesh_that_does_not_divide_the_model_fails_with_the_fix(overrides, message):
    config = small_config(**overrides)
    with pytest.raises(ValueError, match=message):
        plan.validate(config)
        model, tx, method = train_lib.build(plan_lib.from_config(config))
        trainer.make_steps(plan_lib.from_config(config), model, tx, method)
