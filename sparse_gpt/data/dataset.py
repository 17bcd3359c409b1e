"""Batches for training and evaluation: grain iterators over a built dataset.

One call gives everything training and evaluation need::

    data = make_data(config.data, batch_size=32, seed=0)
    it = data.train_iterator()            # infinite, shuffled, resumable
    batch = next(it)                      # {"inputs", "targets": int32[B, L], "weights": f32[B, L]}
    state = it.get_state()                # JSON-safe dict, goes into the checkpoint
    evals = data.val_batches(8)           # the same list on every call
    bpb = loss_nats / math.log(2) / data.bytes_per_token

The data come from ``builder.py`` (the TFDS builder; it reads ``sources.py``/``sft.py``):
``config.data.path`` and the rest of ``config.data`` are documented there.

**Several processes** (``jax.process_count() = P > 1``): process ``p`` reads only rows
``[p * B/P, (p + 1) * B/P)`` of every global batch of ``B`` rows (all ``B`` when P does not
divide B); in process order the blocks are exactly the single-process batch, so the batches
and losses of a run do not depend on how many processes read them.
``sharding.put_batch`` places each block on its process's devices. The saved iterator state is
the position in the global stream, the same on every process, so a checkpoint written by P
processes resumes under any other number.

**Resume safety**: a saved state names the dataset (``Data.name``, a hash of the corpus
*content* and of tokenizer, seq_len, val_fraction and format), the seed, batch size and
worker count; restoring it into another data stream fails with the reason (which files
changed, which setting) and the fix. Touching, copying or moving the corpus changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

from absl import flags
import grain
import jax
import numpy as np

from sparse_gpt.data import builder as builder_lib
from sparse_gpt.data import fingerprint
from sparse_gpt.data.tokenizers import get_tokenizer

# Above this many files the data state keeps only the corpus digest, not a digest per file.
_MAX_FILES_IN_STATE = 1000


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of each global batch that process ``process_index`` of ``process_count`` reads.

    Raises:
      ValueError: a process index outside ``[0, process_count)``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if batch_size % process_count:
        return slice(0, batch_size)  # every process reads the whole batch
    n = batch_size // process_count
    return slice(process_index * n, (process_index + 1) * n)


def _rows_of_batches(examples: grain.MapDataset, batch_size: int,
                     rows: slice) -> grain.MapDataset:
    """Element ``j``: rows ``rows`` of global batch ``j`` of ``examples``, reading only those.

    Batches of ``n = len(rows)`` elements, every ``B/n``-th from the block's index: only this
    process's records are read, and the element index is the global batch index.
    """
    n = rows.stop - rows.start
    if n == batch_size:
        return examples.batch(batch_size, drop_remainder=True)
    return examples.batch(n, drop_remainder=True)[rows.start // n::batch_size // n]


def _to_example(record: dict[str, Any]) -> dict[str, np.ndarray]:
    tokens = np.asarray(record["tokens"], dtype=np.int32)
    if "weights" in record:  # sft: a token's weight says whether it is a trained target
        weights = np.asarray(record["weights"], dtype=np.float32)[1:]
    else:
        weights = np.ones(tokens.shape[0] - 1, dtype=np.float32)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}


def _grain_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e, so seeds s and s + 1 would share all but one epoch
    # order; hashing the seed makes such overlaps vanishingly unlikely.
    return int.from_bytes(hashlib.sha256(f"sparse_gpt:{int(seed)}".encode()).digest()[:4], "big")


class TrainIterator:
    """An infinite iterator of train batches whose state can be saved as JSON and resumed.

    The state names the dataset, seed and batch size, so a checkpoint is never resumed into a
    different data stream by accident; ``about`` (corpus digests, packing settings) is stored
    beside them to say what differs when it is refused.
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any],
                 about: dict[str, Any] | None = None):
        self._it = iter(dataset)
        self._identity = identity
        self._about = dict(about or {})

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """Returns a JSON-serialisable state (grain's iterator state plus what it is for)."""
        state = dict(self._identity, **self._about, grain=self._it.get_state())
        return json.loads(json.dumps(state))  # fails here, not at checkpoint time, if not JSON

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from ``get_state()``'s output (possibly after a JSON round trip).

        Raises:
          ValueError: the state belongs to another corpus content, packing, seed or batch size.
        """
        stream = [k for k in self._identity if k != "dataset"]
        other = {k: state.get(k) for k in stream}
        if other != {k: self._identity[k] for k in stream}:
            raise ValueError(f"This data state was saved for {other}, but the iterator is "
                             f"{ {k: self._identity[k] for k in stream} }. Resume with the "
                             "same data config, seed and batch size, or start from a fresh "
                             "workdir.")
        if state.get("dataset") != self._identity["dataset"]:
            self._check_same_data(state)
        self._it.set_state(state["grain"])

    def _check_same_data(self, state: dict[str, Any]) -> None:
        if "corpus" not in state:
            # Written before datasets were keyed by content (the name hashed paths and
            # mtimes): the content cannot be checked, the packing settings partly can.
            prefix = self._identity["dataset"].rsplit("_", 1)[0]
            if str(state.get("dataset", "")).rsplit("_", 1)[0] != prefix:
                raise ValueError(
                    f"This data state was saved for dataset {state.get('dataset')!r}, built "
                    f"with other tokenizer/seq_len settings than this run's "
                    f"{self._identity['dataset']!r}. Restore the run's data config, or start "
                    "from a fresh --workdir.")
            logging.warning(
                "The checkpoint's data state predates content-keyed datasets: resuming it on "
                "%s without checking that the corpus is the one it was trained on.",
                self._identity["dataset"])
            return
        mine = self._about.get("packing", {})
        settings = [f"{k} {state.get('packing', {}).get(k)!r} -> {v!r}" for k, v in mine.items()
                    if state.get("packing", {}).get(k) != v]
        if settings:
            raise ValueError(
                f"This data state was saved for data packed with other settings "
                f"({'; '.join(settings)}), so this run would read other batches. Restore the "
                "run's --config.data.* settings, or start from a fresh --workdir.")
        if state["corpus"] != self._about.get("corpus"):
            saved, now = state.get("corpus_files"), self._about.get("corpus_files")
            what = (fingerprint.describe_change(saved, now) if saved and now
                    else "the files' digests differ")
            raise ValueError(
                f"This data state was saved for another corpus: the content of the files "
                f"under data.path changed since the checkpoint ({what}), so this run would "
                "read other batches than the interrupted one. Restore the corpus the run was "
                "trained on (only content and relative file names count: touched, copied or "
                "moved files resume fine), or train on the new corpus from a fresh --workdir.")
        raise ValueError(f"This data state was saved for dataset {state.get('dataset')!r}, "
                         f"not {self._identity['dataset']!r}. Restore the run's data config, "
                         "or start from a fresh --workdir.")


@dataclasses.dataclass
class Data:
    """The train and validation streams of one data config, as read by one process.

    Attributes:
      tokenizer: the tokenizer the sequences were built with.
      batch_size: sequences per global batch (B).
      seed: the shuffling seed.
      seq_len: tokens per ``inputs`` row (L).
      num_train_sequences: packed train sequences (one epoch).
      num_val_sequences: packed validation sequences.
      bytes_per_token: UTF-8 bytes per token of the validation text (eot tokens included), so
        ``bits_per_byte = loss_nats_per_token / ln(2) / bytes_per_token``.
      stats: per split (``train``, ``validation``) counts of documents, bytes, tokens,
        sequences and dropped tail tokens.
      name: the dataset's builder-config name (a hash of everything it depends on).
      num_workers: grain worker processes of the train iterator (0: threads in this process).
      process_index: this process (``jax.process_index()`` unless given).
      process_count: processes reading the batches (``jax.process_count()`` unless given).
    """

    tokenizer: Any
    batch_size: int
    seed: int
    seq_len: int
    num_train_sequences: int
    num_val_sequences: int
    bytes_per_token: float
    stats: dict[str, dict[str, int]]
    name: str
    num_workers: int
    process_index: int
    process_count: int
    _train_source: Any = dataclasses.field(repr=False)
    _val_source: Any = dataclasses.field(repr=False)
    _about: dict = dataclasses.field(repr=False)

    @property
    def rows(self) -> slice:
        """The rows of every global batch this process reads (see :func:`process_rows`)."""
        return process_rows(self.batch_size, self.process_index, self.process_count)

    def train_iterator(self) -> TrainIterator:
        """Returns an infinite iterator of shuffled train batches (new order every epoch)."""
        examples = (grain.MapDataset.source(self._train_source)
                    .shuffle(seed=_grain_seed(self.seed))
                    .repeat()  # epoch e is read at indices [e * N, (e + 1) * N): reshuffled
                    .map(_to_example))
        ds = _rows_of_batches(examples, self.batch_size, self.rows)
        # Few threads and a short buffer: the data are small next to a train step, and the
        # machines running the tests have two cores.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if self.num_workers > 0:
            # grain's worker processes read absl flags, which a notebook never parses; the
            # script that calls this needs the usual `if __name__ == "__main__":` guard.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        # grain's state layout differs with and without workers, hence num_workers here. The
        # rows are not: every process's state is the same global position.
        identity = dict(dataset=self.name, seed=int(self.seed), batch_size=int(self.batch_size),
                        num_workers=int(self.num_workers))
        return TrainIterator(it_ds, identity, self._about)

    def val_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """Returns this process's rows of the first ``num_batches`` validation batches.

        Args:
          num_batches: how many batches; the same list is returned on every call (validation
            wraps around when it holds fewer than ``num_batches * batch_size`` rows).
        """
        examples = grain.MapDataset.source(self._val_source).repeat().map(_to_example)
        ds = _rows_of_batches(examples, self.batch_size, self.rows)
        return [ds[i] for i in range(int(num_batches))]


def _build(data_config, tokenizer) -> builder_lib.TextCorpus:
    """Builds the dataset; with several processes, process 0 first (they may share a disk)."""
    if jax.process_count() == 1:
        return builder_lib.build_dataset(data_config, tokenizer)
    from jax.experimental import multihost_utils
    built, error = None, None
    if jax.process_index() == 0:
        try:
            built = builder_lib.build_dataset(data_config, tokenizer)
        except Exception as e:  # raised after the barrier, so no process waits forever
            error = e
    multihost_utils.sync_global_devices("sparse_gpt.data: dataset built by process 0")
    if error is not None:
        raise error
    return built or builder_lib.build_dataset(data_config, tokenizer)


def make_data(data_config, batch_size: int, seed: int | None = None, *,
              process_index: int | None = None, process_count: int | None = None) -> Data:
    """Builds (or loads from the cache) the dataset of ``data_config`` and wraps it for training.

    Args:
      data_config: the ``data`` section of the config.
      batch_size: sequences per global batch.
      seed: shuffling seed; ``None`` -> ``data_config.seed``.
      process_index: the reading process (default ``jax.process_index()``).
      process_count: the processes sharing each batch (default ``jax.process_count()``);
        ``process_count=1`` reads whole global batches.

    Returns:
      A ``Data`` with ``train_iterator()``, ``val_batches(n)`` and sizes.

    Raises:
      ValueError: bad path, no documents, unknown tokenizer, a split too small, bad batch size.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    seed = int(getattr(data_config, "seed", 0) if seed is None else seed)
    process_count = jax.process_count() if process_count is None else int(process_count)
    process_index = (jax.process_index() if process_index is None else int(process_index))
    process_rows(int(batch_size), process_index, process_count)  # validates the pair
    tokenizer = get_tokenizer(data_config)
    builder = _build(data_config, tokenizer)
    cfg = builder.builder_config
    stats = builder.info.metadata["splits"]
    train, val = (builder.as_data_source(split=s) for s in ("train", "validation"))
    about = dict(corpus=cfg.corpus, packing=dict(tokenizer=cfg.tokenizer, seq_len=cfg.seq_len,
                                                 val_fraction=cfg.val_fraction, format=cfg.format))
    if len(cfg.files) <= _MAX_FILES_IN_STATE:
        about["corpus_files"] = {f.replace(os.sep, "/"): d
                                 for f, d in zip(cfg.files, cfg.digests)}
    return Data(
        tokenizer=tokenizer, batch_size=int(batch_size), seed=seed, seq_len=cfg.seq_len,
        num_train_sequences=len(train), num_val_sequences=len(val),
        bytes_per_token=stats["validation"]["bytes"] / stats["validation"]["tokens"],
        stats=stats, name=cfg.name, num_workers=int(getattr(data_config, "num_workers", 0)),
        process_index=process_index, process_count=process_count,
        _train_source=train, _val_source=val, _about=about)
