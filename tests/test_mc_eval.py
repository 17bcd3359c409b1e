"""Multiple-choice scoring: scores vs a plain model.apply loop, known answers, the format."""

import functools
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import plan as plan_lib
from sparse_gpt.evaluation import mc_eval
from sparse_gpt.data import tokenizers
from sparse_gpt.model import gpt as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizers.ByteTokenizer()
V = TOK.vocab_size  # 257 real ids of a 264-row embedding


def make_model(max_len=128, seed=0):
    cfg = model_lib.ModelConfig(vocab_size=264, n_layers=2, d_model=32, n_heads=4,
                                max_len=max_len)
    model = model_lib.GPT(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    # numpy draws (no init compilation); std 0.3 makes the logits peaked enough to rank
    # choices, and the sparse mask checks that masks reach the model.
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          shapes["params"])
    masks = jax.tree.map(lambda m: rng.random(m.shape) < 0.7, shapes["masks"])
    return model, params, masks


@functools.partial(jax.jit, static_argnums=0)  # for speed only: eager apply of nn.scan is slow
def _apply(model, variables, tokens):
    return model.apply(variables, tokens)


def oracle_loglik(model, params, masks, tokens, n_choice):
    """One unpadded sequence through model.apply; log-softmax over the real vocabulary."""
    logits = _apply(model, {"params": params, "masks": masks}, jnp.asarray([tokens[:-1]]))[0]
    logits = np.asarray(logits, np.float64)[:, :V]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    n = len(tokens)
    return sum(logp[t - 1, tokens[t]] for t in range(n - n_choice, n))


def test_scores_equal_an_unbatched_model_apply_loop():
    model, params, masks = make_model()
    # Choices of equal length per item: three sequence lengths, three oracle compilations.
    items = [mc_eval.Item("To be, or not to be, that is the", (" question", " pleasure",
                                                                " darkness"), 0),
             mc_eval.Item("All the world's a", (" stage", " ghost", " crown", " sword"), 2),
             mc_eval.Item("Brevity is the soul of", (" wit", " art", " ink"), 1)]
    seqs, expected = [], []
    for it in items:
        for choice in it.choices:
            ctx, cont = TOK.encode(it.context), TOK.encode(choice)
            tokens = [TOK.eot_id] + ctx + cont           # short enough: nothing truncated
            assert mc_eval.encode(TOK, it.context, choice, 128) == (tokens, len(cont))
            seqs.append((tokens, len(cont)))
            expected.append(oracle_loglik(model, params, masks, tokens, len(cont)))
    got = mc_eval.score(model, params, masks, seqs, V, batch_size=4)  # last batch padded
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert np.ptp(expected) > 1.0  # the scores differ, so the order check means something
    np.testing.assert_allclose(mc_eval.score(model, params, masks, seqs, V, batch_size=16),
                               got, rtol=1e-5, atol=1e-5)
    # The accuracies are those of the oracle's scores.
    res = mc_eval.evaluate_items(model, params, masks, TOK, items, batch_size=4)
    k, hits, hits_norm = 0, 0, 0
    for it in items:
        s = np.array(expected[k:k + len(it.choices)])
        nbytes = np.array([len(c.encode()) for c in it.choices])
        hits += int(np.argmax(s)) == it.label
        hits_norm += int(np.argmax(s / nbytes)) == it.label
        k += len(it.choices)
    assert res == {"acc": hits / len(items), "acc_norm": hits_norm / len(items),
                   "n": len(items)}


def test_long_context_is_cut_from_the_left():
    model, params, masks = make_model(max_len=16)
    context, choice = "abcdefghijklmnopqrstuvwxyz", " end"
    tokens, n = mc_eval.encode(TOK, context, choice, 16)
    assert tokens == TOK.encode("mnopqrstuvwxyz" + choice)[1:] and n == 4
    assert len(tokens) == 17
    got = mc_eval.score(model, params, masks, [(tokens, n)], V, batch_size=2)
    np.testing.assert_allclose(got, [oracle_loglik(model, params, masks, tokens, n)],
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="longer than the model context of 16"):
        mc_eval.encode(TOK, "", "x" * 17, 16)


def unigram_model(scores_V):
    """A model whose next-token distribution is softmax(scores) whatever the input.

    ln_f's scale is 0 and its bias the unit vector e_0, so the final hidden state is e_0 at
    every position and the tied head's logits are the embedding's first column.
    """
    model, params, masks = make_model()
    params = jax.tree.map(np.asarray, params)
    params["ln_f"]["scale"] = np.zeros_like(params["ln_f"]["scale"])
    params["ln_f"]["bias"] = np.eye(32, dtype=np.float32)[0]
    wte = np.array(params["wte"]["embedding"])
    wte[:, 0] = scores_V
    params["wte"]["embedding"] = wte
    return model, params, masks


def test_known_answers_for_acc_and_acc_norm(tmp_path):
    scores = np.zeros(264, np.float32)
    scores[[ord("y"), ord("e"), ord("s")]] = 5.0
    scores[V:] = 50.0  # embedding padding: must never take probability mass
    model, params, masks = unigram_model(scores)
    logp = scores[:V] - np.log(np.exp(scores[:V].astype(np.float64)).sum())
    hi, lo = logp[ord("y")], logp[ord("q")]
    items = [
        # " yes" is likelier in total and per byte: both accuracies are right.
        {"context": "Is it?", "choices": [" no", " yes"], "label": 1},
        # "eeeeeeeeeq" (10 bytes) loses in total (9 hi + lo < 2 lo) but wins per byte.
        {"context": "Pick", "choices": ["eeeeeeeeeq", "qq"], "label": 0},
    ]
    path = tmp_path / "known.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    seqs = [mc_eval.encode(TOK, i["context"], c, 128) for i in items for c in i["choices"]]
    got = mc_eval.score(model, params, masks, seqs, V)
    np.testing.assert_allclose(got, [logp[ord(" ")] + 2 * lo, logp[ord(" ")] + 3 * hi,
                                     9 * hi + lo, 2 * lo], rtol=1e-5)
    assert 9 * hi + lo < 2 * lo and (9 * hi + lo) / 10 > lo
    res = mc_eval.evaluate_tasks(model, params, masks, TOK, [str(path)])
    assert res == {"known": {"acc": 0.5, "acc_norm": 1.0, "n": 2}}


def test_accuracy_takes_the_first_of_ties():
    assert mc_eval.accuracy([np.array([-1.0, -1.0]), np.array([-3.0, -1.0])], [0, 0]) == 0.5
    assert mc_eval.accuracy([np.array([-4.0, -3.0])], [0], [np.array([4.0, 1.0])]) == 1.0


@pytest.mark.parametrize("line, match", [
    ("not json", "is not JSON"),
    ('{"context": "a", "choices": [" b", " c"]}', "int label"),
    ('{"context": "a", "choices": [" b", " c"], "label": true}', "int label"),
    ('{"context": "a", "choices": [" b"], "label": 0}', "at least two non-empty"),
    ('{"context": "a", "choices": [" b", ""], "label": 0}', "at least two non-empty"),
    ('{"context": "a", "choices": [" b", " c"], "label": 2}', "label 2 outside 0..1"),
])
def test_bad_task_lines_are_named(tmp_path, line, match):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "label": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:2 .*{match}|t.jsonl:2 {match}"):
        mc_eval.load_task(str(path))


def test_readme_format_sample_task_and_packaging(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    example = re.search(r'^\{"context": .*\}$', readme, re.M)
    assert example, "README documents the task format with an example line"
    (tmp_path / "readme.jsonl").write_text(example.group(0) + "\n")
    assert len(mc_eval.load_task(str(tmp_path / "readme.jsonl"))) == 1
    items = mc_eval.load_task(mc_eval.SAMPLE_TASK)
    assert len(items) >= 20 and len({it.label for it in items}) == 4
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        assert "tasks/*.jsonl" in f.read()
    with pytest.raises(ValueError, match="named 'sample_mc'"):
        mc_eval.load_tasks([mc_eval.SAMPLE_TASK, mc_eval.SAMPLE_TASK])


def test_eval_cli_rejects_a_bad_task_before_loading_the_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    with pytest.raises(SystemExit, match="does not exist"):
        eval_cli.main(["--workdir", str(tmp_path / "nothing"), "--tasks",
                       str(tmp_path / "missing.jsonl")])


def test_eval_cli_reports_tasks_of_a_run(tmp_path, capsys):
    """eval.py --tasks on a workdir (one checkpoint of an initialised tiny model)."""
    from sparse_gpt import cli
    from sparse_gpt.training import checkpoint
    from sparse_gpt.training import step as train_lib
    from sparse_gpt import config as config_lib
    (tmp_path / "doc0.txt").write_text("To be, or not to be, that is the question. " * 40)
    (tmp_path / "doc1.txt").write_text("All the world's a stage, and all the men and women. " * 40)
    c = config_lib.get_config("tiny")
    for key, value in {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2,
                       "model.max_len": 32, "data.seq_len": 32, "data.path": str(tmp_path),
                       "data.data_dir": str(tmp_path / "tfds"), "data.val_fraction": 0.5,
                       "train.batch_size": 8, "train.eval_batches": 1}.items():
        cli.apply_override(c, key, str(value))
    workdir = tmp_path / "run"
    os.makedirs(workdir)
    (workdir / "config.json").write_text(c.to_json_best_effort())
    model, tx, method = train_lib.build(plan_lib.from_config(c))
    state = jax.jit(lambda r: train_lib.init_state(plan_lib.from_config(c), model, tx, method, r))(jax.random.key(0))
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(1, state, {}, checkpoint.make_meta(model.cfg, state))
    ckpt.close()

    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    eval_cli.main(["--workdir", str(workdir), "--tasks", mc_eval.SAMPLE_TASK,
                   "--eval_batches", "1", "--task_batch_size", "8"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = mc_eval.evaluate_tasks(model, state.params, state.masks, TOK,
                                      [mc_eval.SAMPLE_TASK])
    assert out["tasks"] == expected and expected["sample_mc"]["n"] == 22
    assert out["step"] == 0 and "loss" in out
