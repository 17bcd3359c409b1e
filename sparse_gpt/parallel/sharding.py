"""Device mesh, logical axis rules and the shardings of a run, derived, never listed.

    mesh = sharding.make_mesh(config.mesh)                  # axes data, fsdp, tensor, stage
    rules = sharding.parse_rules(config.mesh.rules)         # logical name -> mesh axes
    state_sh = sharding.state_shardings(init_fn, model, tx, mesh, rules, seq_len)
    init = sharding.jit(init_fn, mesh, rules, out_shardings=state_sh)

Every param names its logical axes where it is created (``layers.logical_init``; e.g. an MLP
kernel is ``("layers", "embed", "mlp")``). :func:`logical_specs` reads those names with
``jax.eval_shape`` on the model's init, the rules map them to mesh axes, and masks and
optimizer moments take the sharding of the param at their path, so they always match.

Mesh axes: ``data`` (batch), ``fsdp`` (batch, and params split along ``embed``),
``tensor`` (Megatron-style: MLP hidden, heads, QKV and vocabulary) and ``stage`` (pipeline
stages, see ``pipeline.py``). All axes are ``Auto``: inside :func:`jit` XLA propagates the
shardings, and the model's activation names (``batch``, ``act_embed``, ``mlp``) become
sharding constraints.

Several processes: call :func:`maybe_initialize_distributed` before anything touches a device
(``train.py`` does). It runs ``jax.distributed.initialize()`` when ``SPARSE_GPT_DISTRIBUTED=1``
or ``JAX_COORDINATOR_ADDRESS`` is set (on TPU pods and SLURM/Open MPI clusters JAX then finds
the coordinator, process count and id itself; elsewhere set ``SPARSE_GPT_NUM_PROCESSES`` and
``SPARSE_GPT_PROCESS_ID`` too); the default is one process. E.g. two CPU processes of 4
devices each on one machine::

    export JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 SPARSE_GPT_NUM_PROCESSES=2 JAX_PLATFORMS=cpu
    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    SPARSE_GPT_PROCESS_ID=0 python train.py --config.mesh.data=2 & \
        SPARSE_GPT_PROCESS_ID=1 python train.py --config.mesh.data=2

Each process reads only its block of every global batch (``data/dataset.py``) and
:func:`put_batch` places the block on that process's devices
(``jax.make_array_from_process_local_data``). CPU collectives between processes use gloo,
JAX's default for CPU (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sparse_gpt.model import layers

AXES = ("data", "fsdp", "tensor", "stage")
PyTree = Any
Rules = tuple[tuple[str, tuple[str, ...]], ...]


def maybe_initialize_distributed(env: dict | None = None) -> bool:
    """Starts multi-process JAX when the environment asks for it; returns whether it did.

    ``SPARSE_GPT_DISTRIBUTED=1`` or ``JAX_COORDINATOR_ADDRESS`` asks for it. Where no cluster
    manager tells JAX the process count and id (a plain machine), ``SPARSE_GPT_NUM_PROCESSES``
    and ``SPARSE_GPT_PROCESS_ID`` give them, with ``JAX_COORDINATOR_ADDRESS`` (host:port of
    process 0).

    Raises:
      ValueError: only one of the count and id is set, they are not integers, or the id is
        outside ``[0, count)``.
    """
    env = os.environ if env is None else env
    if not (env.get("SPARSE_GPT_DISTRIBUTED", "") in ("1", "true")
            or env.get("JAX_COORDINATOR_ADDRESS")):
        return False
    count, index = env.get("SPARSE_GPT_NUM_PROCESSES"), env.get("SPARSE_GPT_PROCESS_ID")
    if count is None and index is None:
        jax.distributed.initialize()  # the cluster (TPU, SLURM, Open MPI, ...) says the rest
        return True
    fix = ("set both SPARSE_GPT_NUM_PROCESSES (the process count) and SPARSE_GPT_PROCESS_ID "
           "(0 .. count - 1, distinct per process), with JAX_COORDINATOR_ADDRESS=host:port of "
           "process 0")
    try:
        count, index = int(count), int(index)
    except (TypeError, ValueError):
        raise ValueError(f"SPARSE_GPT_NUM_PROCESSES={count!r}, SPARSE_GPT_PROCESS_ID={index!r}: "
                         f"{fix}.") from None
    if not (count >= 1 and 0 <= index < count and env.get("JAX_COORDINATOR_ADDRESS")):
        raise ValueError(f"SPARSE_GPT_NUM_PROCESSES={count}, SPARSE_GPT_PROCESS_ID={index}, "
                         f"JAX_COORDINATOR_ADDRESS={env.get('JAX_COORDINATOR_ADDRESS')!r}: {fix}.")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=count, process_id=index)
    return True


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes of ``config.mesh`` with the one ``-1`` axis filled in.

    Raises:
      ValueError: more than one ``-1``, a size below 1, or a product that is not
        ``num_devices``.
    """
    sizes = {a: int(mesh_cfg[a]) for a in AXES}
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
        raise ValueError(f"mesh {sizes}: each axis needs a size >= 1, and at most one may be "
                         "-1 (the remaining devices); fix --config.mesh.*")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes use {fixed} devices, which does not divide the "
                f"{num_devices} devices available; choose --config.mesh.* sizes whose product "
                f"divides {num_devices}.")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {sizes} needs {fixed} devices but {num_devices} are available; set one "
            "axis to -1 (e.g. --config.mesh.data=-1) or make the product of --config.mesh.* "
            f"equal {num_devices}.")
    return sizes


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The run's ``Mesh`` over ``devices`` (default all), axes ``AXES``, all ``Auto``."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if len(devices) == len(jax.devices()):
        # make_mesh orders devices for the interconnect (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                             devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def parse_rules(text: str) -> Rules:
    """Parses ``"batch=data+fsdp,mlp=tensor,..."`` into flax logical axis rules.

    An empty right side (``"length="``) keeps that logical axis replicated.

    Raises:
      ValueError: a malformed rule or a mesh axis that is not one of ``AXES``.
    """
    rules = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, axes = item.partition("=")
        mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        bad = [a for a in mesh_axes if a not in AXES]
        if not eq or not name.strip() or bad:
            raise ValueError(f"Bad logical axis rule {item!r} in --config.mesh.rules: write "
                             f"name=axis[+axis] with axes from {AXES}.")
        rules.append((name.strip(), mesh_axes))
    return tuple(rules)


def logical_specs(model: nn.Module, seq_len: int) -> dict[str, PyTree]:
    """Logical ``PartitionSpec`` of every model variable, from ``eval_shape`` of ``init``.

    Returns:
      ``{"params": tree, "masks": tree}`` of ``PartitionSpec``s of logical names.
    """
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    with layers.boxed_axes():  # a fresh lambda: no cached unboxed trace can be reused
        boxed = jax.eval_shape(lambda r, t: model.init(r, t), jax.random.key(0), tokens)
    return nn.get_partition_spec(flax.core.unfreeze(boxed))


def to_sharding(spec: P, shape: tuple[int, ...], mesh: Mesh, rules: Rules,
                where: str = "array") -> NamedSharding:
    """Maps a logical spec to a ``NamedSharding``, checking that every split divides.

    Raises:
      ValueError: a dimension not divisible by the mesh axes its logical name maps to.
    """
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    for dim, (size, axes, name) in enumerate(zip(shape, mesh_spec, tuple(spec))):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        n = math.prod(mesh.shape[a] for a in axes)
        if size % n:
            raise ValueError(
                f"{where}: dim {dim} ({name}) has size {size}, not divisible by mesh axes "
                f"{'x'.join(axes)} = {n}; change the mesh (--config.mesh.*), the model "
                f"size, or map {name!r} elsewhere in --config.mesh.rules.")
    return NamedSharding(mesh, mesh_spec)


def state_shardings(init_fn: Callable, model: nn.Module, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: Rules, seq_len: int, *args) -> PyTree:
    """Shardings of the ``TrainState`` that ``init_fn(rng, *args)`` returns.

    Params follow their logical names; masks, optimizer moments and summed growth gradients
    copy the sharding of the param at the same path; everything else (step, counters, rng)
    is replicated.
    """
    abstract = jax.eval_shape(init_fn, jax.random.key(0), *args)
    specs = logical_specs(model, seq_len)["params"]
    params = jax.tree.map(
        lambda spec, a: to_sharding(spec, a.shape, mesh, rules, _shape_name(a)),
        specs, abstract.params, is_leaf=lambda x: isinstance(x, P))
    replicated = NamedSharding(mesh, P())
    masks = _like_params(abstract.masks, params)
    opt_state = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, params,
        transform_non_params=lambda leaf: replicated,
        is_leaf=lambda x: isinstance(x, (optax.MaskedNode, NamedSharding)))
    out = jax.tree.map(lambda _: replicated, abstract)
    return out.replace(params=params, masks=masks, opt_state=opt_state,
                       sparsity_state=_like_params(abstract.sparsity_state, params))


def _shape_name(a) -> str:
    return f"param of shape {tuple(a.shape)}"


def _like_params(masks: PyTree, params: PyTree) -> PyTree:
    """The param sharding at each mask's path (masks mirror a subset of params).

    A compact kernel's index mask ``[L, Nb, T]`` is the leading part of its blocks
    ``[L, Nb, T, B, B]`` and takes the leading part of their sharding.
    """
    if masks is None:
        return None
    if isinstance(masks, dict):
        return {k: _like_params(v, params[k]) for k, v in masks.items()}
    if isinstance(params, NamedSharding) and len(masks.shape) < len(params.spec):
        return NamedSharding(params.mesh, P(*tuple(params.spec)[:len(masks.shape)]))
    return params


def batch_sharding(mesh: Mesh, rules: Rules, batch_size: int) -> NamedSharding:
    """Sharding of ``[B, L]`` batch arrays: rows split over the logical ``batch`` axes.

    A batch too small to split over all of them (e.g. the default ``data=-1`` on 8 devices
    with 4 sequences) is kept whole on the axes that do not divide it, with a warning: the
    math is unchanged, those devices repeat the work.
    """
    spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
    axes = spec[0] if isinstance(spec[0], tuple) else tuple(filter(None, (spec[0],)))
    kept = list(axes)
    while kept and batch_size % math.prod(mesh.shape[a] for a in kept):
        kept.pop()
    if len(kept) < len(axes):
        dropped = [a for a in axes if a not in kept]
        logging.warning(
            "train.batch_size=%d does not split over mesh axes %s (%d devices); it is "
            "repeated over %s. Use a batch size divisible by %d or shrink --config.mesh.%s.",
            batch_size, "x".join(axes), math.prod(mesh.shape[a] for a in axes),
            "x".join(dropped), math.prod(mesh.shape[a] for a in axes), dropped[0])
    return NamedSharding(mesh, P(tuple(kept) or None, *spec[1:]))


def put_batch(batch: dict, sharding: NamedSharding, batch_size: int | None = None) -> dict:
    """Places a host batch on the mesh: the global batch, or this process's block of it.

    Args:
      batch: ``[rows, ...]`` numpy arrays. Either the global batch (``batch_size`` rows, the
        same on every process; each process keeps its devices' rows), or, with ``P``
        processes, this process's block as ``data.dataset`` reads it: rows
        ``[p * B/P, (p + 1) * B/P)`` of the global batch.
      sharding: the batch sharding (:func:`batch_sharding`).
      batch_size: the global batch size B; ``None``: the batch is the global batch.

    A block goes straight to its process's devices when the sharding gives every process
    exactly its block (data/fsdp meshes: processes own consecutive rows). Otherwise (e.g.
    a batch replicated over processes) the blocks are first gathered from all processes.

    Raises:
      ValueError: rows that are neither ``batch_size`` nor ``batch_size / P``.
    """
    count = jax.process_count()

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        if batch_size is None or x.shape[0] == batch_size:
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        if x.shape[0] * count != batch_size:
            raise ValueError(
                f"A batch of {x.shape[0]} rows: expected the global batch of "
                f"train.batch_size={batch_size} rows" + (
                    f" or this process's block of {batch_size // count}" if count > 1 and
                    batch_size % count == 0 else "") +
                ". Read batches with data.make_data(config.data, train.batch_size).")
        shape = (batch_size,) + x.shape[1:]
        if _owns_its_block(sharding, shape):
            return jax.make_array_from_process_local_data(sharding, x, shape)
        from jax.experimental import multihost_utils
        full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.make_array_from_callback(shape, sharding, lambda idx: full[idx])
    return {k: put(v) for k, v in batch.items()}


@functools.lru_cache(maxsize=64)
def _owns_its_block(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    """Whether the devices of every process ``q`` hold exactly rows ``[q*B/P, (q+1)*B/P)``
    of a global batch of ``shape`` (``B = shape[0]``).

    Decided from the whole sharding, so every process takes the same branch (one of them is a
    collective).
    """
    count, batch_size = jax.process_count(), shape[0]
    n = batch_size // count
    rows: dict[int, set[int]] = {q: set() for q in range(count)}
    for device, index in sharding.devices_indices_map(shape).items():
        rows[device.process_index].update(range(batch_size)[index[0]])
    return all(rows[q] == set(range(q * n, (q + 1) * n)) for q in range(count))


def jit(fn: Callable, mesh: Mesh, rules: Rules, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` traced with ``mesh`` and ``rules`` in context.

    The context makes the model's logical activation constraints (and the shard_map around
    block-sparse kernels) refer to this mesh; it is entered inside the trace, where
    ``jax.set_mesh`` is not allowed.
    """
    @functools.wraps(fn)
    def in_context(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args)
    return jax.jit(in_context, **jit_kwargs)
