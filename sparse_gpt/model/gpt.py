"""A GPT-2-style decoder in Flax linen, pure in ``params``, ``masks`` and ``tokens``.

    logits_BxLxV = GPT(cfg).apply({"params": params, "masks": masks}, tokens_BxL)

Pre-LayerNorm blocks (attention then GELU MLP), learned positions (or RoPE), tied input and
output embeddings. The decoder blocks are stacked with ``nn.scan``: every block param and
mask has a leading layer axis N, which keeps compile time flat in depth and is the axis the
pipeline splits into stages. Masks exist for the four projection kernels of each block
(``blocks/attn/qkv``, ``blocks/attn/out``, ``blocks/mlp/fc``, ``blocks/mlp/proj``) and start
all ``True``; the dimension letters are defined in ``sparse_gpt.config``.

Logical axis names (mapped to mesh axes by ``config.mesh.rules``, see ``sharding.py``):
params ``vocab``, ``embed``, ``qkv``, ``heads``, ``mlp``, ``norm`` and ``layers`` (the
stacked axis); activations ``batch``, ``length``, ``act_embed`` and ``mlp``. Off a mesh the
names do nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparse_gpt.model import omission as omission_lib
from sparse_gpt.model.causal import causal_attention
from sparse_gpt.model.context import StepContext
from sparse_gpt.model.layers import SparseDense, logical_init

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# The maskable kernels (the four projections of every block), relative to the params root.
KERNELS = ("blocks/attn/qkv/kernel", "blocks/attn/out/kernel",
           "blocks/mlp/fc/kernel", "blocks/mlp/proj/kernel")


def kernel_key(path: str) -> str:
    """``"blocks/attn/qkv/kernel"`` -> ``"attn/qkv"``: a kernel's key in ``StepContext`` and
    ``ModelConfig`` (its module path below the stacked blocks)."""
    return path.removeprefix("blocks/").removesuffix("/kernel")


def live_masks(params: Any) -> dict:
    """All-True masks of the ``KERNELS`` of ``params``: the model's ``masks`` collection at
    init, built without running the model (imported weights, tests, notebooks)."""
    out: dict = {}
    for path in KERNELS:
        *parents, leaf = path.split("/")
        node_p, node_m = params, out
        for key in parents:
            node_p, node_m = node_p[key], node_m.setdefault(key, {})
        node_m[leaf] = np.ones(node_p[leaf].shape, bool)
    return out


def kernel_leaves(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` of the ``KERNELS`` present in a params or masks tree."""
    out = {}
    for path in KERNELS:
        node = tree
        for key in path.split("/"):
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable model hyper-parameters (see ``config.base_config().model``); built from a run
    config by ``sparse_gpt.plan``, which also sets the values the model takes from other
    sections: the block size and budget (``block_density``, the densest layer the sparsity
    method will hold, and ``block_tiers``, the budgets a changing density switches between:
    :func:`kernel_tier`) and ``num_tokens`` (the tokenizer's vocabulary)."""
    vocab_size: int = 264
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 0
    max_len: int = 256
    use_rope: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_unroll: int = 1         # blocks per scan iteration; 0 = all
    init_std: float = 0.02
    matmul: str = "masked"
    kernel_backend: str = "auto"
    block_size: int = 128
    block_density: float = 1.0
    block_tiers: tuple[float, ...] = ()  # budget tiers (ascending, the last block_density)
    num_tokens: int = 0          # the tokenizer's vocabulary; 0: all vocab_size rows are real
    sparse_storage: str = "dense"   # dense | compact (live blocks only: model/compact.py)
    # compact: (kernel key, live blocks per output block column T) of each compact kernel.
    compact_slots: tuple[tuple[str, int], ...] = ()
    # Kernels outside sparsity.sparse_layers (keys as "attn/qkv"): always all live, so they
    # take the plain product whatever ``matmul`` is (no block budget holds a full matrix).
    dense_kernels: tuple[str, ...] = ()

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def kernel_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Shapes ``[N_layers, K, N]`` of the maskable projection kernels (``KERNELS``)."""
        n, d, f = self.n_layers, self.d_model, self.ff
        return dict(zip(KERNELS, [(n, d, 3 * d), (n, d, d), (n, d, f), (n, f, d)]))

    def validate(self) -> None:
        """Raises ValueError on shapes the model cannot build."""
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "set --config.model.n_heads to a divisor of d_model.")
        if self.scan_unroll < 0:
            raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 0 (blocks per "
                             "scan iteration; 0 unrolls all of them).")
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}.")
        if self.sparse_storage not in ("dense", "compact"):
            raise ValueError(f"model.sparse_storage={self.sparse_storage!r}: use 'dense' or "
                             "'compact' (--config.model.sparse_storage).")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of "
                                 f"{sorted(_DTYPES)}.")

    def slots(self, key: str) -> int:
        """Live blocks per output block column of compact kernel ``key`` ("mlp/fc"); 0 for
        a kernel stored dense."""
        return dict(self.compact_slots).get(key, 0)

    def dense_layout(self) -> "ModelConfig":
        """The same model with every kernel stored dense ([K, N] + mask): the layout a
        compact model is initialised, densified and differentiated densely in."""
        return dataclasses.replace(self, sparse_storage="dense", compact_slots=())

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]


def kernel_tier(cfg: ModelConfig, masks: Any) -> jax.Array:
    """Index of the smallest of ``cfg.block_tiers`` whose block budget holds every masked
    kernel (its fullest output block column, over its layers); int32 scalar, traced."""
    import kernels  # local import: the model works without the kernels package loaded

    b, fits = cfg.block_size, jnp.ones(len(cfg.block_tiers), bool)
    flat = kernel_leaves(masks)
    for path, (_, k, n) in cfg.kernel_shapes().items():
        if path not in flat or kernel_key(path) in cfg.dense_kernels:
            continue
        per_col = jnp.max(jnp.sum(kernels.pool_blocks(flat[path], (b, b), "any"), axis=-2))
        budgets = jnp.asarray([kernels.block_budget(k, n, b, t).max_per_col
                               for t in cfg.block_tiers])
        fits = fits & (per_col <= budgets)
    return jnp.argmax(fits).astype(jnp.int32)


def _dense(cfg: ModelConfig, features: int, key: str, std: float,
           axes: tuple[str, str], in_features: int | None = None) -> SparseDense:
    """The ``SparseDense`` of kernel ``key`` ("attn/qkv"; its module name is the last part)."""
    return SparseDense(features, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                       kernel_init=nn.initializers.normal(std),
                       matmul="masked" if key in cfg.dense_kernels else cfg.matmul,
                       block_size=cfg.block_size, block_density=cfg.block_density,
                       block_tiers=cfg.block_tiers, slots=cfg.slots(key),
                       kernel_backend=cfg.kernel_backend, kernel_axes=axes,
                       in_features=in_features, name=key.rsplit("/", 1)[-1])


def _omitting(module: nn.Module, omission: Any, keep: int | None) -> bool:
    """Whether ``module`` computes only ``keep`` units this call (SAT; never at init)."""
    return omission is not None and keep is not None and not module.is_initializing()


def _layer_norm(cfg: ModelConfig, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                        scale_init=logical_init(nn.initializers.ones, ("norm",)),
                        bias_init=logical_init(nn.initializers.zeros, ("norm",)), name=name)


def _residual(x_BxLxD: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))


def rope(x_BxLxHxK: jax.Array) -> jax.Array:
    """Rotary position embedding over the head dim (half-split convention)."""
    _, seq_len, _, head_dim = x_BxLxHxK.shape
    half = head_dim // 2
    freq_K2 = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_LxK2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freq_K2[None, :]
    cos, sin = jnp.cos(angle_LxK2)[None, :, None, :], jnp.sin(angle_LxK2)[None, :, None, :]
    x1, x2 = x_BxLxHxK[..., :half].astype(jnp.float32), x_BxLxHxK[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection.

    ``ctx.omission`` (SAT, or None): compute only ``keep_heads`` heads this call, chosen by
    its importance metric; the others cost nothing and get zero gradient. ``ctx.attention``
    (hybrid sparse attention, or None): the sparse pattern while its traced flag is on.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, ctx: StepContext = StepContext()) -> jax.Array:
        cfg, omission = self.cfg, ctx.omission
        b, seq_len, d = x_BxLxD.shape
        n_heads, cols, rows = cfg.n_heads, None, None
        if _omitting(self, omission, getattr(omission, "keep_heads", None)):
            p = self.variables["params"]
            qkv_Dx3xHxK = p["qkv"]["kernel"].reshape(d, 3, cfg.n_heads, cfg.head_dim)
            out_HxKxD = p["out"]["kernel"].reshape(cfg.n_heads, cfg.head_dim, d)
            scores_H = omission_lib.unit_scores(
                omission.metric, x_BxLxD, qkv_Dx3xHxK.transpose(0, 2, 1, 3).reshape(
                    d, cfg.n_heads, 3 * cfg.head_dim), out_HxKxD, self.make_rng("sat"),
                omission.probe_tokens)
            heads_h = omission_lib.select(scores_H, omission.keep_heads, omission.selection,
                                     self.make_rng("sat"))
            n_heads = omission.keep_heads
            cols = omission_lib.head_columns(cfg.n_heads, cfg.head_dim, heads_h)
            rows = omission_lib.head_rows(cfg.head_dim, heads_h)
        qkv_BxLx3D = _dense(cfg, 3 * d, "attn/qkv", cfg.init_std, ("embed", "qkv"))(
            x_BxLxD, out_index=cols, frozen=ctx.frozen("attn/qkv"), tier=ctx.tier)
        q, k, v = jnp.split(qkv_BxLx3D.reshape(b, seq_len, 3, n_heads, cfg.head_dim), 3,
                            axis=2)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (t[:, :, 0] for t in (q, k, v))
        if cfg.use_rope:
            q_BxLxHxK, k_BxLxHxK = rope(q_BxLxHxK), rope(k_BxLxHxK)
        if ctx.attention is None:
            out_BxLxHxK = causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
        else:  # attention.Switch: the sparse pattern while its traced flag is on
            out_BxLxHxK = ctx.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2's residual scaling
        return _dense(cfg, d, "attn/out", out_std, ("heads", "embed"), in_features=d)(
            out_BxLxHxK.reshape(b, seq_len, n_heads * cfg.head_dim), in_index=rows,
            frozen=ctx.frozen("attn/out"), tier=ctx.tier)


class MLP(nn.Module):
    """GELU MLP: D -> F -> D; with ``ctx.omission``, only ``keep_channels`` of F channels."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, ctx: StepContext = StepContext()) -> jax.Array:
        cfg, omission = self.cfg, ctx.omission
        channels = None
        if _omitting(self, omission, getattr(omission, "keep_channels", None)):
            p = self.variables["params"]
            scores_F = omission_lib.unit_scores(
                omission.metric, x_BxLxD, p["fc"]["kernel"][:, :, None],
                p["proj"]["kernel"][:, None, :], self.make_rng("sat"), omission.probe_tokens)
            channels = omission_lib.select(scores_F, omission.keep_channels, omission.selection,
                                      self.make_rng("sat"))
        h_BxLxF = nn.gelu(_dense(cfg, cfg.ff, "mlp/fc", cfg.init_std, ("embed", "mlp"))(
            x_BxLxD, out_index=channels, frozen=ctx.frozen("mlp/fc"), tier=ctx.tier))
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return _dense(cfg, cfg.d_model, "mlp/proj", out_std, ("mlp", "embed"), in_features=cfg.ff)(
            h_BxLxF, in_index=channels, frozen=ctx.frozen("mlp/proj"), tier=ctx.tier)


class Block(nn.Module):
    """One pre-LayerNorm decoder block; the scan carry is the residual stream."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, ctx: StepContext = StepContext(),
                 layer: jax.Array | None = None) -> tuple[jax.Array, None]:
        """``layer``: this block's index in the stack (scanned), read by ``ctx.topology``."""
        if ctx.topology is not None:
            ctx = ctx.replace(layer=layer)
        x_BxLxD = _residual(x_BxLxD)
        x_BxLxD = x_BxLxD + Attention(self.cfg, name="attn")(_layer_norm(self.cfg, "ln1")(x_BxLxD),
                                                             ctx)
        x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln2")(x_BxLxD),
                                                      ctx)
        return _residual(x_BxLxD), None


def stacked_blocks(cfg: ModelConfig, length: int, name: str = "blocks") -> nn.Module:
    """``length`` decoder blocks under one ``nn.scan`` (params and masks stacked on axis 0).

    Called as ``blocks(x, ctx, layers)`` with ``layers = jnp.arange(length)`` (scanned: each
    block sees its own index; only a frozen ``ctx.topology`` reads it).
    """
    block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
    # The step context is broadcast (every layer gets the same attention switch and SAT
    # omission spec) and the layer index scanned; the "sat" rng is split so each layer
    # draws its own units.
    scanned = nn.scan(block, variable_axes={"params": 0, "masks": 0},
                      split_rngs={"params": True, "sat": True}, length=length,
                      in_axes=(nn.broadcast, 0),
                      unroll=min(cfg.scan_unroll or length, length),
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, name=name)


class GPT(nn.Module):
    """The decoder: embeddings, N stacked blocks, final LayerNorm, tied LM head."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype,
                            param_dtype=cfg.jnp_param_dtype,
                            embedding_init=logical_init(nn.initializers.normal(cfg.init_std),
                                                        ("vocab", "embed")))
        if not cfg.use_rope:
            self.wpe = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.jnp_dtype,
                                param_dtype=cfg.jnp_param_dtype,
                                embedding_init=logical_init(
                                    nn.initializers.normal(cfg.init_std / 2), (None, "embed")))
        self.blocks = stacked_blocks(cfg, cfg.n_layers)
        self.ln_f = _layer_norm(cfg)

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token (+ position) embeddings of the input."""
        seq_len = tokens_BxL.shape[1]
        if seq_len > self.cfg.max_len:
            raise ValueError(f"Sequence length {seq_len} exceeds the model context "
                             f"max_len={self.cfg.max_len}; lower --config.data.seq_len or "
                             "raise --config.model.max_len.")
        x_BxLxD = self.wte(tokens_BxL)
        if not self.cfg.use_rope:
            x_BxLxD = x_BxLxD + self.wpe(jnp.arange(seq_len))[None]
        return _residual(x_BxLxD)

    def head(self, x_BxLxD: jax.Array) -> jax.Array:
        """Final LayerNorm and the tied LM head; logits in float32."""
        logits_BxLxV = self.wte.attend(self.ln_f(x_BxLxD)).astype(jnp.float32)
        num_tokens = self.cfg.num_tokens
        if 0 < num_tokens < self.cfg.vocab_size:
            # Rows past the tokenizer's vocabulary only pad the table (to a multiple of 64 or
            # 8); no target is ever there, and imported weights have zeros there, which would
            # otherwise outscore every real token.
            real_V = jnp.arange(self.cfg.vocab_size) < num_tokens
            logits_BxLxV = jnp.where(real_V, logits_BxLxV, -1e9)
        return logits_BxLxV

    def __call__(self, tokens_BxL: jax.Array, ctx: StepContext = StepContext()) -> jax.Array:
        """Logits ``[B, L, V]``.

        Args:
          tokens_BxL: input tokens.
          ctx: the step's modifiers (``context.StepContext``: hybrid attention switch, SAT
            omission; SAT needs a ``"sat"`` rng); the default is the plain model.
        """
        x_BxLxD, _ = self.blocks(self.embed(tokens_BxL), ctx, jnp.arange(self.cfg.n_layers))
        return self.head(x_BxLxD)
