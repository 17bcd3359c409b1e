"""Zero-shot multiple-choice scoring from local JSONL tasks (``eval.py --tasks``).

A task file holds one object per line::

    {"context": "To be, or not to be, that is the", "choices": [" question", " answer"], "label": 0}

Each choice is scored by the log-likelihood of its tokens given the context,
``sum_t log p(choice_t | eot, context, choice_<t)``, with the model's softmax taken over the
tokenizer's vocabulary only (embedding rows past it are padding). Two accuracies:

* ``acc``: the argmax of the summed log-likelihood is ``label``;
* ``acc_norm``: the argmax of the log-likelihood per UTF-8 byte of the choice text is
  ``label`` (per byte rather than per token, so it does not depend on the tokenizer).

Every sequence starts with the eot token (the document boundary the training data has), and
context and choice are tokenised separately, so put the separating space at the start of each
choice, as above. A sequence longer than the model context loses context tokens from the left.

Converting public benchmarks (not bundled; nothing is downloaded) takes a line per record,
e.g. for HellaSwag's JSONL (``ctx``, ``endings``, ``label``)::

    {"context": r["ctx"], "choices": [" " + e for e in r["endings"]], "label": int(r["label"])}

and for a LAMBADA-style cloze (the passage's last word, against distractor words you pick)::

    {"context": text.rsplit(" ", 1)[0], "choices": [" " + last] + [" " + w for w in others],
     "label": 0}

Scoring is batched and jitted at fixed shapes: sequences are sorted by length, cut into
batches of ``batch_size`` (the last padded with empty rows) and padded to a power-of-two
length, so a whole task compiles a handful of times at most.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt.sparsity import masks as masks_lib

SAMPLE_TASK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tasks", "sample_mc.jsonl")
_HOW = ('A task file needs one {"context": str, "choices": [str, ...], "label": int} object '
        "per line.")


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: a context, its choices and the index of the right one."""
    context: str
    choices: tuple[str, ...]
    label: int


def load_task(path: str) -> list[Item]:
    """Reads a task file (``.jsonl`` or ``.jsonl.gz``).

    Raises:
      ValueError: a missing file, a line that is not JSON, a missing or mistyped field, fewer
        than two choices, an empty choice or a label out of range (the line is named).
    """
    if not os.path.isfile(path):
        raise ValueError(f"Task file {path} does not exist. {_HOW}")
    opener = gzip.open if path.endswith(".gz") else open
    items = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e}). {_HOW}") from e
            ok = (isinstance(obj, dict) and isinstance(obj.get("context"), str)
                  and isinstance(obj.get("choices"), list)
                  and all(isinstance(c, str) for c in obj["choices"])
                  and isinstance(obj.get("label"), int) and not isinstance(obj["label"], bool))
            if not ok:
                raise ValueError(f"{where} lacks a string context, a list of string choices "
                                 f"or an int label. {_HOW}")
            if len(obj["choices"]) < 2 or not all(obj["choices"]):
                raise ValueError(f"{where} needs at least two non-empty choices.")
            if not 0 <= obj["label"] < len(obj["choices"]):
                raise ValueError(f"{where} has label {obj['label']} outside 0.."
                                 f"{len(obj['choices']) - 1}.")
            items.append(Item(obj["context"], tuple(obj["choices"]), obj["label"]))
    if not items:
        raise ValueError(f"Task file {path} holds no items. {_HOW}")
    return items


def encode(tokenizer, context: str, choice: str, max_len: int) -> tuple[list[int], int]:
    """``(tokens, n_choice)``: eot + context + choice, left-truncated to ``max_len + 1``.

    Raises:
      ValueError: the choice alone does not fit the model context.
    """
    ctx, cont = [tokenizer.eot_id] + tokenizer.encode(context), tokenizer.encode(choice)
    if len(cont) > max_len:
        raise ValueError(f"The choice {choice[:40]!r}... is {len(cont)} tokens, longer than the "
                         f"model context of {max_len}.")
    keep = max_len + 1 - len(cont)  # the inputs (all but the last token) fill the context
    return ctx[-keep:] + cont, len(cont)


@functools.partial(jax.jit, static_argnames=("model", "vocab_size"))
def sequence_logliks(model: nn.Module, params: Any, masks: Any, tokens_BxT1: jax.Array,
                     choice_BxT: jax.Array, vocab_size: int) -> jax.Array:
    """Sum of log p(target) over the positions flagged in ``choice_BxT``, per row.

    Args:
      model: the GPT module; params, masks: its variables (masks may be None: dense).
      tokens_BxT1: the token rows, T + 1 long (inputs are ``[:, :-1]``, targets ``[:, 1:]``).
      choice_BxT: 1.0 where the target is a choice token, else 0.0.
      vocab_size: the softmax runs over ids below this (the rest is embedding padding).

    Returns:
      float32[B] log-likelihoods.
    """
    variables = {"params": params} if masks is None else {"params": params, "masks": masks}
    logits_BxTxV = model.apply(variables, tokens_BxT1[:, :-1])[..., :vocab_size]
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    targets_BxT = jnp.minimum(tokens_BxT1[:, 1:], vocab_size - 1)  # padding ids stay in range
    picked_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_BxT * choice_BxT, axis=-1)


def _bucket(n: int, max_len: int) -> int:
    return min(max(8, 1 << (n - 1).bit_length()), max_len)


def score(model: nn.Module, params: Any, masks: Any, sequences: Sequence[tuple[list[int], int]],
          vocab_size: int, batch_size: int = 16) -> np.ndarray:
    """Log-likelihood of the last ``n`` tokens of each ``(tokens, n)`` sequence.

    Args:
      model, params, masks: the model and its variables.
      sequences: token lists (at most ``max_len + 1`` long) and their scored suffix lengths.
      vocab_size: the tokenizer's vocabulary size.
      batch_size: rows per jitted call (the result does not depend on it).

    Returns:
      float64[len(sequences)] log-likelihoods, in the input order.
    """
    max_len = model.cfg.max_len
    if masks is not None and bool(masks_lib.all_live(masks)):
        masks = None   # the dense model (a block-sparse kernel's budget is the sparse one)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out = np.zeros(len(sequences), np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        t = _bucket(max(len(sequences[i][0]) for i in rows) - 1, max_len)
        tokens = np.zeros((batch_size, t + 1), np.int32)
        choice = np.zeros((batch_size, t), np.float32)
        for r, i in enumerate(rows):
            seq, n = sequences[i]
            tokens[r, :len(seq)] = seq
            choice[r, len(seq) - 1 - n:len(seq) - 1] = 1.0
        ll = sequence_logliks(model, params, masks, tokens, choice, vocab_size)
        out[rows] = np.asarray(ll)[:len(rows)]
    return out


def accuracy(logliks: Sequence[np.ndarray], labels: Sequence[int],
             norms: Sequence[np.ndarray] | None = None) -> float:
    """Fraction of items whose best choice (first on ties) is the label.

    Args:
      logliks: per item, the choices' scores.
      labels: per item, the right choice.
      norms: per item, divisors of the scores (e.g. byte lengths); None: raw scores.
    """
    norms = norms if norms is not None else [np.ones_like(s) for s in logliks]
    hits = [int(np.argmax(np.asarray(s) / np.asarray(d))) == y
            for s, d, y in zip(logliks, norms, labels)]
    return float(np.mean(hits)) if hits else float("nan")


def evaluate_items(model: nn.Module, params: Any, masks: Any, tokenizer,
                   items: Sequence[Item], batch_size: int = 16) -> dict[str, float | int]:
    """``{"acc", "acc_norm", "n"}`` of a task's items (see the module docstring)."""
    seqs = [encode(tokenizer, it.context, c, model.cfg.max_len)
            for it in items for c in it.choices]
    flat = score(model, params, masks, seqs, tokenizer.vocab_size, batch_size)
    logliks, norms, k = [], [], 0
    for it in items:
        logliks.append(flat[k:k + len(it.choices)])
        norms.append(np.array([len(c.encode("utf-8")) for c in it.choices], np.float64))
        k += len(it.choices)
    labels = [it.label for it in items]
    return {"acc": accuracy(logliks, labels), "acc_norm": accuracy(logliks, labels, norms),
            "n": len(items)}


def task_name(path: str) -> str:
    """A task's name in the results: its file name without ``.jsonl(.gz)``."""
    name = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def load_tasks(paths: Sequence[str]) -> dict[str, list[Item]]:
    """``{task name: items}`` of task files, all read and checked before any is scored.

    Raises:
      ValueError: a bad task file (see :func:`load_task`), or two files with the same name.
    """
    tasks = {}
    for path in paths:
        name = task_name(path)
        if name in tasks:
            raise ValueError(f"Two task files are named {name!r}; rename one.")
        tasks[name] = load_task(path)
    return tasks


def evaluate_tasks(model: nn.Module, params: Any, masks: Any, tokenizer,
                   paths: Sequence[str], batch_size: int = 16) -> dict[str, dict]:
    """``{task name: {"acc", "acc_norm", "n"}}`` for each task file.

    Raises:
      ValueError: see :func:`load_tasks`.
    """
    return {name: evaluate_items(model, params, masks, tokenizer, items, batch_size)
            for name, items in load_tasks(paths).items()}
