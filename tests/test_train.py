"""End-to-end training: resume, checkpoints, NaN stop, bad input, the CLI and eval.py."""

import glob
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparse_gpt import cli
from sparse_gpt.training import checkpoint
from sparse_gpt import plan as plan_lib
from sparse_gpt.training import optim
from sparse_gpt.training import step as train_lib
from sparse_gpt.training import trainer
from sparse_gpt import config as config_lib
from sparse_gpt.training.metrics import load_metrics

from helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state, state.masks))]


def test_killed_run_resumes_to_the_same_parameters(corpus, tmp_path):
    config = small_config(corpus, **{"train.num_steps": 12})
    full = trainer.train(config, str(tmp_path / "full"))
    crashed = str(tmp_path / "crashed")
    partial = trainer.train(config, crashed, stop_after=6)   # dies after step 6, ckpt at 4
    assert int(partial["state"].step) == 6
    assert checkpoint.Checkpointer(os.path.join(crashed, "checkpoints")).latest_step() == 4
    resumed = trainer.train(config, crashed)
    assert int(resumed["state"].step) == 12
    for a, b in zip(leaves(full["state"]), leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl reads as one run: the crashed run's step-6 row was replaced, not doubled.
    assert [r["step"] for r in load_metrics(crashed)] == [2, 4, 6, 8, 10, 12]
    assert load_metrics(crashed)[-1]["loss"] == full["loss"]


def test_checkpoint_round_trip_restores_every_leaf(corpus, tmp_path):
    config = small_config(corpus, **{"train.num_steps": 4,
                                     "sparsity.method": "static", "sparsity.density": 0.5})
    result = trainer.train(config, str(tmp_path))
    _, _, _, _, restored = trainer.load_run(str(tmp_path))
    assert int(restored.step) == 4
    for a, b in zip(leaves(result["state"]), leaves(restored)):
        np.testing.assert_array_equal(a, b)
    assert float(restored.flops) == float(result["state"].flops) > 0


def test_metrics_and_sample_are_written(corpus, tmp_path):
    config = small_config(corpus)
    trainer.train(config, str(tmp_path))
    rows = load_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for key in ("loss", "lr", "tokens_per_sec", "flops", "density", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert "val_loss" in rows[1] and "val_bits_per_byte" in rows[-1]
    # lr: linear warm-up over 2 steps to 3e-3, then cosine to 3e-4 at step 8 (closed form).
    lr = lambda s: 3e-3 * s / 2 if s < 2 else 3e-4 + 0.5 * 2.7e-3 * (  # noqa: E731
        1 + math.cos(math.pi * (s - 2) / 6))
    for r in rows:
        assert r["lr"] == pytest.approx(lr(r["step"] - 1), rel=1e-5)
    # Byte tokenizer: bits per byte = nats / ln 2 (one byte per token, eot aside).
    assert rows[-1]["val_bits_per_byte"] == pytest.approx(rows[-1]["val_loss"] / math.log(2),
                                                          rel=0.01)
    assert os.path.getsize(tmp_path / "sample.txt") > len("ROMEO:")
    assert glob.glob(str(tmp_path / "tensorboard" / "events.*"))


def test_non_finite_loss_stops_with_the_step_named(corpus, tmp_path):
    config = small_config(corpus, **{"train.lr": 1e30, "train.warmup_steps": 1,
                                     "train.grad_clip": 1e30, "train.log_every": 1,
                                     "train.checkpoint_every": 1})
    with pytest.raises(trainer.NonFiniteLossError, match=r"NaN/inf at step \d+") as err:
        trainer.train(config, str(tmp_path))
    bad = int(str(err.value).split("at step ")[1].split(";")[0])
    latest = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
    assert latest is not None and latest < bad
    _, _, _, _, state = trainer.load_run(str(tmp_path))
    assert all(np.isfinite(x).all() for x in leaves(state))


def test_workdir_of_a_different_model_is_refused(corpus, tmp_path):
    trainer.train(small_config(corpus, **{"train.num_steps": 4}), str(tmp_path))
    other = small_config(corpus, **{"model.d_model": 64})
    with pytest.raises(checkpoint.CheckpointError, match="different shape.*d_model: 32 -> 64"):
        trainer.train(other, str(tmp_path))


def test_corrupt_checkpoint_is_named(corpus, tmp_path):
    trainer.train(small_config(corpus, **{"train.num_steps": 4}), str(tmp_path))
    for path in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"),
                          recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/4.*corrupt.*Delete"):
        trainer.train(small_config(corpus, **{"train.num_steps": 8}), str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    ({"data.seq_len": 64}, "exceeds the model context"),
    ({"data.path": "/nonexistent/corpus"}, "/nonexistent/corpus"),
    ({"model.vocab_size": 100}, "vocab_size to at least 257"),
    ({"sparsity.density": 1.5}, "density"),
    ({"train.optimizer": "lamb"}, "Unknown train.optimizer"),
])
def test_bad_input_stops_before_training(corpus, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        trainer.train(small_config(corpus, **overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_sgd_is_clipped_nesterov_momentum_with_l2_decay_on_kernels():
    c = config_lib.get_config("tiny")
    c.train.update(optimizer="sgd", lr=0.1, weight_decay=0.01, b1=0.9, warmup_steps=2,
                   num_steps=10, grad_clip=1.0)
    tx = optim.make_optimizer(plan_lib.from_config(c).optimizer)
    rng = np.random.default_rng(0)
    params = {"fc": {"kernel": rng.standard_normal((3, 2)).astype(np.float32),
                     "bias": rng.standard_normal(2).astype(np.float32)}}
    state = tx.init(params)
    w, b = params["fc"]["kernel"].astype(np.float64), params["fc"]["bias"].astype(np.float64)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    for t, scale in enumerate([0.1, 5.0, 0.2, 3.0]):   # steps 1 and 3 are clipped
        gw, gb = scale * rng.standard_normal(w.shape), scale * rng.standard_normal(b.shape)
        grads = {"fc": {"kernel": gw.astype(np.float32), "bias": gb.astype(np.float32)}}
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
        # Oracle: clip by global norm, L2 decay on the kernel only, Nesterov momentum.
        clip = min(1.0, 1.0 / np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2)))
        dw, db = clip * gw + 0.01 * w, clip * gb
        mw, mb = 0.9 * mw + dw, 0.9 * mb + db
        lr = float(optim.lr_schedule(plan_lib.from_config(c).optimizer)(t))
        w, b = w - lr * (dw + 0.9 * mw), b - lr * (db + 0.9 * mb)
        np.testing.assert_allclose(params["fc"]["kernel"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["fc"]["bias"], b, rtol=1e-5, atol=1e-6)


def test_empty_data_folder_is_refused(corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        trainer.train(small_config(corpus, **{"data.path": str(tmp_path / "empty")}),
                      str(tmp_path / "run"))


def test_cli_overrides_and_their_errors():
    config, args = cli.parse_args(["--config.train.num_steps=7", "--config.model.use_rope=true",
                                   "--config.train.lr=1e-3", "--workdir", "w"])
    assert (config.train.num_steps, config.model.use_rope, config.train.lr) == (7, True, 1e-3)
    assert args.workdir == "w" and config.preset == "tiny"
    small, _ = cli.parse_args(["--config", f"{cli.DEFAULT_CONFIG}:gpt2-small"])
    assert small.model.d_model == 768
    with pytest.raises(cli.ConfigError, match="Unknown config key 'train.nope'.*num_steps"):
        cli.parse_args(["--config.train.nope=1"])
    with pytest.raises(cli.ConfigError, match="expected a int"):
        cli.parse_args(["--config.train.num_steps=many"])
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        cli.parse_args(["--config", f"{cli.DEFAULT_CONFIG}:huge"])
    with pytest.raises(cli.ConfigError, match="does not exist"):
        cli.parse_args(["--config", "nowhere.py:tiny"])


def test_train_and_eval_scripts_end_to_end(corpus, tmp_path):
    path, data_dir = corpus
    # No --config: train.py's default, the sparse_pretrain recipe (75% block-sparse kernels),
    # with 16x16 blocks at this width.
    args = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.n_heads=2",
            "--config.sparsity.block_size=16", "--config.data.seq_len=32", f"--config.data.path={path}",
            f"--config.data.data_dir={data_dir}", "--config.train.batch_size=4",
            "--config.train.num_steps=4", "--config.train.log_every=2",
            "--config.train.eval_every=4", "--config.train.eval_batches=2",
            "--config.train.sample_tokens=8", f"--workdir={tmp_path}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done: step 4" in run.stdout
    out = subprocess.run([sys.executable, "eval.py", f"--workdir={tmp_path}", "--prompt=To be",
                          "--num_tokens=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and result["density"] == 0.25
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert len(result["sample"].encode()) >= 1
    bad = subprocess.run([sys.executable, "train.py", "--config.train.nope=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Unknown config key 'train.nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_resume_with_a_setting_that_changes_the_state_is_named(corpus, tmp_path):
    trainer.train(small_config(corpus, **{"train.num_steps": 4}), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError,
                       match="training state of another structure.*train.optimizer"):
        trainer.train(small_config(corpus, **{"train.num_steps": 8,
                                              "train.optimizer": "sgd"}), str(tmp_path))
