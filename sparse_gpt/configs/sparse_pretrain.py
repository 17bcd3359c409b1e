"""Sparse pretraining on a dataflow-style pipeline: the SambaNova recipe for every preset.

Static block-sparse attention and MLP projections (``attn/qkv``, ``attn/out``, ``mlp/fc``,
``mlp/proj``) at 75% or 87.5% sparsity, the same in every layer, in column-balanced square
blocks, multiplied by the block-sparse kernels (``model.matmul=block_sparse``: Pallas on GPU,
XLA gathers on CPU) so that skipped blocks cost no time, and stored compact
(``model.sparse_storage=compact``: only the live blocks, in params, gradients, Adam moments
and checkpoints, so that they cost no memory either; ``=dense`` keeps ``[L, K, N]`` weights
with zeros off the blocks, the same numbers up to the rounding of the clipping norm's sum).
Embeddings, LayerNorms and the LM head stay dense. The big presets run their blocks as a
GPipe pipeline over ``mesh.stage`` devices. Optionally the last part of training is dense: after
``sparsity.dense_finetune_start`` steps the masks are lifted to all ones (the lifted weights
start at zero) and the model leaves the kernel for the dense product. See
``../shared/PAPERS.md`` section 1 for what the paper says and which choices are ours.

Run (``ARG`` = ``PRESET[,SPARSITY][,dense_ft=FRACTION][,local]``)::

    python train.py --config sparse_gpt/configs/sparse_pretrain.py:tiny          # CPU, minutes
    python train.py --config sparse_gpt/configs/sparse_pretrain.py:tiny,75,local  # CPU, ~1 min
    python train.py --config sparse_gpt/configs/sparse_pretrain.py:gpt2-small,87.5,dense_ft=0.1 \\
        --config.data.path=CORPUS --config.data.bpe_dir=BPE_DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python train.py --config sparse_gpt/configs/sparse_pretrain.py:gpt-13b,87.5,local

    PRESET     tiny | gpt2-small | gpt2-medium | gpt-1.3b | gpt-13b (sparse_gpt/config.py)
    SPARSITY   75 | 87.5: percent of each sparse matrix removed (default 87.5, the paper's)
    dense_ft   fraction of train.num_steps trained dense at the end (default 0: none); sets
               sparsity.dense_finetune_start = round((1 - dense_ft) * num_steps). After
               overriding train.num_steps, set that key too (it is checked against it).
    local      the same recipe (kernels, stages, schedule, dense phase) at a toy shape on the
               bundled corpus: max(2, stages) layers x 128, 20 steps; about a minute on 2
               CPU cores, mostly compilation. Stages need devices (XLA_FLAGS, as above).

The default workdir is ``runs/sparse_pretrain-PRESET-SPARSITY[-dtFRACTION][-local]-static``.

What they cost (training FLOPs as sparse_gpt/flops.py counts them, per step and for the
whole run dense; "sparse" is the fraction of the dense step the static masks leave, which is
what the kernels compute; the dense phase costs the dense step; tokens/step = batch x context):

    preset       block    stages x   tokens   steps   dense FLOPs      sparse / dense
                 75/87.5  microb.    /step            step    run      75%    87.5%
    tiny         32/16    1            2K       600   1.2e10  7.0e12   0.38   0.28
    gpt2-small   64/32    1           33K     10000   2.8e13  2.8e17   0.55   0.48
    gpt2-medium  128      1           33K     10000   7.9e13  7.9e17   0.44   0.35
    gpt-1.3b     128      4 x 32       1M    100000   9.5e15  9.5e20   0.40   0.30
    gpt-13b      128      8 x 64       1M    100000   8.6e16  8.6e21   0.31   0.20

(block: the largest power of two <= 128 that makes the density a whole number of blocks per
output block column. The sparse fraction is of the whole step: the LM head and the attention
products stay dense, so it is well above the 0.25 / 0.125 of the sparse matrices. Memory
(``benchmarks/memory.py``): the dense 13B model's weights, gradients and Adam moments take
206 GB; this recipe's compact state at 87.5% takes 29.5 GB (0.14x), split over its 8 stages;
its activations at batch 512 x 2048 want a data axis as well, e.g. 64 GPUs as 8 stages x 8
data, which ``mesh.data=-1`` fills in.)
Big presets need ``--config.data.bpe_dir`` (GPT-2 BPE) and a real corpus in
``--config.data.path``; the bundled Shakespeare is only for the tiny and local variants.
"""

from __future__ import annotations

import ml_collections

from sparse_gpt import config as config_lib

SPARSITIES = {"75": 0.25, "87.5": 0.125}        # percent removed -> density
# (pipeline stages, microbatches) of the presets that do not fit one device.
STAGES = {"gpt-1.3b": (4, 32), "gpt-13b": (8, 64)}
_USAGE = ("--config sparse_gpt/configs/sparse_pretrain.py:PRESET[,SPARSITY][,dense_ft=FRACTION]"
          "[,local], e.g. :gpt2-small,87.5,dense_ft=0.1")


def block_size(d_model: int, density: float) -> int:
    """The largest block edge in (128, 64, 32, 16) giving a whole number of live blocks per
    output block column at ``density`` (every sparse kernel's K is a multiple of d_model)."""
    for b in (128, 64, 32, 16):
        kb = d_model // b
        if d_model % b == 0 and abs(kb * density - round(kb * density)) < 1e-9:
            return b
    raise ValueError(f"d_model={d_model} has no block size in [16, 128] holding density "
                     f"{density} exactly; set --config.sparsity.block_size yourself.")


def parse_arg(arg: str | None) -> tuple[str, str, float, bool]:
    """``PRESET[,SPARSITY][,dense_ft=F][,local]`` -> (preset, sparsity, dense_ft, local).

    Raises:
      ValueError: unknown preset, sparsity or token, or a fraction outside [0, 1).
    """
    preset, sparsity, dense_ft, local = "tiny", "87.5", 0.0, False
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    for i, item in enumerate(items):
        if i == 0 and item in config_lib.PRESETS:
            preset = item
        elif item.rstrip("%") in SPARSITIES:
            sparsity = item.rstrip("%")
        elif item.startswith("dense_ft="):
            try:
                dense_ft = float(item.partition("=")[2])
            except ValueError:
                dense_ft = -1.0
            if not 0.0 <= dense_ft < 1.0:
                raise ValueError(f"sparse_pretrain: {item!r} must be a fraction in [0, 1) of "
                                 "train.num_steps trained dense at the end, e.g. dense_ft=0.1.")
        elif item == "local":
            local = True
        else:
            raise ValueError(
                f"sparse_pretrain: unknown argument {item!r}. Presets: "
                f"{', '.join(config_lib.PRESETS)} (first); sparsities: "
                f"{', '.join(SPARSITIES)}; then dense_ft=FRACTION and/or local. "
                f"Usage: {_USAGE}")
    return preset, sparsity, dense_ft, local


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The sparse-pretraining config of ``arg`` (see the module docstring).

    Returns:
      A locked ``ConfigDict`` of ``sparse_gpt/config.py``'s shape (every key overridable).

    Raises:
      ValueError: a bad ``arg`` (the message gives the usage).
    """
    preset, sparsity, dense_ft, local = parse_arg(arg)
    density = SPARSITIES[sparsity]
    c = config_lib.get_config(preset)
    stages, microbatches = STAGES.get(preset, (1, 0))
    c.model.update(matmul="block_sparse", sparse_storage="compact")
    c.sparsity.update(method="static", density=density, distribution="uniform",
                      structure="block", block_balance="column", init="random",
                      sparse_layers="attn/qkv,attn/out,mlp/fc,mlp/proj")
    c.mesh.update(stage=stages, num_microbatches=microbatches, schedule="gpipe",
                  circular_repeats=1, data=-1, fsdp=1, tensor=1)
    if local:
        _shrink(c, stages)
    c.sparsity.block_size = block_size(c.model.d_model, density)
    if dense_ft > 0:
        c.sparsity.dense_finetune_start = round((1.0 - dense_ft) * c.train.num_steps)
    c.preset = "-".join(["sparse_pretrain", preset, sparsity]
                        + ([f"dt{dense_ft:g}"] if dense_ft > 0 else [])
                        + (["local"] if local else []))
    return c


def _shrink(c: ml_collections.ConfigDict, stages: int) -> None:
    """The toy shape of ``local``: byte tokens on the bundled corpus, seconds on a CPU."""
    c.model.update(n_layers=max(2, stages), d_model=128, n_heads=4, d_ff=0, max_len=64,
                   vocab_size=256 + 8, dtype="float32", remat=False)
    c.data.update(tokenizer="byte", bpe_dir="", seq_len=64)
    c.train.update(batch_size=8, num_steps=20, lr=3e-3, warmup_steps=2, log_every=5,
                   eval_every=10, eval_batches=2, checkpoint_every=10, sample_tokens=16)
    if stages > 1:
        c.mesh.num_microbatches = stages
