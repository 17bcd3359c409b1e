"""The ``TextCorpus`` TFDS builder: local text files -> packed token rows in array_record files.

``build_dataset(config.data)`` reads the sources (``sources.py``; ``sft.py`` for
``data.format = "sft"``), splits and packs them and stores each split's rows of
``seq_len + 1`` tokens (plus per-token loss weights for SFT); ``inputs``/``targets`` are a row
without its last/first token. No TensorFlow is needed: the records are read back with
``builder.as_data_source()``.

The builder config name hashes everything a built dataset depends on: the tokenizer,
``seq_len``, ``val_fraction``, the format and the corpus *content* (``fingerprint.py``: each
file's SHA-256 and its path relative to the corpus root). Touching, copying or moving the
corpus reuses the built dataset; changing a byte of it builds a new one. Cache folder:
``config.data.data_dir``, else ``$SPARSE_GPT_DATA_DIR``, else ``~/.cache/sparse_gpt/tfds``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from sparse_gpt.data import fingerprint
from sparse_gpt.data import sft
from sparse_gpt.data import sources
from sparse_gpt.data.tokenizers import get_tokenizer

DATA_DIR_ENV = "SPARSE_GPT_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "sparse_gpt", "tfds")


def resolve_data_dir(data_config) -> str:
    """Returns the TFDS cache folder: data_dir, else $SPARSE_GPT_DATA_DIR, else ~/.cache/..."""
    d = getattr(data_config, "data_dir", "") or os.environ.get(DATA_DIR_ENV, "")
    return os.path.abspath(os.path.expanduser(d or DEFAULT_DATA_DIR))


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """What a built dataset depends on; ``name`` is a hash of all of it.

    ``root`` only says where to read the files when building: it is not part of the name.
    """

    files: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()  # per file, 16 hex chars of its SHA-256
    corpus: str = ""               # fingerprint of all files' contents and relative paths
    root: str = ""
    tokenizer: str = "byte"
    bpe_dir: str = ""
    seq_len: int = 256
    val_fraction: float = 0.05
    format: str = "text"           # text | sft (prompt/response JSONL, see sft.py)


def config_for(data_config) -> TextCorpusConfig:
    """Validates the data config and turns it into a content-keyed builder config.

    Raises:
      ValueError: a bad seq_len, val_fraction or format, or a bad path.
    """
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
    path = data_config.path or sources.BUNDLED_CORPUS
    root, files = sources.list_source_files(path)
    corpus = fingerprint.corpus_fingerprint(root, files, resolve_data_dir(data_config))
    key = dict(corpus=corpus["digest"], tokenizer=tokenizer, seq_len=seq_len,
               val_fraction=val_fraction)
    if fmt != "text":
        key["format"] = fmt
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    rels = tuple(corpus["files"])
    return TextCorpusConfig(
        name=f"{'sft_' if fmt == 'sft' else ''}{tokenizer}_L{seq_len}_{digest}",
        version=TextCorpus.VERSION,
        description=f"{path} | tokenizer={tokenizer} seq_len={seq_len} val={val_fraction}",
        files=tuple(files), digests=tuple(corpus["files"][r] for r in rels),
        corpus=corpus["digest"], root=root, tokenizer=tokenizer,
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
            description="Packed token sequences of local text documents (sparse_gpt.data).",
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
        docs = (sft.read_examples if is_sft else sources.read_documents)(cfg.root, cfg.files)
        splits = sources.split_documents(docs, cfg.val_fraction)
        generators, stats = {}, {}
        for split, split_docs in zip(("train", "validation"), splits):
            if is_sft:
                seqs, weights, stats[split] = sft.pad_examples(split_docs, tok, cfg.seq_len)
            else:
                (seqs, stats[split]), weights = sources.pack(split_docs, tok, cfg.seq_len), None
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
    config = config_for(data_config)
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
