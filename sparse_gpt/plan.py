"""The run plan: the config parsed once into typed, frozen objects, every cross-section check.

    plan = plan_lib.from_config(config)      # raises ValueError naming the key and the fix
    plan.model, plan.method, plan.optimizer, plan.attention, plan.sat, plan.pipeline

Each section becomes the object the code that uses it takes: ``config.model`` (+ the block
size, the kernels' block budget and the tokenizer's vocabulary) a ``ModelConfig``,
``config.sparsity`` a sparsity method (its shared ``Settings`` plus the method's own fields,
read from the ``config.sparsity`` keys of the same names), ``config.train`` an
``OptimizerConfig``, ``config.attention`` a ``HybridAttention`` (or None), ``config.sat`` a
``SAT`` plan (or None), ``config.mesh`` a ``PipelineConfig`` (or None). Defaults live in
``sparse_gpt/config.py`` only; the checks that span sections live here, each message naming
the key to fix and how.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from sparse_gpt import config as config_lib
from sparse_gpt.data import tokenizers
from sparse_gpt.model import attention as attention_lib
from sparse_gpt.model import gpt as model_lib
from sparse_gpt.model.gpt import ModelConfig
from sparse_gpt.model.omission import METRICS, SELECTIONS
from sparse_gpt.parallel import pipeline as pipeline_lib
from sparse_gpt.parallel import sharding
from sparse_gpt.sparsity import masks as masks_lib
from sparse_gpt.sparsity import methods
from sparse_gpt.sparsity import sat as sat_lib
from sparse_gpt.training.optim import OptimizerConfig

# config.sparsity keys every method reads (methods.Settings); the others are methods' own.
SHARED_KEYS = ("method", "density", "distribution", "explicit_densities", "structure",
               "block_size", "block_balance", "nm_n", "nm_m", "sparse_layers", "init",
               "update_every", "drop_fraction", "drop_fraction_schedule", "update_start",
               "update_end", "grow_init")


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A run's typed settings; ``config`` is kept for the sections read as they are (data,
    mesh layout, logging and checkpoint intervals)."""

    config: ml_collections.ConfigDict
    model: ModelConfig
    method: methods.SparsityMethod
    optimizer: OptimizerConfig
    attention: attention_lib.HybridAttention | None
    sat: sat_lib.SAT | None
    pipeline: pipeline_lib.PipelineConfig | None
    rules: Any            # parsed config.mesh.rules (flax logical axis rules)

    @property
    def seq_len(self) -> int:
        return int(self.config.data.seq_len)

    @property
    def batch_size(self) -> int:
        return int(self.config.train.batch_size)


def from_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> Plan:
    """Parses and checks ``config`` (see the module docstring).

    Args:
      config: a run config (``sparse_gpt.config.get_config`` or a config family).
      num_devices: devices the mesh spans (default ``jax.device_count()``).

    Raises:
      ValueError: the first problem found, naming the key and the fix.
    """
    validate(config, num_devices)
    model = _model(config)
    method = _method(config, model)
    if model.matmul == "block_sparse":
        # The kernels' static block budget covers the densest layer the method ever holds;
        # a method whose density changes switches between budget tiers on the way.
        shapes = sparse_shapes(method, model)
        tiers = method.kernel_tiers(shapes)
        dense = tuple(model_lib.kernel_key(p) for p in model.kernel_shapes() if p not in shapes)
        model = dataclasses.replace(model, block_density=method.max_density(shapes),
                                    block_tiers=tiers if len(tiers) > 1 else (),
                                    dense_kernels=dense)
    if model.sparse_storage == "compact":
        _check_compact(model, method)
        slots = method.column_slots(sparse_shapes(method, model))
        model = dataclasses.replace(model, compact_slots=tuple(
            (model_lib.kernel_key(p), t) for p, t in slots.items()))
    attention = _attention(config)
    sat = _sat(config, model)
    pipeline = _pipeline(config, num_devices)
    _check_combination(config, model, method, attention, sat, pipeline)
    return Plan(config=config, model=model, method=method, optimizer=_optimizer(config.train),
                attention=attention, sat=sat, pipeline=pipeline,
                rules=sharding.parse_rules(config.mesh.rules))


def dense_switch(plan: Plan) -> int | None:
    """The step at which a compact run's dense phase starts (``sparsity.dense_finetune_start``
    with ``model.sparse_storage=compact``), or None. From that step on the run trains the
    dense layout: the trainer densifies the state once (:func:`for_step`)."""
    if plan.model.compact_slots and plan.method.goes_dense:
        return int(plan.method.dense_finetune_start)
    return None


def for_step(plan: Plan, step: int) -> Plan:
    """The plan of the run's phase holding a state of ``step`` steps: past a compact run's
    :func:`dense_switch`, the same run in the dense layout; else ``plan``."""
    switch = dense_switch(plan)
    if switch is None or step < switch:
        return plan
    return dataclasses.replace(plan, model=plan.model.dense_layout())


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """The checks that need no parsed section: context length, train values, the mesh.

    Raises:
      ValueError: the first problem found, naming the key and the fix.
    """
    if config.data.seq_len > config.model.max_len and not config.model.use_rope:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds the model context "
            f"model.max_len={config.model.max_len}; lower --config.data.seq_len or raise "
            "--config.model.max_len.")
    _check_train(config.train)
    sharding.parse_rules(config.mesh.rules)
    _pipeline(config, num_devices)


def check_vocabulary(config: ml_collections.ConfigDict) -> None:
    """The tokenizer fits the embedding table (checked before training on data; a model built
    alone may have any vocabulary).

    Raises:
      ValueError: ``model.vocab_size`` is below the tokenizer's vocabulary.
    """
    vocab = tokenizers.VOCAB_SIZES.get(config.data.tokenizer)
    if vocab is not None and vocab > config.model.vocab_size:
        raise ValueError(
            f"The {config.data.tokenizer} tokenizer has {vocab} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set --config.model.vocab_size to at "
            f"least {vocab}.")


# ----------------------------------------------------------------------------- sections

def _model(config) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: v for k, v in config.model.items() if k in names}
    mc = ModelConfig(**kwargs, block_size=int(config.sparsity.block_size),
                     num_tokens=tokenizers.VOCAB_SIZES.get(config.data.tokenizer, 0))
    mc.validate()
    return mc


def _choice(name: str, value: str, options) -> str:
    if value not in options:
        raise ValueError(f"Unknown sparsity.{name} {value!r}; choose one of "
                         f"{', '.join(options)} (--config.sparsity.{name}=...).")
    return value


def _settings(config) -> methods.Settings:
    sp = config.sparsity
    kind = _choice("structure", sp.structure, masks_lib.STRUCTURES)
    structure = masks_lib.Structure(kind, (int(sp.block_size), int(sp.block_size)),
                                    int(sp.nm_n), int(sp.nm_m),
                                    _choice("block_balance", sp.block_balance,
                                            masks_lib.BALANCES) if kind == "block" else "none")
    distribution = _choice("distribution", sp.distribution, masks_lib.DISTRIBUTIONS)
    explicit = masks_lib.parse_density_map(sp.explicit_densities)
    if explicit and distribution != "explicit":
        raise ValueError("explicit_densities is set but distribution is "
                         f"{distribution!r}; set --config.sparsity.distribution=explicit "
                         "or clear explicit_densities.")
    num_steps = int(config.train.num_steps)
    s = methods.Settings(
        method=_choice("method", sp.method, methods.METHODS),
        density=masks_lib.check_density(sp.density), distribution=distribution,
        explicit=explicit, structure=structure,
        sparse_layers=masks_lib.parse_patterns(sp.sparse_layers),
        init=_choice("init", sp.init, ("random", "magnitude")),
        update_every=int(sp.update_every), drop_fraction=float(sp.drop_fraction),
        drop_fraction_schedule=_choice("drop_fraction_schedule", sp.drop_fraction_schedule,
                                       ("cosine", "constant")),
        update_start=int(sp.update_start),
        update_end=int(sp.update_end) if int(sp.update_end) >= 0 else int(0.75 * num_steps),
        grow_init=_choice("grow_init", sp.grow_init, ("zeros",)))
    if not 0.0 <= s.drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction={s.drop_fraction} must be in [0, 1].")
    if s.update_every < 1:
        raise ValueError(f"update_every={s.update_every} must be >= 1.")
    if structure.kind == "nm" and s.method != "dense":
        if abs(s.density - structure.n / structure.m) > 1e-9:
            raise ValueError(f"structure=nm fixes the density at nm_n/nm_m = "
                             f"{structure.n}/{structure.m}; set --config.sparsity.density="
                             f"{structure.n / structure.m:g}.")
        if distribution != "uniform":
            raise ValueError("structure=nm has the same density n/m in every layer; set "
                             "--config.sparsity.distribution=uniform.")
    return s


def _method(config, model: ModelConfig) -> methods.SparsityMethod:
    """The configured method: shared settings + its own fields from ``config.sparsity``."""
    settings = _settings(config)
    sp, defaults = config.sparsity, config_lib.base_config().sparsity
    cls = methods.METHODS[settings.method]
    own = methods.method_fields(cls)
    values = {}
    for name, field in own.items():
        if name in sp:
            values[name] = sp[name]
        elif field.default is not dataclasses.MISSING:
            values[name] = field.default
        else:
            raise ValueError(f"sparsity.method={settings.method} reads sparsity.{name}, which "
                             "this config lacks; add it to the config's sparsity section.")
    for key in sorted(set(sp) - set(SHARED_KEYS) - set(own)):
        if key in defaults and sp[key] != defaults[key]:
            users = [m for m, c in methods.METHODS.items() if key in methods.method_fields(c)]
            raise ValueError(
                f"sparsity.{key}={sp[key]} is not read by method={settings.method} (it is a "
                f"setting of {', '.join(users) or 'no method'}); set "
                f"--config.sparsity.{key}={defaults[key]} or choose one of those methods.")
    method = cls(settings=settings, **cls.resolve(settings, values))
    method.validate(sparse_shapes(method, model), int(config.train.num_steps))
    return method


def sparse_shapes(method, model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """path -> shape of the kernels the method's ``sparse_layers`` select (shape-checked)."""
    shapes = model.kernel_shapes()
    paths = masks_lib.select_paths(sorted(shapes), method.settings.sparse_layers)
    for path in paths:
        method.settings.structure.check(path, shapes[path])
    return {p: shapes[p] for p in paths}


def _optimizer(t) -> OptimizerConfig:
    return OptimizerConfig(**{f.name: t[f.name] for f in dataclasses.fields(OptimizerConfig)})


def _attention(config) -> attention_lib.HybridAttention | None:
    """Hybrid attention, or None without a non-empty window (``sparse_end=0``, the default,
    or ``sparse_end == sparse_start``)."""
    a = config.attention
    if int(a.sparse_end) == 0:
        return None
    end = int(config.train.num_steps) if int(a.sparse_end) < 0 else int(a.sparse_end)
    spec = attention_lib.HybridAttention(
        pattern=attention_lib.Pattern(str(a.pattern), int(a.window), int(a.stride),
                                      int(a.summary)),
        block_size=int(a.block_size), start=int(a.sparse_start), end=end, impl=str(a.impl),
        backend=str(a.backend))
    if spec.end <= spec.start:
        return None
    spec.check_length(int(config.data.seq_len))
    return spec


def _sat(config, model: ModelConfig) -> sat_lib.SAT | None:
    """SAT's omission plan, or None (``sat.omission_rate=0``)."""
    s = config.sat
    rate = float(s.omission_rate)
    if rate == 0:
        return None
    if not 0 < rate < 1:
        raise ValueError(f"sat.omission_rate={rate} must be in [0, 1) (0 turns SAT off); "
                         "e.g. --config.sat.omission_rate=0.5.")
    for key, options in (("metric", METRICS), ("selection", SELECTIONS),
                         ("schedule", sat_lib.SCHEDULES)):
        if s[key] not in options:
            raise ValueError(f"Unknown sat.{key} {s[key]!r}; choose one of "
                             f"{', '.join(options)} (--config.sat.{key}=...).")
    targets = tuple(t.strip() for t in str(s.targets).split(",") if t.strip())
    if not targets or any(t not in sat_lib.TARGETS for t in targets):
        raise ValueError(f"sat.targets={s.targets!r}: give a comma list of "
                         f"{', '.join(sat_lib.TARGETS)} (--config.sat.targets=heads,mlp).")
    if s.schedule == "constant":
        rates, boundaries = (rate,), ()
    else:
        start, stairs = float(s.ladder_start), int(s.ladder_stairs)
        if not 0 <= start <= 1 or stairs < 1:
            raise ValueError(f"sat.ladder_start={start} must be in [0, 1] and "
                             f"sat.ladder_stairs={stairs} at least 1.")
        rates, boundaries = sat_lib.ladder(rate, int(config.train.num_steps), start, stairs)
    if int(s.probe_tokens) < 1:
        raise ValueError(f"sat.probe_tokens={s.probe_tokens} must be >= 1.")
    return sat_lib.SAT(rates=rates, boundaries=boundaries, n_heads=model.n_heads,
                       d_ff=model.ff, heads="heads" in targets, mlp="mlp" in targets,
                       metric=s.metric, selection=s.selection, probe_tokens=int(s.probe_tokens))


def _pipeline(config, num_devices: int | None) -> pipeline_lib.PipelineConfig | None:
    """The pipeline schedule over ``mesh.stage`` devices, or None for one stage."""
    m = config.mesh
    sizes = sharding.mesh_shape(m, jax.device_count() if num_devices is None else num_devices)
    if sizes["stage"] == 1:
        return None
    pcfg = pipeline_lib.PipelineConfig(sizes["stage"], int(m.num_microbatches) or sizes["stage"],
                                       m.schedule, int(m.circular_repeats))
    pcfg.validate(config.model.n_layers, config.train.batch_size)
    return pcfg


# ----------------------------------------------------------------------------- across sections

def _check_combination(config, model, method, attention, sat, pipeline) -> None:
    structure = method.settings.structure
    if model.matmul == "block_sparse" and (structure.kind != "block"
                                           or structure.balance != "column"):
        raise ValueError("model.matmul=block_sparse runs only column-balanced block masks; "
                         "set --config.sparsity.structure=block (block_balance=column), or "
                         "--config.model.matmul=masked.")
    if model.matmul == "block_sparse" and method.goes_dense and (
            attention is not None or sat is not None):
        raise ValueError(
            "A dense phase (sparsity.dense_finetune_start) with model.matmul=block_sparse "
            "switches the model between kernel and dense paths, which hybrid sparse "
            "attention and SAT do not support; set --config.attention.sparse_end=0 and "
            "--config.sat.omission_rate=0, or --config.model.matmul=masked.")
    if (attention is not None or sat is not None) and pipeline is not None:
        raise ValueError("Hybrid sparse attention (attention.sparse_start/sparse_end) and SAT "
                         "(sat.omission_rate) run on the unpipelined model only; set "
                         "--config.mesh.stage=1, or turn them off.")
    if sat is not None and method.needs_dense_grads:
        raise ValueError("SAT (sat.omission_rate > 0) omits neurons from the gradient, which "
                         "dense-gradient growth (RigL, MST) needs whole; use "
                         "sparsity.method=dense/static/gmp/set with SAT.")
    if sat is not None and model.matmul != "masked":
        raise ValueError("SAT's neuron omission slices dense kernels; it needs "
                         "--config.model.matmul=masked (not block_sparse).")


def _check_compact(model: ModelConfig, method) -> None:
    """``model.sparse_storage=compact`` stores a fixed number of live blocks per output block
    column: it needs the block kernels and a method that keeps that number."""
    fix = "or keep --config.model.sparse_storage=dense"
    if model.matmul != "block_sparse":
        raise ValueError("model.sparse_storage=compact stores only live blocks, which the "
                         f"block-sparse kernels multiply: set --config.model.matmul=block_sparse"
                         f" (with sparsity.structure=block), {fix}.")
    if method.always_dense or method.starts_dense:
        raise ValueError(
            f"model.sparse_storage=compact holds a fixed number of live blocks per column, but "
            f"sparsity.method={method.settings.method} is dense at the start (its budget is "
            "the whole matrix, so compact storage saves nothing): use method static, set or "
            f"rigl, {fix}.")
    if len(method.kernel_tiers(sparse_shapes(method, model))) > 1:
        raise ValueError(f"model.sparse_storage=compact holds a fixed number of live blocks "
                         f"per column, but sparsity.method={method.settings.method} changes "
                         f"its density during training: use static, set or rigl, {fix}.")
    if getattr(method, "grow_grad_steps", 1) > 1:
        raise ValueError("model.sparse_storage=compact scores growth by one dense gradient "
                         "per update: set --config.sparsity.grow_grad_steps=1, " f"{fix}.")


def _check_train(t: ml_collections.ConfigDict) -> None:
    """Values of ``config.train``, each refused with its key before any work."""
    for key in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every",
                "eval_batches", "keep_checkpoints"):
        if t[key] <= 0:
            why = {"keep_checkpoints": " (0 would delete every checkpoint, the last one too)",
                   "eval_batches": " (0 would report a validation loss of 0)"}.get(key, "")
            raise ValueError(f"train.{key}={t[key]} must be at least 1{why}; set "
                             f"--config.train.{key}.")
    for key in ("sample_tokens", "warmup_steps"):
        if t[key] < 0:
            raise ValueError(f"train.{key}={t[key]} must be >= 0; set --config.train.{key}.")
    import math
    positive, unit = (lambda v: v > 0, "> 0"), (lambda v: 0 <= v < 1, "in [0, 1)")
    checks = {"lr": positive, "grad_clip": positive, "eps": positive, "b1": unit, "b2": unit,
              "weight_decay": (lambda v: v >= 0, ">= 0"),
              "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]")}
    for key, (ok, what) in checks.items():
        if not (math.isfinite(t[key]) and ok(t[key])):
            raise ValueError(f"train.{key}={t[key]} must be a finite number {what}; set "
                             f"--config.train.{key}.")
