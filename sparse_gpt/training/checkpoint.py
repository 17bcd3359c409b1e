"""Orbax checkpoints of a run: train state, data-iterator position and run metadata.

Each checkpoint step holds three items:

* ``state``: the whole ``TrainState`` (params, masks, optimizer state, step, rng),
* ``data``: the JSON state of the training data iterator, so a resumed run reads the
  batches an uninterrupted run would have read,
* ``meta``: the model config and the parameter shapes, checked before anything is restored
  so that a workdir of a different model fails with a clear message instead of a shape error.

Saving is asynchronous (training goes on while the previous step is written); the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import orbax.checkpoint as ocp

from sparse_gpt.model import gpt as model_lib


class CheckpointError(RuntimeError):
    """A checkpoint in the workdir cannot be used for this run."""


def _shapes(tree: Any) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def make_meta(model_cfg: model_lib.ModelConfig, state: Any) -> dict:
    """Metadata stored beside each checkpoint and compared on restore: the model, its
    parameter shapes and the paths of every state leaf (optimizer state included)."""
    paths = jax.tree_util.tree_flatten_with_path(_state_dict(state))[0]
    return {"model": dataclasses.asdict(model_cfg), "param_shapes": _shapes(state.params),
            "state_paths": sorted(jax.tree_util.keystr(p) for p, _ in paths)}


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for one run directory."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Starts writing ``state`` at ``step`` (returns before the write ends if async)."""
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
          CheckpointError: nothing to restore, a different model, or an unreadable checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        where = os.path.join(self.directory, str(step))
        try:
            saved_meta = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for a damaged directory
            raise CheckpointError(
                f"Checkpoint {where} is unreadable ({type(e).__name__}: {e}). Delete that step "
                "folder to resume from an earlier one, or use a fresh --workdir.") from e
        _check_same_model(saved_meta, meta, where)
        _check_same_state(saved_meta, meta, where)
        full = flax.serialization.to_state_dict(abstract_state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _drop_unset(full))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {where} is corrupt or incomplete ({type(e).__name__}: {e}). "
                "Delete that step folder to resume from an earlier one, or use a fresh "
                "--workdir.") from e
        unset = {k: None for k, v in full.items() if v is None}
        state = flax.serialization.from_state_dict(abstract_state, {**restored.state, **unset})
        return state, restored.data, step

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
