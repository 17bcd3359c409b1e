"""The sparse_pretrain config family (SambaNova recipe) and static's dense phase.

Every preset builds with block-sparse masks of the configured density (abstractly for the
big ones); the block-sparse kernel path trains like the dense masked oracle; the dense phase
lifts the masks, counts dense FLOPs, lets the lifted weights grow from zero, and a run killed
in it resumes in it to the same parameters.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kernels
from sparse_gpt import cli, flops
from sparse_gpt import plan as plan_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.training import checkpoint
from sparse_gpt.sparsity import methods
from sparse_gpt.parallel import pipeline
from sparse_gpt.parallel import sharding
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer
from sparse_gpt import config as config_lib
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.configs import sparse_pretrain
from sparse_gpt.training.metrics import load_metrics

from helpers import small_config

FAMILY_FILE = sparse_pretrain.__file__
FAMILY = [(p, s) for p in config_lib.PRESETS for s in sparse_pretrain.SPARSITIES]


def family_config(corpus, arg="tiny,87.5", **overrides):
    """A family config shrunk by helpers.small_config (width kept at 128: 1/8 of 8 blocks),
    in the dense layout: these tests read masks and weights as ``[L, K, N]`` arrays (the
    recipe's compact layout computes the same numbers: tests/test_compact.py)."""
    return small_config(corpus, base=sparse_pretrain.get_config(arg),
                        **{"model.d_model": 128, "model.n_heads": 4,
                           "model.sparse_storage": "dense", **overrides})


def override(config, **items):
    for key, value in items.items():
        cli.apply_override(config, key.replace("__", "."), str(value))
    return config


@pytest.mark.parametrize("preset, sparsity", FAMILY)
def test_every_preset_builds_block_sparse_masks_of_the_configured_density(preset, sparsity):
    c = cli.load_config(f"{FAMILY_FILE}:{preset},{sparsity}")
    density = 1 - float(sparsity) / 100
    plan = plan_lib.from_config(c)
    model, tx, method = train_lib.build(plan)
    state = jax.eval_shape(lambda r: train_lib.init_state(plan, model, tx, method, r),
                           jax.random.key(0))
    masks, params = masks_lib.flatten(state.masks), masks_lib.flatten(state.params)
    # The four projections are sparse; embeddings, LayerNorms and the tied head are dense.
    assert sorted(masks) == sorted(model_lib.KERNELS)
    assert {"wte/embedding", "ln_f/scale"} <= set(params) - set(masks)
    b = c.sparsity.block_size
    assert (c.model.matmul, c.sparsity.method, c.sparsity.structure, c.sparsity.block_balance,
            c.model.sparse_storage) == ("block_sparse", "static", "block", "column", "compact")
    assert model.cfg.block_density == plan.model.block_density == density
    # Stored compact: each output block column holds exactly density x Kb live blocks (the
    # kernel's budget), as blocks [L, Nb, T, B, B] and their int32 K-block index [L, Nb, T].
    shapes = plan.model.kernel_shapes()
    for path, m in masks.items():
        n_layers, k, n = shapes[path]
        t = round(density * (k // b))
        assert m.dtype == jnp.int32 and m.shape == (n_layers, n // b, t), path
        assert params[path].shape == (n_layers, n // b, t, b, b), path
        assert kernels.block_budget(k, n, b, density).max_per_col == t
    # The dense layout of the same recipe: bool masks of the weights' shape, the same density.
    dense = plan_lib.from_config(override(c.copy_and_resolve_references(),
                                          model__sparse_storage="dense"))
    dense_state = jax.eval_shape(
        lambda r: train_lib.init_state(dense, *train_lib.build(dense), r), jax.random.key(0))
    for path, m in masks_lib.flatten(dense_state.masks).items():
        assert m.dtype == jnp.bool_ and m.shape == shapes[path], path
    for path, target in method.target_densities(dense_state.masks).items():
        units = method.settings.structure.units(shapes[path])
        assert target == density and units == shapes[path][1] // b
        assert masks_lib.n_keep(target, units) == density * units
    # The big presets pipeline their blocks over stages (8 fake devices here).
    stages = sharding.mesh_shape(c.mesh, jax.device_count())["stage"]
    assert stages == sparse_pretrain.STAGES.get(preset, (1, 0))[0]
    pcfg = plan_lib.from_config(c).pipeline             # validated against the model
    assert (pcfg.num_stages if pcfg else 1) == stages
    assert c.sparsity.dense_finetune_start == -1       # the dense phase is opt-in


@pytest.mark.parametrize("arg", ["tiny,87.5", "gpt2-small,75", "gpt2-medium,87.5"])
def test_initial_masks_hold_the_density_in_every_block_column(arg):
    # Blocks of 16, 64 and 128; one full-width layer, as the density is per matrix.
    c = override(sparse_pretrain.get_config(arg), model__n_layers=1)
    _, _, method = train_lib.build(plan_lib.from_config(c))
    ones = {p: jnp.ones(s, jnp.bool_) for p, s in plan_lib.from_config(c).model.kernel_shapes().items()}
    masks = jax.jit(method.init_masks)(None, masks_lib.unflatten(ones), jax.random.key(3))
    b, density = c.sparsity.block_size, c.sparsity.density
    for path, m in masks_lib.flatten(masks).items():
        assert bool(masks_lib.is_block_structured(m, (b, b))), path
        per_col_NxNb = np.asarray(masks_lib.pool(m, (b, b), "any")).sum(axis=-2)
        np.testing.assert_array_equal(per_col_NxNb, density * (m.shape[-2] // b))


@pytest.mark.slow  # the training test below covers it through the trainer
def test_all_live_masks_leave_the_kernel_for_the_dense_product():
    c = override(sparse_pretrain.get_config("tiny,87.5,local"), model__n_layers=1,
                 model__sparse_storage="dense")
    model, _, method = train_lib.build(plan_lib.from_config(c))
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, 256)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    params = variables["params"]   # not masked: a dense product would differ from a sparse one
    sparse = jax.jit(method.init_masks)(params, variables["masks"], jax.random.key(2))
    lifted = jax.tree.map(jnp.ones_like, sparse)
    oracle = model.clone(cfg=dataclasses.replace(model.cfg, matmul="masked"))
    fwd = jax.jit(train_lib.dense_when_all_live(train_lib.forward), static_argnums=3)
    plain = jax.jit(train_lib.forward, static_argnums=3)
    dense = plain(params, None, tokens, model)
    sparse_ref = plain(params, sparse, tokens, oracle)
    assert not np.allclose(dense, sparse_ref, atol=1e-3)
    np.testing.assert_allclose(fwd(params, sparse, tokens, model), sparse_ref, atol=1e-5)
    np.testing.assert_allclose(fwd(params, lifted, tokens, model), dense, atol=1e-5)
    # The bare kernel keeps only its sparse block budget of an all-live mask.
    assert not np.allclose(plain(params, lifted, tokens, model), dense, atol=1e-3)


def test_dense_phase_lift_is_one_commit_and_catches_up_after_a_resume():
    k_mask = jnp.array([[True, False], [False, True]])
    masks = {"blocks": {"mlp": {"fc": {"kernel": k_mask}}}}
    params = {"blocks": {"mlp": {"fc": {"kernel": jnp.where(k_mask, 2.0, 0.0)}}}}
    tx = optax.adam(1e-3)
    opt = jax.tree.map(lambda x: x + 1.0, tx.init(params))     # non-zero moments everywhere
    settings = methods.Settings(
        method="static", density=0.5, distribution="uniform", explicit=(),
        structure=masks_lib.UNSTRUCTURED, sparse_layers=("mlp/fc",), init="random",
        update_every=100, drop_fraction=0.3, drop_fraction_schedule="cosine", update_start=0,
        update_end=7, grow_init="zeros")
    method = methods.Static(settings=settings, dense_finetune_start=3)
    update = jax.jit(method.update)
    rng = jax.random.key(0)
    p, m, o, _ = update(1, params, masks, None, opt, rng)          # before the boundary: nothing
    assert not bool(masks_lib.all_live(m))
    for step in (2, 7):   # the update ending step 3 lifts; a resumed state past it catches up
        p, m, o, _ = update(step, params, masks, None, opt, rng)
        np.testing.assert_array_equal(m["blocks"]["mlp"]["fc"]["kernel"], True)
        np.testing.assert_array_equal(p["blocks"]["mlp"]["fc"]["kernel"], [[2, 0], [0, 2]])
        mu = o[0].mu["blocks"]["mlp"]["fc"]["kernel"]
        np.testing.assert_array_equal(mu, [[1, 0], [0, 1]])     # lifted entries start clean
    again = update(5, p, m, None, o, rng)                        # lifted: identity
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves((p, m, o))):
        np.testing.assert_array_equal(a, b)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.masks))]


def test_kernel_run_matches_the_masked_oracle_lifts_to_dense_and_resumes(corpus, tmp_path):
    # 6 steps: sparse for 4, then dense; checkpoints at 2 (sparse), 4 (just lifted) and 6.
    kw = {"sparsity.dense_finetune_start": 4, "train.num_steps": 6, "train.log_every": 1,
          "train.checkpoint_every": 2, "train.eval_every": 6, "train.batch_size": 8}
    kernel = family_config(corpus, **kw)
    oracle = family_config(corpus, **{**kw, "model.matmul": "masked",
                                      "train.checkpoint_every": 6})
    run = trainer.train(kernel, str(tmp_path / "kernel"))
    ref = trainer.train(oracle, str(tmp_path / "masked"))
    rows, ref_rows = load_metrics(str(tmp_path / "kernel")), load_metrics(str(tmp_path / "masked"))
    # The block-sparse kernel trains like the masked oracle in both phases: equal losses, and
    # equal gradient norms, so no gradient reaches masked weights in the sparse phase and the
    # dense phase does not run the kernel (whose block budget would drop 7/8 of the blocks).
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref_rows],
                                   rtol=2e-4, err_msg=key)
    for a, b in zip(jax.tree.leaves(run["state"].params), jax.tree.leaves(ref["state"].params)):
        np.testing.assert_allclose(a, b, atol=2e-4)

    # Sparse phase: 1/8 of the blocks, masked weights exactly zero.
    _, _, _, _, at2 = trainer.load_run(str(tmp_path / "kernel"), step=2)
    sparse = masks_lib.flatten(jax.device_get(at2.masks))
    for path, m in sparse.items():
        assert m.mean() == 0.125, path
        assert np.all(np.asarray(masks_lib.flatten(at2.params)[path])[~m] == 0), path
    # The update ending step 4 lifts the masks; the lifted weights start at zero, clean ...
    _, _, _, _, at4 = trainer.load_run(str(tmp_path / "kernel"), step=4)
    assert bool(masks_lib.all_live(at4.masks))
    for path, m in sparse.items():
        assert np.all(np.asarray(masks_lib.flatten(at4.params)[path])[~m] == 0), path
        for where, moment in jax.tree_util.tree_flatten_with_path(at4.opt_state)[0]:
            if masks_lib.key_path_str(where).endswith(path) and moment.shape == m.shape:
                assert np.all(np.asarray(moment)[~m] == 0), masks_lib.key_path_str(where)
    # ... and dense training reaches them.
    final = masks_lib.flatten(run["state"].params)
    for path, m in sparse.items():
        assert np.mean(np.asarray(final[path])[~m] != 0) > 0.9, path

    # metrics.jsonl: density and FLOPs per step are the masks' (sparse, then dense).
    assert [r["density"] for r in rows] == [0.125] * 4 + [1.0] * 2
    per_step = np.diff([0.0] + [r["flops"] for r in rows])
    want = flops.step_flops(plan_lib.from_config(kernel).model, at2.masks, 8, 32)
    np.testing.assert_allclose(per_step[:4], float(want["sparse"]), rtol=1e-5)
    np.testing.assert_allclose(per_step[4:], rows[0]["dense_flops_per_step"], rtol=1e-5)
    assert per_step[0] < 0.5 * per_step[-1]

    # Killed in the dense phase (after step 5; newest checkpoint 4, masks lifted), it resumes
    # there, to the uninterrupted run's state.
    crashed = str(tmp_path / "crashed")
    trainer.train(kernel, crashed, stop_after=5)
    assert checkpoint.Checkpointer(os.path.join(crashed, "checkpoints")).latest_step() == 4
    resumed = trainer.train(kernel, crashed)
    for a, b in zip(leaves(run["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert [r["density"] for r in load_metrics(crashed)] == [0.125] * 4 + [1.0] * 2


@pytest.mark.parametrize("arg, match", [
    ("gpt-14b", r"unknown argument 'gpt-14b'.*Presets: tiny"),
    ("tiny,80", r"unknown argument '80'.*sparsities: 75, 87.5"),
    ("tiny,dense_ft=1", r"fraction in \[0, 1\)"),
    ("tiny,dense_ft=ten", r"fraction in \[0, 1\)"),
])
def test_bad_family_arguments_name_the_fix(arg, match):
    with pytest.raises(ValueError, match=match):
        cli.load_config(f"{FAMILY_FILE}:{arg}")


@pytest.mark.parametrize("items, match", [
    ({"sparsity__dense_finetune_start": 600}, r"\[1, 599\].*dense_finetune_start=540"),
    ({"sparsity__dense_finetune_start": 0}, r"-1 \(no dense phase\) or a step in .* = \[1, 599\]"),
    ({"sparsity__dense_finetune_start": -2}, r"-1 \(no dense phase\)"),
    ({"sparsity__dense_finetune_start": 500, "sparsity__method": "rigl"},
     r"dense_finetune_start=500 is not read by method=rigl \(it is a setting of static\)"),
    ({"sparsity__dense_finetune_start": 500, "attention__sparse_end": -1},
     r"attention.sparse_end=0.*matmul=masked"),
    ({"sparsity__dense_finetune_start": 500, "sat__omission_rate": 0.5},
     r"sat.omission_rate=0.*matmul=masked"),
])
def test_bad_dense_phase_settings_name_the_fix(items, match):
    c = override(sparse_pretrain.get_config("tiny"), **items)
    with pytest.raises(ValueError, match=match):
        plan_lib.from_config(c).method


def test_dense_phase_from_a_fraction_and_the_local_variants():
    c = sparse_pretrain.get_config("gpt-13b,75,dense_ft=0.1")
    assert c.sparsity.dense_finetune_start == 90_000 and c.train.num_steps == 100_000
    assert c.preset == "sparse_pretrain-gpt-13b-75-dt0.1"
    plan_lib.from_config(c).method
    for preset in config_lib.PRESETS:   # the toy shape keeps the recipe, stages included
        local = sparse_pretrain.get_config(f"{preset},87.5,dense_ft=0.25,local")
        full = sparse_pretrain.get_config(preset)
        assert local.mesh.stage == full.mesh.stage and local.model.matmul == "block_sparse"
        assert local.sparsity.dense_finetune_start == 15 and local.data.tokenizer == "byte"
        train_lib.build(plan_lib.from_config(local))


@pytest.mark.slow
def test_pipelined_local_variant_trains_like_one_stage_through_the_dense_phase(corpus,
                                                                               tmp_path):
    # The recipe as it ships: compact storage, densified at the switch.
    kw = {"model.n_layers": 4, "sparsity.dense_finetune_start": 3, "train.num_steps": 6,
          "train.log_every": 1, "model.sparse_storage": "compact"}
    staged = family_config(corpus, "gpt-1.3b,87.5,local", **kw)
    assert staged.mesh.stage == 4
    flat = family_config(corpus, "gpt-1.3b,87.5,local", **kw, **{"mesh.stage": 1})
    trainer.train(staged, str(tmp_path / "staged"))
    trainer.train(flat, str(tmp_path / "flat"))
    rows, ref = load_metrics(str(tmp_path / "staged")), load_metrics(str(tmp_path / "flat"))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-4)
    assert [r["density"] for r in rows] == [0.125] * 3 + [1.0] * 3
