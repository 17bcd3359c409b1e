"""SFT data (data.format=sft): hand-written tokens and weights, the pipeline, the loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.data import sft
from sparse_gpt.data import tokenizers
from sparse_gpt.training import step as train_lib

E = 256  # ByteTokenizer's end-of-text id
a, b, c, d, e, f, x, y, z = (ord(ch) for ch in "abcdefxyz")
TOK = tokenizers.ByteTokenizer()


def make_cfg(tmp_path, **overrides):
    cfg = config_lib.base_config().data
    cfg.update(dict(data_dir=str(tmp_path / "cache"), tokenizer="byte", format="sft"),
               **overrides)
    return cfg


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_rows_are_written_out_by_hand():
    examples = [("0", ("ab", "xy")),            # fits: padded with eot, weight 0
                ("1", ("abcdef", "xyz")),       # 11 tokens > 8: truncated at the end
                ("2", ("", "x")),               # empty prompt: eot predicts the response
                ("3", ("abcdefab", "x"))]       # prompt fills the row: dropped
    tokens, weights, stats = sft.pad_examples(examples, TOK, seq_len=7)
    np.testing.assert_array_equal(tokens, [[E, a, b, x, y, E, E, E],
                                           [E, a, b, c, d, e, f, x],
                                           [E, x, E, E, E, E, E, E]])
    np.testing.assert_array_equal(weights, [[0, 0, 0, 1, 1, 1, 0, 0],
                                            [0, 0, 0, 0, 0, 0, 0, 1],
                                            [0, 1, 1, 0, 0, 0, 0, 0]])
    assert stats == dict(documents=4, sequences=3, tokens=3 + 1 + 2, bytes=2 + 1 + 1,
                         truncated=2, dropped=1, dropped_tokens=3 + 3)
    # What a batch row holds: the targets' weights, shifted by one.
    ex = data_lib._to_example({"tokens": tokens[0], "weights": weights[0]})
    np.testing.assert_array_equal(ex["inputs"], [E, a, b, x, y, E, E])
    np.testing.assert_array_equal(ex["targets"], [a, b, x, y, E, E, E])
    np.testing.assert_array_equal(ex["weights"], [0, 0, 1, 1, 1, 0, 0])


def test_loss_is_over_response_tokens_only():
    tokens, weights, _ = sft.pad_examples([("0", ("ab", "xy")), ("1", ("abc", "z"))], TOK, 7)
    rows = [data_lib._to_example({"tokens": t, "weights": w}) for t, w in zip(tokens, weights)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    logits = jax.random.normal(jax.random.key(0), (2, 7, 264)) * 3.0
    loss, total = train_lib.cross_entropy(logits, batch)
    # Manual: the targets x, y, eot of row 0 and z, eot of row 1, nothing else.
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    picked = [(0, 2, x), (0, 3, y), (0, 4, E), (1, 3, z), (1, 4, E)]
    manual = -np.mean([logp[i, t, v] for i, t, v in picked])
    assert float(total) == 5.0
    assert float(loss) == pytest.approx(manual, rel=1e-6)
    # Changing what a prompt (or padding) position should predict never changes the loss.
    scrambled = np.array(batch["targets"])
    scrambled[np.asarray(batch["weights"]) == 0] = 7
    loss2, _ = train_lib.cross_entropy(logits, dict(batch, targets=jnp.asarray(scrambled)))
    assert float(loss2) == float(loss)


def test_pipeline_shuffles_batches_and_resumes_with_weights(tmp_path):
    rows = [{"prompt": f"Q{i:02d}:", "response": "r" * (1 + i % 5)} for i in range(40)]
    cfg = make_cfg(tmp_path, path=write_jsonl(tmp_path / "sft.jsonl", rows), seq_len=12,
                   val_fraction=0.2)
    data = data_lib.make_data(cfg, batch_size=4, seed=1)
    assert data.name.startswith("sft_byte_L12_")
    st = data.stats
    assert st["train"]["documents"] + st["validation"]["documents"] == 40
    assert st["train"]["truncated"] == st["train"]["dropped"] == 0
    assert data.bytes_per_token == pytest.approx(st["validation"]["bytes"] /
                                                 st["validation"]["tokens"])
    # Every stored row is one of the examples, with exactly its hand-built weights.
    expected = {}
    for r in rows:
        t, w = sft.encode(TOK, r["prompt"], r["response"])
        t = np.pad(t, (0, 13 - len(t)), constant_values=E)
        expected[bytes(t[1:5].astype(np.uint8))] = (t, np.pad(w, (0, 13 - len(w))))
    it = data.train_iterator()
    seen = []
    for _ in range(3):
        batch = next(it)
        assert batch["inputs"].shape == batch["weights"].shape == (4, 12)
        for i in range(4):
            t, w = expected[bytes(batch["inputs"][i, 1:5].astype(np.uint8))]
            np.testing.assert_array_equal(batch["inputs"][i], t[:-1])
            np.testing.assert_array_equal(batch["targets"][i], t[1:])
            np.testing.assert_array_equal(batch["weights"][i], w[1:])
            seen.append(bytes(batch["inputs"][i, 1:5].astype(np.uint8)).decode())  # "Qnn:"
    assert seen != sorted(seen)  # shuffled
    state = it.get_state()
    after = next(it)
    resumed = data.train_iterator()
    resumed.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(resumed)["weights"], after["weights"])
    np.testing.assert_array_equal(next(resumed)["inputs"], next(it)["inputs"])
    val = data.val_batches(1)[0]
    assert val["weights"].sum() > 0 and set(np.unique(val["weights"])) <= {0.0, 1.0}


def test_text_format_is_unchanged(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 3)
    data = data_lib.make_data(make_cfg(tmp_path, path=path, format="text", seq_len=16), 2)
    assert not data.name.startswith("sft")
    np.testing.assert_array_equal(next(data.train_iterator())["weights"], 1.0)


@pytest.mark.parametrize("rows, overrides, match", [
    ([{"prompt": "a"}] * 3, {}, "lacks a string \"prompt\" or \"response\""),
    ([{"prompt": "a", "response": ""}] * 3, {}, "empty response"),
    ([{"prompt": "a", "response": "b"}], {}, "at least two"),
    ([{"prompt": "a", "response": "b"}] * 3, {"format": "chat"}, "Unknown data.format 'chat'"),
])
def test_bad_sft_input_names_the_problem(tmp_path, rows, overrides, match):
    cfg = make_cfg(tmp_path, path=write_jsonl(tmp_path / "s.jsonl", rows), **overrides)
    with pytest.raises(ValueError, match=match):
        data_lib.make_data(cfg, 2)


def test_sft_needs_a_jsonl_path(tmp_path):
    with pytest.raises(ValueError, match="needs --config.data.path"):
        data_lib.make_data(make_cfg(tmp_path, path=""), 2)
    (tmp_path / "notes.txt").write_text("text")
    with pytest.raises(ValueError, match="JSONL only"):
        data_lib.make_data(make_cfg(tmp_path, path=str(tmp_path / "notes.txt")), 2)
