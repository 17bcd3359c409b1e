"""Text data without TensorFlow: TFDS (array_record) for tokenise-and-pack, grain for batches.

One call gives everything training and evaluation need::

    data = make_data(config.data, batch_size=32, seed=0)
    it = data.train_iterator()            # infinite, shuffled, resumable
    batch = next(it)                      # {"inputs", "targets": int32[B, L], "weights": f32[B, L]}
    state = it.get_state()                # JSON-safe dict, goes into the checkpoint
    evals = data.val_batches(8)           # the same list on every call
    bpb = loss_nats / math.log(2) / data.bytes_per_token

Sources (``config.data.path``): "" is the bundled Shakespeare corpus
(``sparse_gpt/corpus/shakespeare.jsonl.gz``, 42 works); otherwise a file or a folder (searched
recursively) of ``.txt`` (one document per file) and ``.jsonl`` (one ``{"text": ...}`` document
per line) files, optionally gzipped. ``config.data.format = "sft"`` reads ``{"prompt": ...,
"response": ...}`` JSONL instead: one padded example per row, loss weights 0 on the prompt
(``sft.py``); shuffling, batching and resuming are the same.

The ``TextCorpus`` TFDS builder splits documents into train/validation by a hash of each
document's id (``relative/path:line``), so adding files never moves existing documents. Each
split's documents, in order, are tokenised and joined with the eot token into one stream, cut
into ``seq_len + 1``-token rows (the tail shorter than a row is dropped) and stored in
array_record files; ``inputs``/``targets`` are a row without its last/first token. The builder
config name hashes the tokenizer, seq_len, val_fraction and the source files' paths, sizes and
mtimes, so any change builds a new dataset instead of reusing a stale one. Cache folder:
``config.data.data_dir``, else ``$SPARSE_GPT_DATA_DIR``, else ``~/.cache/sparse_gpt/tfds``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from typing import Any

from absl import flags
from absl import logging as absl_logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from sparse_gpt.data import sft
from sparse_gpt.data.tokenizers import get_tokenizer

BUNDLED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "corpus", "shakespeare.jsonl.gz")
DATA_DIR_ENV = "SPARSE_GPT_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "sparse_gpt", "tfds")


def resolve_data_dir(data_config) -> str:
    """Returns the TFDS cache folder: data_dir, else $SPARSE_GPT_DATA_DIR, else ~/.cache/..."""
    d = getattr(data_config, "data_dir", "") or os.environ.get(DATA_DIR_ENV, "")
    return os.path.abspath(os.path.expanduser(d or DEFAULT_DATA_DIR))


SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_PATH_FIX = ("Set --config.data.path to a .txt/.jsonl(.gz) file or a folder of them, or to \"\" "
             "for the bundled Shakespeare corpus.")


def list_source_files(path: str) -> tuple[str, list[str]]:
    """Returns ``(root, sorted paths relative to root)`` of the supported files at ``path``.

    Raises:
      ValueError: the path is missing, or holds no supported file.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"Data path {path} does not exist. {_PATH_FIX}")
    if os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise ValueError(f"Data file {path} is not one of {', '.join(SUFFIXES)}. {_PATH_FIX}")
        return os.path.dirname(path), [os.path.basename(path)]
    files = []
    for folder, subdirs, names in os.walk(path):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # skip .git and friends
        files += [os.path.relpath(os.path.join(folder, n), path) for n in names
                  if n.endswith(SUFFIXES) and not n.startswith(".")]
    if not files:
        raise ValueError(f"No {', '.join(SUFFIXES)} files under {path}. {_PATH_FIX}")
    return path, sorted(files)


def json_lines(f, where: str, hint: str):
    """Yields ``(line_number, object)`` for the non-blank lines of a JSONL file.

    Raises:
      ValueError: a line is not JSON; the message names ``where:line`` and ends with ``hint``.
    """
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{n} is not JSON ({e}). {hint}") from e


def read_documents(root: str, files: list[str]) -> list[tuple[str, str]]:
    """Returns ``(doc_id, text)`` of every non-empty document, in file and line order.

    Raises:
      ValueError: a file is unreadable, not UTF-8 or bad JSONL, or every document is empty.
    """
    docs = []
    for rel in files:
        full = os.path.join(root, rel)
        opener = gzip.open if rel.endswith(".gz") else open
        try:
            with opener(full, "rt", encoding="utf-8") as f:
                if rel.endswith((".txt", ".txt.gz")):
                    docs.append((rel, f.read()))
                    continue
                for n, obj in json_lines(f, full, "A .jsonl file needs one "
                                         "{\"text\": ...} object per line."):
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise ValueError(f"{full}:{n} has no string field \"text\". A .jsonl "
                                         f"file needs one {{\"text\": ...}} object per line.")
                    docs.append((f"{rel}:{n}", obj["text"]))
        except UnicodeDecodeError as e:
            raise ValueError(f"{full} is not UTF-8 text ({e}). Re-encode it as UTF-8 or move "
                             f"it out of {root}.") from e
        except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated archives
            raise ValueError(f"Cannot read {full} ({e}). Fix or remove the file.") from e
    docs = [(i, t) for i, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"Every document in {', '.join(files[:5])} under {root} is empty. "
                         f"Add text to them. {_PATH_FIX}")
    return docs


def _unit_hash(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
    """Splits documents into ``(train, val)`` by a hash of their ids, each non-empty.

    A document goes to validation when the hash of its id, mapped to [0, 1), is below
    ``val_fraction``; if that leaves a side empty the document nearest the threshold moves.
    A lone document (one .txt file) is cut instead: its last ``val_fraction`` of characters,
    from a line start, becomes the validation document.
    """
    if len(docs) == 1:
        doc_id, text = docs[0]
        cut = int(len(text) * (1.0 - val_fraction))
        nl = text.find("\n", cut)
        cut = nl + 1 if 0 <= nl < len(text) - 1 else cut
        cut = min(max(cut, 1), len(text) - 1)
        return [(doc_id + "#train", text[:cut])], [(doc_id + "#val", text[cut:])]
    u = [_unit_hash(doc_id) for doc_id, _ in docs]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


def pack(docs: list[tuple[str, str]], tokenizer, seq_len: int):
    """Tokenises ``docs``, joins them with eot and cuts the stream into rows of seq_len + 1.

    Returns:
      ``(seqs_NxL1, stats)``: int32 rows, and counts of documents, UTF-8 bytes, stream tokens
      (eot included), sequences and the dropped tail tokens.
    """
    eot, parts, n_bytes = np.array([tokenizer.eot_id], np.int32), [], 0
    for k, (_, text) in enumerate(docs):
        if k:
            parts.append(eot)
        parts.append(tokenizer.encode_array(text))
        n_bytes += len(text.encode("utf-8"))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    n = len(stream) // (seq_len + 1)
    stats = dict(documents=len(docs), bytes=n_bytes, tokens=int(len(stream)), sequences=n,
                 dropped_tokens=int(len(stream) - n * (seq_len + 1)))
    return stream[:n * (seq_len + 1)].reshape(n, seq_len + 1), stats


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """What a built dataset depends on; ``name`` is a hash of all of it."""

    files: tuple[str, ...] = ()
    root: str = ""
    tokenizer: str = "byte"
    bpe_dir: str = ""
    seq_len: int = 256
    val_fraction: float = 0.05
    format: str = "text"         # text | sft (prompt/response JSONL, see sft.py)


def _config_for(data_config) -> TextCorpusConfig:
    """Validates the data config and turns it into a keyed builder config."""
    seq_len = int(data_config.seq_len)
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}; e.g. "
                         f"--config.data.seq_len=256.")
    val_fraction = float(data_config.val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}; "
                         f"e.g. --config.data.val_fraction=0.05.")
    tokenizer = str(data_config.tokenizer).strip().lower()
    fmt = str(getattr(data_config, "format", "text") or "text").strip().lower()
    if fmt not in sft.FORMATS:
        raise ValueError(f"Unknown data.format {fmt!r}; choose one of {', '.join(sft.FORMATS)} "
                         "(--config.data.format=sft for prompt/response JSONL).")
    if fmt == "sft" and not data_config.path:
        raise ValueError("data.format=sft needs --config.data.path: a .jsonl file or folder of "
                         "{\"prompt\": ..., \"response\": ...} lines.")
    path = data_config.path or BUNDLED_CORPUS
    root, files = list_source_files(path)
    stat = [os.stat(os.path.join(root, f)) for f in files]
    fingerprint = [[os.path.join(root, f), st.st_size, st.st_mtime_ns]
                   for f, st in zip(files, stat)]
    key = dict(files=fingerprint, tokenizer=tokenizer, seq_len=seq_len,
               val_fraction=val_fraction)
    if fmt != "text":
        key["format"] = fmt  # only here, so text datasets keep their cache names
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return TextCorpusConfig(
        name=f"{'sft_' if fmt == 'sft' else ''}{tokenizer}_L{seq_len}_{digest}",
        version=TextCorpus.VERSION,
        description=f"{path} | tokenizer={tokenizer} seq_len={seq_len} val={val_fraction}",
        files=tuple(files), root=root, tokenizer=tokenizer,
        bpe_dir=getattr(data_config, "bpe_dir", ""), seq_len=seq_len, val_fraction=val_fraction,
        format=fmt)


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files -> packed token sequences of length seq_len + 1, split train/val."""

    # Bump when the packing or the stored format changes.
    VERSION = tfds.core.Version("1.0.0")
    # TFDS finds a builder's source file (to look for download checksums beside it) through
    # importlib_resources, which it does not install; nothing is downloaded here, so skip it.
    code_path = None
    # Set by build_dataset so that GPT-2's tokenizer is not built twice.
    tokenizer = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {"tokens": tfds.features.Tensor(shape=(cfg.seq_len + 1,), dtype=np.int32,
                                                   encoding=tfds.features.Encoding.BYTES)}
        if cfg.format == "sft":  # per-token loss weights (0 on prompt and padding)
            features["weights"] = tfds.features.Tensor(
                shape=(cfg.seq_len + 1,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Packed token sequences of local text documents (sparse_gpt.data.dataset).",
            features=tfds.features.FeaturesDict(features),
            # Record i is sequence i: tests and reproducibility rely on the stored order.
            disable_shuffling=True,
            # Per-split byte/token counts, read back for bits-per-byte.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        cfg = self.builder_config
        tok = self.tokenizer or get_tokenizer(cfg)
        is_sft = cfg.format == "sft"
        docs = (sft.read_examples if is_sft else read_documents)(cfg.root, cfg.files)
        splits = split_documents(docs, cfg.val_fraction)
        generators, stats = {}, {}
        for split, split_docs in zip(("train", "validation"), splits):
            if is_sft:
                seqs, weights, stats[split] = sft.pad_examples(split_docs, tok, cfg.seq_len)
            else:
                (seqs, stats[split]), weights = pack(split_docs, tok, cfg.seq_len), None
            if len(seqs) == 0:
                raise ValueError(
                    f"The {split} split of {cfg.root} holds {stats[split]['tokens']} tokens "
                    f"({len(split_docs)} documents), fewer than one sequence of seq_len + 1 = "
                    f"{cfg.seq_len + 1}. Add text, lower --config.data.seq_len, or change "
                    f"--config.data.val_fraction (now {cfg.val_fraction}).")
            generators[split] = self._generate_examples(seqs, weights)
        self.info.metadata["splits"] = stats
        return generators

    def _generate_examples(self, seqs_NxL1: np.ndarray, weights_NxL1: np.ndarray | None):
        for i, seq in enumerate(seqs_NxL1):
            yield i, ({"tokens": seq} if weights_NxL1 is None else
                      {"tokens": seq, "weights": weights_NxL1[i]})


def build_dataset(data_config, tokenizer=None) -> TextCorpus:
    """Builds (or finds in the cache) the packed dataset of ``data_config``.

    Args:
      data_config: the ``data`` section of the config.
      tokenizer: the tokenizer of ``data_config`` if already built (GPT-2's takes ~0.4 s).

    Returns:
      A prepared ``TextCorpus`` builder; ``.info.metadata["splits"]`` holds per-split counts.

    Raises:
      ValueError: bad path, no documents, unknown tokenizer, or a split too small.
    """
    # Built first so that a bad tokenizer fails before any file is read.
    tokenizer = tokenizer or get_tokenizer(data_config)
    # TFDS's progress bars and "custom data configuration" warnings would drown the
    # training progress bar (TFDS still prints one line when it prepares a new cache).
    tfds.disable_progress_bar()
    config = _config_for(data_config)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        builder = TextCorpus(config=config, data_dir=resolve_data_dir(data_config),
                             file_format="array_record")
        builder.tokenizer = tokenizer
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:
        # TFDS removes its incomplete folder but leaves the config's: don't litter the cache.
        config_dir = os.path.join(resolve_data_dir(data_config), TextCorpus.name, config.name)
        if os.path.isdir(config_dir) and not os.listdir(config_dir):
            os.rmdir(config_dir)
        raise
    finally:
        absl_logging.set_verbosity(verbosity)
    return builder


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
    different data stream by accident.
    """

    def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any]):
        self._it = iter(dataset)
        self._identity = identity

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """Returns a JSON-serialisable state (grain's iterator state plus what it is for)."""
        state = dict(self._identity, grain=self._it.get_state())
        return json.loads(json.dumps(state))  # fails here, not at checkpoint time, if not JSON

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes from ``get_state()``'s output (possibly after a JSON round trip).

        Raises:
          ValueError: the state belongs to another dataset, seed or batch size.
        """
        other = {k: state.get(k) for k in self._identity}
        if other != self._identity:
            raise ValueError(f"This data state was saved for {other}, but the iterator is "
                             f"{self._identity}. Resume with the same data config, seed and "
                             f"batch size, or start from a fresh workdir.")
        self._it.set_state(state["grain"])


@dataclasses.dataclass
class Data:
    """The train and validation streams of one data config.

    Attributes:
      tokenizer: the tokenizer the sequences were built with.
      batch_size: sequences per batch.
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
    _train_source: Any = dataclasses.field(repr=False)
    _val_source: Any = dataclasses.field(repr=False)

    def train_iterator(self) -> TrainIterator:
        """Returns an infinite iterator of shuffled train batches (new order every epoch)."""
        ds = (grain.MapDataset.source(self._train_source)
              .shuffle(seed=_grain_seed(self.seed))
              .repeat()  # epoch e is read at indices [e * N, (e + 1) * N): reshuffled per epoch
              .map(_to_example)
              .batch(self.batch_size, drop_remainder=True))
        # Few threads and a short buffer: the data are small next to a train step, and the
        # machines running the tests have two cores.
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if self.num_workers > 0:
            # grain's worker processes read absl flags, which a notebook never parses; the
            # script that calls this needs the usual `if __name__ == "__main__":` guard.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        # grain's state layout differs with and without workers, hence num_workers here.
        identity = dict(dataset=self.name, seed=int(self.seed), batch_size=int(self.batch_size),
                        num_workers=int(self.num_workers))
        return TrainIterator(it_ds, identity)

    def val_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
        """Returns the first ``num_batches`` validation batches, wrapping around if needed.

        Args:
          num_batches: how many batches; the same list is returned on every call.
        """
        ds = (grain.MapDataset.source(self._val_source).repeat().map(_to_example)
              .batch(self.batch_size, drop_remainder=True))
        return [ds[i] for i in range(int(num_batches))]


def make_data(data_config, batch_size: int, seed: int | None = None) -> Data:
    """Builds (or loads from the cache) the dataset of ``data_config`` and wraps it for training.

    Args:
      data_config: the ``data`` section of the config.
      batch_size: sequences per batch.
      seed: shuffling seed; ``None`` -> ``data_config.seed``.

    Returns:
      A ``Data`` with ``train_iterator()``, ``val_batches(n)`` and sizes.

    Raises:
      ValueError: bad path, no documents, unknown tokenizer, a split too small, bad batch size.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    seed = int(getattr(data_config, "seed", 0) if seed is None else seed)
    tokenizer = get_tokenizer(data_config)
    builder = build_dataset(data_config, tokenizer)
    stats = builder.info.metadata["splits"]
    train, val = (builder.as_data_source(split=s) for s in ("train", "validation"))
    return Data(
        tokenizer=tokenizer, batch_size=int(batch_size), seed=seed,
        seq_len=builder.builder_config.seq_len, num_train_sequences=len(train),
        num_val_sequences=len(val),
        bytes_per_token=stats["validation"]["bytes"] / stats["validation"]["tokens"],
        stats=stats, name=builder.builder_config.name,
        num_workers=int(getattr(data_config, "num_workers", 0)),
        _train_source=train, _val_source=val)
