"""Orbax checkpoints of a run: train state, data-iterator position and run metadata.

Each checkpoint step holds three items:

* ``state``: the whole ``TrainState`` (params, masks, optimizer state, step, rng),
* ``data``: the JSON state of the training data iterator, so a resumed run reads the
  batches an uninterrupted run would have read,
* ``meta``: the model config, the parameter shapes, the state's leaf paths and the run's
  whole config, checked before anything is restored: a workdir of a different model or
  training state fails with a clear message instead of a shape error, and a resume whose
  settings differ is refused with the keys named (:func:`resume_changes`), except the
  :data:`RESUMABLE` ones, which it returns for the run's config history.

Saving can be asynchronous (``async_save``: training goes on while the step is written);
the trainer saves synchronously, so that a killed run loses at most one checkpoint interval
(benchmarks/fault_injection.py). The newest ``keep`` checkpoints are kept. A writing
``Checkpointer`` removes the temporary folders of saves a killed run left behind, so only
one may write a directory at a time (the trainer holds ``workdir.WorkdirLock``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp

from sparse_gpt.model import gpt as model_lib


class CheckpointError(RuntimeError):
    """A checkpoint in the workdir cannot be used for this run."""


# Config keys a resume may change: how long to train, what is logged and kept, the device
# layout (orbax reshards on restore), the learning rate of a continued run, bookkeeping, and
# the corpus path (the data state checks the corpus content itself, so a moved corpus resumes).
# Any other difference to the checkpoint's config is refused (resume_changes).
RESUMABLE = ("train.num_steps", "train.lr", "train.log_every", "train.eval_every",
             "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
             "train.progress_bar", "train.sample_tokens", "train.sample_prompt",
             "train.init_from", "data.path", "data.data_dir", "data.num_workers", "mesh.*",
             "model.scan_unroll", "preset")


def _short(e: Exception, limit: int = 200) -> str:
    """The first line of an exception, cut: orbax and TensorStore errors quote whole specs."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def config_dict(config: Any) -> dict:
    """A config (``ConfigDict`` or dict) as the plain JSON dict stored in the meta."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def make_meta(model_cfg: model_lib.ModelConfig, state: Any, config: Any = None) -> dict:
    """Metadata stored beside each checkpoint and compared on restore: the model, its
    parameter shapes, the paths of every state leaf (optimizer state included) and, when
    given, the run's whole config (what ``eval.py`` and a resume read back)."""
    paths = jax.tree_util.tree_flatten_with_path(_state_dict(state))[0]
    meta = {"model": dataclasses.asdict(model_cfg), "param_shapes": _shapes(state.params),
            "state_paths": sorted(jax.tree_util.keystr(p) for p, _ in paths)}
    if config is not None:
        meta["config"] = config_dict(config)
    return meta


def latest_step(directory: str) -> int:
    """The newest checkpoint's step in a checkpoint folder (0 without one), read only."""
    if not os.path.isdir(directory):
        return 0
    ckpt = Checkpointer(directory, async_save=False, read_only=True)
    try:
        return ckpt.latest_step() or 0
    finally:
        ckpt.close()


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """Opens (or, unless ``read_only``, creates) a checkpoint directory.

        Args:
          directory: the folder of the step folders.
          keep: how many of the newest checkpoints to keep, at least 1.
          async_save: whether :meth:`save` returns before the write ends.
          read_only: never write, create or clean anything (evaluation, init_from).

        Raises:
          ValueError: ``keep`` below 1 (that would delete the newest checkpoint too).
        """
        if not read_only and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep_checkpoints={keep!r}: at least the newest checkpoint must "
                             "be kept; set --config.train.keep_checkpoints to 1 or more.")
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        # Not orbax's own read_only option, which logs three warnings on every open: a
        # read-only Checkpointer simply never saves, creates or cleans up.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of every finished checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of the newest (or given) checkpoint, without reading its arrays.

        Raises:
          CheckpointError: no checkpoint, no checkpoint at ``step``, or an unreadable one.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint of step {step} in {self.directory}; it has checkpoints of "
                f"steps {', '.join(map(str, steps))}. Pick one of those.")
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a damaged directory
            raise CheckpointError(
                f"Checkpoint {where} is unreadable ({_short(e)}). Delete that step folder to "
                "resume from an earlier one, or use a fresh --workdir.") from e
        return step, meta

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Starts writing ``state`` at ``step`` (returns before the write ends if async)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; not saving.")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_dict(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state: Any, meta: dict,
                step: int | None = None) -> tuple[Any, dict, int]:
        """Restores the newest (or given) step into the structure of ``abstract_state``.

        Args:
          abstract_state: a state pytree (arrays or ``jax.ShapeDtypeStruct``) of this run.
          meta: this run's ``make_meta`` output; must match the stored one.
          step: the step to restore, default the newest.

        Returns:
          (state, data_state, step).

        Raises:
          CheckpointError: nothing to restore, no such step, a different model or training
            state, or an unreadable checkpoint.
        """
        step, saved_meta = self.read_meta(step)
        where = os.path.join(self.directory, str(step))
        _check_same_model(saved_meta, meta, where)
        _check_same_state(saved_meta, meta, where)
        full = flax.serialization.to_state_dict(abstract_state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _drop_unset(full))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {where} is corrupt or incomplete ({_short(e)}). Delete that step "
                "folder to resume from an earlier one, or use a fresh --workdir.") from e
        unset = {k: None for k, v in full.items() if v is None}
        state = flax.serialization.from_state_dict(abstract_state, {**restored.state, **unset})
        return state, restored.data, step

    def check_resume(self, meta: dict, step: int | None = None) -> dict[str, tuple]:
        """Checks that a run with ``meta`` may continue the newest (or given) checkpoint.

        Returns:
          The accepted changes, ``{key: (checkpoint's value, this run's)}`` (keys matching
          :data:`RESUMABLE`, and keys the checkpoint's config predates).

        Raises:
          CheckpointError: another model, state structure or non-resumable setting (all the
            differing keys are listed), or an unreadable checkpoint.
        """
        step, saved = self.read_meta(step)
        where = os.path.join(self.directory, str(step))
        _check_same_model(saved, meta, where)
        _check_same_state(saved, meta, where)
        if "config" not in saved or "config" not in meta:  # written before configs were stored
            return {}
        return resume_changes(saved["config"], meta["config"], where)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resume_changes(saved: dict, current: dict, where: str) -> dict[str, tuple]:
    """The differences of two configs a resume may take; raises for the others.

    Args:
      saved: the config stored with the checkpoint (plain dict).
      current: this run's config (plain dict).
      where: the checkpoint, for the message.

    Returns:
      ``{dotted key: (saved value, current value)}`` of the accepted differences: keys
      matching :data:`RESUMABLE`, and keys only this run's config has (added to the code
      after the checkpoint was written; their defaults are assumed to be the old behaviour).

    Raises:
      CheckpointError: every other differing key, listed with both values.
    """
    old, new = _flatten(saved), _flatten(current)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) or (k in old) != (k in new)}
    refused = {k: v for k, v in changed.items()
               if k in old and not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise CheckpointError(
            f"The checkpoint {where} was trained with other settings than this run: {listed}. "
            "Resuming would train the checkpoint's state under settings it was not trained "
            "with. Pass the run's own values (its config is stored with every checkpoint and "
            "in the workdir's config.json), or use a fresh --workdir. Settings a resume may "
            f"change: {', '.join(RESUMABLE)}.")
    return changed


def _check_same_state(saved: dict, current: dict, where: str) -> None:
    """Same model, different training state: an optimizer or sparsity setting changed."""
    if "state_paths" not in saved:   # written before the paths were stored
        return
    old, new = set(saved["state_paths"]), set(current["state_paths"])
    if old == new:
        return
    diffs = [f"only in the checkpoint: {p}" for p in sorted(old - new)[:2]] + [
        f"only in this run: {p}" for p in sorted(new - old)[:2]]
    raise CheckpointError(
        f"The checkpoint {where} holds a training state of another structure "
        f"({'; '.join(diffs)}): a setting that shapes the state (train.optimizer, "
        "sparsity.method, sparsity.grow_grad_steps, ...) differs from the run that wrote it. "
        "Restore that run's config, or use a fresh --workdir.")


def _drop_unset(state_dict: dict) -> dict:
    """A state dict without its unset (None) fields, so an optional field (e.g.
    ``grow_grads``) changes nothing on disk for runs that do not use it."""
    return {k: v for k, v in state_dict.items() if v is not None}


def _state_dict(state: Any) -> dict:
    """The state as the dict that is written to disk (see :func:`_drop_unset`)."""
    return _drop_unset(flax.serialization.to_state_dict(state))


def _check_same_model(saved: dict, current: dict, where: str) -> None:
    if saved.get("param_shapes") == current["param_shapes"]:
        return
    diffs = [f"{k}: {saved['model'].get(k)} -> {v}" for k, v in current["model"].items()
             if saved.get("model", {}).get(k) != v]
    raise CheckpointError(
        f"The checkpoint {where} was written by a model of a different shape "
        f"({'; '.join(diffs) or 'parameter shapes differ'}). Use a fresh --workdir for this "
        "config, or restore the config the workdir was trained with.")
