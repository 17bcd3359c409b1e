"""Supervised fine-tuning examples: JSONL prompt/response pairs, loss on the response only.

``data.format = "sft"`` makes the TFDS builder (``builder.py``) read every ``.jsonl(.gz)``
file under ``data.path`` as one ``{"prompt": str, "response": str}`` object per line and
store each example as one row of ``seq_len + 1`` tokens with a weight per token::

    tokens   eot  p1  p2  p3  r1  r2  eot  eot  eot ...      (padding: eot)
    weights   0    0   0   0   1   1   1    0    0  ...

The leading eot is the document separator the text pipeline puts before every document, so a
fine-tuned model sees the same boundary it was pretrained on, and an empty prompt still
predicts its first response token. Prompt and response are tokenised separately and
concatenated, so the boundary is exact (add any template, e.g. ``"Q: ...\\nA:"``, to the
prompt yourself). A row's ``inputs``/``targets`` are the tokens without their last/first
entry and its loss weights are ``weights[1:]``: a token's weight says whether it is a target.

One example per row, padded, not packed: the model has no per-document attention mask, so
packing would let a response attend to the previous example. Examples longer than
``seq_len + 1`` tokens are truncated at the end (the response tail and its eot are lost) and
counted in the split's ``truncated`` statistic; an example left with no response token is
dropped and counted in ``dropped``.
"""

from __future__ import annotations

import gzip
import os
from typing import Sequence

import numpy as np

from sparse_gpt.data import sources

FORMATS = ("text", "sft")
SFT_SUFFIXES = (".jsonl", ".jsonl.gz")
_HOW = "An SFT file needs one {\"prompt\": str, \"response\": str} object per line."


def read_examples(root: str, files: Sequence[str]) -> list[tuple[str, tuple[str, str]]]:
    """Returns ``(example_id, (prompt, response))`` of every example, in file and line order.

    The id (``relative/path:line``) decides the train/validation split, as for text.

    Raises:
      ValueError: a file that is not JSONL, a line without string ``prompt``/``response``, an
        empty response, or fewer than two examples (one is needed for validation).
    """
    examples = []
    for rel in files:
        full = os.path.join(root, rel)
        if not rel.endswith(SFT_SUFFIXES):
            raise ValueError(f"{full} is not .jsonl(.gz); data.format=sft reads JSONL only. "
                             f"{_HOW}")
        opener = gzip.open if rel.endswith(".gz") else open
        try:
            with opener(full, "rt", encoding="utf-8") as f:
                for n, obj in sources.json_lines(f, full, _HOW):
                    if not (isinstance(obj, dict) and isinstance(obj.get("prompt"), str)
                            and isinstance(obj.get("response"), str)):
                        raise ValueError(f"{full}:{n} lacks a string \"prompt\" or "
                                         f"\"response\". {_HOW}")
                    if not obj["response"]:
                        raise ValueError(f"{full}:{n} has an empty response: nothing to learn.")
                    examples.append((f"{rel}:{n}", (obj["prompt"], obj["response"])))
        except UnicodeDecodeError as e:
            raise ValueError(f"{full} is not UTF-8 text ({e}).") from e
        except (OSError, EOFError) as e:
            raise ValueError(f"Cannot read {full} ({e}). Fix or remove the file.") from e
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} SFT example(s) under {root}; at least two are needed "
                         "(examples are split into train/validation by data.val_fraction).")
    return examples


def encode(tokenizer, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
    """One example as ``(tokens, weights)``: eot + prompt + response + eot, weights 0/1.

    Returns:
      int32 tokens and float32 weights of the same length; a weight is 1 where the token is
      a response token or the final eot (the positions whose prediction is trained).
    """
    eot = np.array([tokenizer.eot_id], np.int32)
    p = np.asarray(tokenizer.encode(prompt), np.int32)
    r = np.asarray(tokenizer.encode(response), np.int32)
    tokens = np.concatenate([eot, p, r, eot])
    weights = np.concatenate([np.zeros(1 + len(p), np.float32), np.ones(len(r) + 1, np.float32)])
    return tokens, weights


def pad_examples(examples: Sequence[tuple[str, tuple[str, str]]], tokenizer,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Encodes examples into padded rows of ``seq_len + 1`` tokens and weights.

    Args:
      examples: ``read_examples`` output (or any ``(id, (prompt, response))`` pairs).
      tokenizer: has ``encode`` and ``eot_id``.
      seq_len: L; rows hold L + 1 tokens (inputs and targets are L long).

    Returns:
      ``(tokens_NxL1, weights_NxL1, stats)``. ``stats`` counts ``documents`` (examples read),
      ``sequences`` (rows kept), ``tokens`` (weighted target tokens, eot included),
      ``bytes`` (UTF-8 bytes of the weighted response text, for bits per byte),
      ``truncated`` and ``dropped`` examples, and ``dropped_tokens`` (tokens cut off).
    """
    width = seq_len + 1
    rows, wrows = [], []
    stats = dict(documents=len(examples), sequences=0, tokens=0, bytes=0, truncated=0,
                 dropped=0, dropped_tokens=0)
    for _, (prompt, response) in examples:
        tokens, weights = encode(tokenizer, prompt, response)
        if len(tokens) > width:
            stats["truncated"] += 1
            stats["dropped_tokens"] += len(tokens) - width
            tokens, weights = tokens[:width], weights[:width]
        if not weights.any():
            stats["dropped"] += 1
            continue
        kept = tokens[weights > 0]
        stats["tokens"] += int(len(kept))
        text = tokenizer.decode([int(t) for t in kept if t != tokenizer.eot_id])
        stats["bytes"] += len(text.encode("utf-8"))
        pad = width - len(tokens)
        rows.append(np.pad(tokens, (0, pad), constant_values=tokenizer.eot_id))
        wrows.append(np.pad(weights, (0, pad)))
    stats["sequences"] = len(rows)
    if not rows:
        return (np.zeros((0, width), np.int32), np.zeros((0, width), np.float32), stats)
    return np.stack(rows).astype(np.int32), np.stack(wrows).astype(np.float32), stats
