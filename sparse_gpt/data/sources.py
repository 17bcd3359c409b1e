"""Source files of a text corpus: finding, reading, splitting into train/validation, packing.

Sources (``config.data.path``): "" is the bundled Shakespeare corpus
(``sparse_gpt/corpus/shakespeare.jsonl.gz``, 42 works); otherwise a file or a folder (searched
recursively) of ``.txt`` (one document per file) and ``.jsonl`` (one ``{"text": ...}`` document
per line) files, optionally gzipped.

Documents are split into train/validation by a hash of each document's id
(``relative/path:line``), so adding files never moves existing documents (and renaming a file
does move its documents: the file's name is part of its content here). Each split's
documents, in order, are tokenised and joined with the eot token into one stream and cut into
``seq_len + 1``-token rows; the tail shorter than a row is dropped.

Nothing here depends on TFDS or grain: ``builder.py`` stores what :func:`pack` returns.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np

BUNDLED_CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "corpus",
                              "shakespeare.jsonl.gz")
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
PATH_FIX = ("Set --config.data.path to a .txt/.jsonl(.gz) file or a folder of them, or to \"\" "
            "for the bundled Shakespeare corpus.")


def list_source_files(path: str) -> tuple[str, list[str]]:
    """Returns ``(root, sorted paths relative to root)`` of the supported files at ``path``.

    Raises:
      ValueError: the path is missing, or holds no supported file.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"Data path {path} does not exist. {PATH_FIX}")
    if os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise ValueError(f"Data file {path} is not one of {', '.join(SUFFIXES)}. {PATH_FIX}")
        return os.path.dirname(path), [os.path.basename(path)]
    files = []
    for folder, subdirs, names in os.walk(path):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # skip .git and friends
        files += [os.path.relpath(os.path.join(folder, n), path) for n in names
                  if n.endswith(SUFFIXES) and not n.startswith(".")]
    if not files:
        raise ValueError(f"No {', '.join(SUFFIXES)} files under {path}. {PATH_FIX}")
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
                         f"Add text to them. {PATH_FIX}")
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
