"""Data identity and per-process reading: a saved data position is keyed by the corpus content
(not its paths or mtimes), and each process reads only its rows of every global batch.

Oracles: the batches of an uninterrupted single-process iterator, and the files' bytes.
"""

import hashlib
import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from sparse_gpt import config as config_lib
from sparse_gpt.data import dataset as data_lib
from sparse_gpt.data import fingerprint
from sparse_gpt.training import trainer

from helpers import assert_same, small_config, take


def make_cfg(path, cache, **overrides):
    c = config_lib.base_config().data
    c.update(dict(data_dir=str(cache), tokenizer="byte", path=str(path), seq_len=8,
                  val_fraction=0.2), **overrides)
    return c


def write_corpus(root):
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"doc{i}.txt").write_text("".join(f"line {k} of document {i}\n"
                                                  for k in range(6 + i)))
    return root


def built(cache):
    return sorted(os.listdir(cache / "text_corpus"))


def touch(root, ns):
    for name in os.listdir(root):
        os.utime(root / name, ns=(ns, ns))


# -------------------------------------------------------------------------- content identity

def test_touched_copied_and_moved_corpus_resumes_to_the_same_batches(tmp_path):
    a, cache = write_corpus(tmp_path / "a"), tmp_path / "cache"
    d = data_lib.make_data(make_cfg(a, cache), batch_size=3, seed=0)
    straight = take(d.train_iterator(), 9)
    it = d.train_iterator()
    take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    touch(a, 10**18)
    shutil.copytree(a, tmp_path / "copy", copy_function=shutil.copy)  # new files and mtimes
    shutil.move(str(a), str(tmp_path / "moved"))
    for where in ("copy", "moved"):
        again = data_lib.make_data(make_cfg(tmp_path / where, cache), batch_size=3, seed=0)
        assert again.name == d.name
        fresh = again.train_iterator()
        fresh.set_state(state)
        assert_same(take(fresh, 5), straight[4:])
    assert built(cache) == [d.name]   # no rebuild: the dataset is keyed by content


def test_changed_content_is_refused_naming_the_files_and_the_fix(tmp_path):
    root, cache = write_corpus(tmp_path / "c"), tmp_path / "cache"
    it = data_lib.make_data(make_cfg(root, cache), 3).train_iterator()
    next(it)
    state = it.get_state()
    doc1 = root / "doc1.txt"
    st = os.stat(doc1)
    text = doc1.read_text()
    doc1.write_text(text.replace("line 0", "LINE 0"))   # same size, then the old mtime back
    os.utime(doc1, ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "extra.txt").write_text("a new document\n" * 5)
    changed = data_lib.make_data(make_cfg(root, cache), 3)
    assert len(built(cache)) == 2   # a real change builds a new dataset
    with pytest.raises(ValueError, match=r"another corpus.*changed: doc1.txt; new: extra.txt"
                       r".*Restore the corpus.*fresh --workdir"):
        changed.train_iterator().set_state(state)


def test_other_packing_settings_are_named(tmp_path):
    root, cache = write_corpus(tmp_path / "c"), tmp_path / "cache"
    state = data_lib.make_data(make_cfg(root, cache), 3).train_iterator().get_state()
    other = data_lib.make_data(make_cfg(root, cache, seq_len=7), 3).train_iterator()
    with pytest.raises(ValueError, match=r"other settings \(seq_len 8 -> 7\).*--config.data"):
        other.set_state(state)


def test_digests_are_cached_by_stat_and_redone_after_a_touch(tmp_path, monkeypatch):
    root, cache = write_corpus(tmp_path / "c"), tmp_path / "cache"
    reads = []
    real = fingerprint.hashlib.file_digest
    monkeypatch.setattr(fingerprint.hashlib, "file_digest",
                        lambda f, name: reads.append(f.name) or real(f, name))
    files = [str(root / f"doc{i}.txt") for i in range(4)]
    first = fingerprint.file_digests(files, str(cache))
    assert len(reads) == 4
    assert fingerprint.file_digests(files, str(cache)) == first and len(reads) == 4
    touch(root, 10**18)
    assert fingerprint.file_digests(files, str(cache)) == first and len(reads) == 8
    assert first[2] == hashlib.sha256((root / "doc2.txt").read_bytes()).hexdigest()


def test_moved_corpus_resumes_training_to_the_same_parameters(corpus, tmp_path):
    src = tmp_path / "corpus"
    shutil.copytree(corpus[0], src, copy_function=shutil.copy)
    config = small_config((str(src), corpus[1]))
    full = trainer.train(config, str(tmp_path / "full"))
    run = str(tmp_path / "run")
    trainer.train(config, run, stop_after=4)                 # dies after the step-4 checkpoint
    shutil.move(str(src), str(tmp_path / "moved"))
    touch(tmp_path / "moved", 10**18)
    # A new data.path must stay a setting a resume may change: the data state itself checks
    # that the corpus content is the same (and names the changed files when it is not).
    resumed = trainer.train(small_config((str(tmp_path / "moved"), corpus[1])), run)
    assert int(resumed["state"].step) == 8
    for x, y in zip(*(jax.tree.leaves((r["state"].params, r["state"].opt_state))
                      for r in (full, resumed))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(tmp_path / "moved" / "doc0.txt", "a") as f:
        f.write("one more line\n")
    with pytest.raises(ValueError, match=r"changed: doc0.txt.*fresh --workdir"):
        trainer.train(small_config((str(tmp_path / "moved"), corpus[1])), run)


def test_state_of_an_old_mtime_keyed_dataset_resumes_with_a_warning(tmp_path, caplog):
    root, cache = write_corpus(tmp_path / "c"), tmp_path / "cache"
    d = data_lib.make_data(make_cfg(root, cache), 3)
    straight = take(d.train_iterator(), 3)
    it = d.train_iterator()
    next(it)
    state = it.get_state()
    legacy = {k: state[k] for k in ("seed", "batch_size", "num_workers", "grain")}
    legacy["dataset"] = d.name.rsplit("_", 1)[0] + "_0123456789abcdef"
    fresh = d.train_iterator()
    fresh.set_state(legacy)
    assert_same(take(fresh, 2), straight[1:])
    assert "predates content-keyed datasets" in caplog.text
    legacy["dataset"] = "byte_L9_0123456789abcdef"
    with pytest.raises(ValueError, match="other tokenizer/seq_len"):
        d.train_iterator().set_state(legacy)


# ------------------------------------------------------------------------ per-process reading

@pytest.mark.parametrize("batch_size, count", [(4, 2), (4, 4), (6, 3), (3, 2)])
def test_process_blocks_make_up_the_single_process_batch(tmp_path, batch_size, count):
    c = make_cfg(write_corpus(tmp_path / "c"), tmp_path / "cache")
    one = data_lib.make_data(c, batch_size, seed=1, process_count=1)
    whole = take(one.train_iterator(), 7)
    parts = [data_lib.make_data(c, batch_size, seed=1, process_index=p, process_count=count)
             for p in range(count)]
    if batch_size % count:   # no even split: every process reads the whole batch
        assert all(p.rows == slice(0, batch_size) for p in parts)
        assert_same(take(parts[1].train_iterator(), 7), whole)
        return
    local = [take(p.train_iterator(), 7) for p in parts]
    for j in range(7):
        for k in whole[j]:
            np.testing.assert_array_equal(np.concatenate([b[j][k] for b in local]), whole[j][k])
    vals = [p.val_batches(3) for p in parts]
    for j, v in enumerate(one.val_batches(3)):
        np.testing.assert_array_equal(np.concatenate([b[j]["inputs"] for b in vals]),
                                      v["inputs"])
    # A state saved by process 1 of `count` resumes a single process at the same global step.
    it = parts[1].train_iterator()
    take(it, 3)
    fresh = one.train_iterator()
    fresh.set_state(json.loads(json.dumps(it.get_state())))
    assert_same(take(fresh, 4), whole[3:])


def test_a_process_reads_only_its_rows():
    reads = []

    def record(i):
        reads.append(int(i))
        return {"x": np.int32(i)}

    ds = data_lib._rows_of_batches(grain.MapDataset.range(100).map(record), 6, slice(2, 4))
    assert [ds[j]["x"].tolist() for j in range(3)] == [[2, 3], [8, 9], [14, 15]]
    assert reads == [2, 3, 8, 9, 14, 15]


def test_bad_process_index_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        data_lib.process_rows(4, 2, 2)
