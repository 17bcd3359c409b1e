"""Starting a run from existing weights: ``--config.train.init_from=PATH``.

``PATH`` is either a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``, read
by ``hf_import``) or a sparse_gpt workdir (its newest checkpoint). The trainer uses it only
when its own workdir has no checkpoint yet, so a resumed run continues from its own state::

    state = init(rng)                                   # the run's usual (sharded) init
    state = warm_start(config, model, state, rng)       # params loaded; masks, moments fresh

Only the parameters are taken: the optimizer state is fresh, the step is 0 and the masks are
the sparsity method's ``init_masks`` on the loaded parameters (so ``sparsity.init=magnitude``
prunes the imported weights by magnitude). The config's model shape must match the
weights; a mismatch raises ``ValueError`` with the ``--config.model.*`` settings that fix it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_gpt import plan as plan_lib
from sparse_gpt.model import hf_import
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.model import compact

PyTree = Any
_SHAPE_KEYS = ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_len", "use_rope")


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}


def _check_shape(path: str, want: dict[str, Any], model_cfg: model_lib.ModelConfig,
                 vocab_at_least: bool) -> None:
    """Raises ValueError naming the ``--config.model.*`` flags that make the config match."""
    ours = {k: getattr(model_cfg, k) for k in _SHAPE_KEYS}
    ours["d_ff"], want = model_cfg.ff, dict(want, d_ff=want["d_ff"] or 4 * want["d_model"])
    bad = [k for k in _SHAPE_KEYS if ours[k] != want[k]]
    if vocab_at_least and ours["vocab_size"] >= want["hf_vocab_size"]:
        bad = [k for k in bad if k != "vocab_size"]  # any padding of the vocabulary will do
    if bad:
        fix = " ".join(f"--config.model.{k}={want[k]}" for k in bad)
        have = ", ".join(f"{k}={ours[k]}" for k in bad)
        raise ValueError(f"train.init_from={path} holds a model of another shape than the "
                         f"config ({have}). Set {fix}.")


def _load_workdir(workdir: str) -> tuple[dict[str, Any], PyTree]:
    """(model fields, params) of a sparse_gpt workdir's newest checkpoint, on one device
    (``warm_start`` reshards them to this run's mesh)."""
    from sparse_gpt.training import trainer
    try:
        _, model, state, _, _ = trainer.open_run(workdir, for_eval=False,
                                                 what="train.init_from")
    except FileNotFoundError as e:
        raise ValueError(f"{e} Or point --config.train.init_from at another run.") from None
    want = {k: getattr(model.cfg, k) for k in _SHAPE_KEYS}
    if model.cfg.compact_slots:   # live blocks only: the dense view of the same weights
        return want, compact.densify(model.cfg, state.params, state.masks)[0]
    return want, state.params


def load_params(path: str, model_cfg: model_lib.ModelConfig) -> PyTree:
    """The parameters at ``path``, checked against ``model_cfg``'s shapes.

    Args:
      path: a Hugging Face GPT-2 folder or a sparse_gpt workdir.
      model_cfg: the run's model config; an HF vocabulary is zero-padded to its vocab_size.

    Returns:
      A params tree with exactly the shapes ``model.GPT(model_cfg)`` initialises in the
      dense layout (a compact source is densified; a compact run compacts them itself).

    Raises:
      ValueError: the path is neither kind, holds no weights, or has another model shape.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        want, params = _load_workdir(path)
        _check_shape(path, dict(want, hf_vocab_size=want["vocab_size"]), model_cfg, False)
    elif os.path.isfile(os.path.join(path, "config.json")) and (
            os.path.isfile(os.path.join(path, "model.safetensors"))
            or os.path.isfile(os.path.join(path, "model.safetensors.index.json"))):
        # Checked before the (possibly large) tensors are read. The config's vocabulary is
        # the padding target: any size >= the checkpoint's works.
        _check_shape(path, hf_import.read_config(path), model_cfg, True)
        _, params, _ = hf_import.load_gpt2(path, vocab_size=model_cfg.vocab_size)
    else:
        raise ValueError(f"train.init_from={path} is neither a sparse_gpt workdir (with "
                         "checkpoints/) nor a Hugging Face GPT-2 folder (config.json + "
                         "model.safetensors); fix the path or clear --config.train.init_from.")
    tokens = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(model_lib.GPT(model_cfg.dense_layout()).init, jax.random.key(0),
                              tokens)["params"]
    if _shapes(params) != _shapes(expected):  # the field check above should make this rare
        raise ValueError(f"train.init_from={path}: parameter shapes {_shapes(params)} differ "
                         f"from the model's {_shapes(expected)}.")
    return jax.tree.map(lambda p, e: np.asarray(p, e.dtype), params, expected)


def warm_start(config: ml_collections.ConfigDict, model, state, rng: jax.Array):
    """Replaces a freshly initialised state's params by ``config.train.init_from``'s.

    Args:
      config: the run config (``train.init_from`` set).
      model: the run's ``model.GPT``.
      state: ``init(rng)``'s ``TrainState``; its shardings are kept.
      rng: the key ``state`` was initialised with (the mask init draws from the same split).

    Returns:
      The state with loaded params, the method's initial masks on them (masked weights
      zeroed) and a fresh optimizer state; step, rng and counters unchanged.

    Raises:
      ValueError: see :func:`load_params`.
    """
    from sparse_gpt.training import step as train_lib
    params = load_params(config.train.init_from, model.cfg)
    _, tx, method = train_lib.build(plan_lib.from_config(config))
    _, mask_rng, _ = jax.random.split(rng, 3)  # the split train_lib.init_state uses
    shardings = jax.tree.map(lambda x: x.sharding, state)
    if model.cfg.compact_slots:   # dense-layout params: whole on every device, then compacted
        mesh = jax.tree.leaves(shardings.params)[0].mesh
        params = jax.device_put(params, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
    else:
        params = jax.device_put(params, shardings.params)

    def fresh(state, params):
        params, masks = train_lib.first_topology(model.cfg, method, params,
                                                 model_lib.live_masks(params), mask_rng)
        return state.replace(params=params, masks=masks, opt_state=tx.init(params))

    return jax.jit(fresh, out_shardings=shardings)(state, params)
