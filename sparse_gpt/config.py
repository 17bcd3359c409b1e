"""Configs for sparse_gpt: one base config and named presets.

Run a preset with::

    python train.py --config sparse_gpt/config.py:tiny --workdir runs/tiny
    python train.py --config sparse_gpt/config.py:gpt2-small --config.train.batch_size=64

Any field can be overridden with ``--config.SECTION.KEY=VALUE``; overriding a key that does
not exist is an error (the config is locked). Config families built on these presets live in
``sparse_gpt/configs/`` (e.g. ``sparse_pretrain.py:gpt2-small,87.5``, the SambaNova recipe).

Dimension letters used in array names across the code base (``x_BxLxD``):

    B  batch                    L  sequence length (tokens)
    D  model width (d_model)    H  attention heads
    K  head dimension (D // H)  F  MLP hidden width (d_ff)
    V  vocabulary               N  number of decoder layers (stacked leading axis)

Presets (parameter counts with the GPT-2 BPE vocabulary of 50304, tied embeddings):

    tiny         4 x 128, byte vocab, 256 context   ~0.9M  params, CPU, 600 steps (val loss ~2.1)
    gpt2-small   12 x 768, 1024 context             124M   (GPT-2 small)
    gpt2-medium  24 x 1024, 1024 context            350M   (GPT-2 medium)
    gpt-1.3b     24 x 2048, 2048 context            1.3B   (GPT-3 XL shape)
    gpt-13b      40 x 5120, 40 heads, 2048 context  13B    (the SambaNova paper's model)
"""

from __future__ import annotations

import ml_collections

PRESETS = ("tiny", "gpt2-small", "gpt2-medium", "gpt-1.3b", "gpt-13b")

# (n_layers, d_model, n_heads, max_len) of each preset.
_SHAPES = {
    "tiny": (4, 128, 4, 256),
    "gpt2-small": (12, 768, 12, 1024),
    "gpt2-medium": (24, 1024, 16, 1024),
    "gpt-1.3b": (24, 2048, 16, 2048),
    "gpt-13b": (40, 5120, 40, 2048),
}


def base_config() -> ml_collections.ConfigDict:
    """Returns the full config tree with every key a preset or the CLI may set."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=50304,        # GPT-2's 50257 padded to a multiple of 64
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_ff=0,                  # 0 -> 4 * d_model
        max_len=1024,            # context length of the learned position table
        use_rope=False,          # rotary embeddings instead of learned positions
        dtype="float32",         # compute dtype: float32 | bfloat16
        param_dtype="float32",   # parameters stay fp32 under bf16 compute
        remat=False,             # rematerialise each block in the backward pass
        scan_unroll=1,           # decoder blocks per nn.scan iteration; 0 = all (no loop: the
                                 # fastest step at small shapes, compile time grows with layers)
        init_std=0.02,
        # How SparseDense multiplies: "masked" (x @ (w * m), the oracle) or "block_sparse"
        # (kernels.block_sparse_matmul on non-zero blocks; needs a block-structured mask).
        matmul="masked",
        kernel_backend="auto",   # auto | xla | pallas_gpu | pallas_tpu | reference
        # How a block-sparse kernel is stored: "dense" ([K, N] weight + [K, N] mask) or
        # "compact" (only the live blocks, [Nb, T, B, B], with their K-block indices [Nb, T]
        # as the mask; gradients and Adam moments in the same shape). Compact needs
        # matmul=block_sparse, column-balanced blocks and a method whose live-block count
        # is fixed (static, set, rigl). See sparse_gpt/model/compact.py.
        sparse_storage="dense",
    ))

    c.data = ml_collections.ConfigDict(dict(
        path="",                 # "" -> bundled Shakespeare corpus; else a .txt/.jsonl file or folder
        tokenizer="byte",        # byte | gpt2
        bpe_dir="",              # folder with GPT-2 encoder.json + vocab.bpe (tokenizer=gpt2)
        seq_len=256,
        val_fraction=0.05,       # fraction of documents held out for validation
        data_dir="",             # TFDS cache; "" -> $SPARSE_GPT_DATA_DIR or ~/.cache/sparse_gpt/tfds
        seed=0,                  # shuffling seed
        num_workers=0,           # grain worker processes (0: in-process)
        format="text",           # text | sft: {"prompt","response"} JSONL, loss on the response
                                 # only (one padded example per row; see sparse_gpt/data/sft.py)
    ))

    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        batch_size=32,
        num_steps=10000,
        optimizer="adamw",       # adamw | sgd (Nesterov momentum b1, L2 weight_decay: use
                                 # an SGD value such as 1e-4, not AdamW's 0.1)
        lr=6e-4,
        min_lr_ratio=0.1,        # cosine decays to lr * min_lr_ratio
        warmup_steps=500,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        log_every=50,
        eval_every=500,
        eval_batches=20,
        checkpoint_every=500,
        keep_checkpoints=3,
        sample_tokens=200,       # length of the text sample written at the end
        sample_prompt="ROMEO:",
        progress_bar=True,
        # A fresh run starts from these weights: a Hugging Face GPT-2 folder (config.json +
        # model.safetensors) or a sparse_gpt workdir. Params only: optimizer state fresh,
        # masks from the method's init on them. Ignored once the workdir has a checkpoint.
        init_from="",
    ))

    c.sparsity = ml_collections.ConfigDict(dict(
        method="dense",          # dense | static | gmp | set | rigl | mst (sparse_gpt/methods)
        density=1.0,             # target fraction of non-zero weights in sparse layers, (0, 1]
        distribution="uniform",  # uniform | erk | explicit: how density is spread over layers
        explicit_densities="",   # "pattern=density,..." used when distribution=explicit;
                                 # unmatched sparse layers get `density`
        structure="unstructured",  # unstructured | block | nm
        block_size=128,          # block edge for structure=block (square blocks; must divide
                                 # every sparse kernel dim)
        block_balance="column",  # structure=block: column (same live blocks in every output
                                 # block column, needed by model.matmul=block_sparse) | none
        nm_n=2,                  # N of N:M structure (groups of M along the input axis);
        nm_m=4,                  # with structure=nm, density must equal nm_n / nm_m
        sparse_layers="attn/qkv,attn/out,mlp/fc,mlp/proj",  # path patterns of sparse kernels
        init="random",           # how static/SET/RigL pick the first mask: random | magnitude
        update_every=100,        # steps between topology updates (GMP, SET, RigL)
        drop_fraction=0.3,       # initial fraction of live weights dropped/regrown per update
        drop_fraction_schedule="cosine",  # cosine (decays to 0 at update_end) | constant
        update_start=0,          # first step of mask updates / pruning
        update_end=-1,           # last step (-1: 75% of training, as in RigL)
        prune_scope="layer",     # gmp only: layer (each matrix to its density) | global
        gmp_power=3.0,           # exponent of GMP's density schedule (3: Zhu & Gupta cubic)
        grow_init="zeros",       # value of regrown weights (only zeros is implemented)
        grow_balance="matrix",   # set/rigl, unstructured: matrix (each matrix regrows what it
                                 # dropped) | neuron (each hidden unit - attention head dim,
                                 # MLP channel - regrows its own dropped inputs and outputs)
        grow_grad_steps=1,       # rigl/mst: growth scores by |sum of the dense gradients|
                                 # of this many steps ending at each update (1: its own)
        # method=mst (sparse_gpt/sparsity/methods/mst.py): dense -> `density` (cubic warm-up over
        # [update_start, mst_warmup_end)), ultra-sparse evolution until mst_ultra_end, then
        # restoration to mst_final_density at update_end. -1: 1/4 and 3/4 of the update window.
        mst_warmup_end=-1,
        mst_ultra_end=-1,
        mst_final_density=0.25,  # density restoration ends at (below `density`: no restoration)
        mst_random_grow_fraction=0.25,  # share of grown weights picked at random (rest: |grad|)
        mst_restore_power=1.0,   # restoration density curve exponent (1: linear)
        # method=static: after this many steps the masks are lifted to all ones and training
        # continues dense (sparse-to-dense; the model leaves the block-sparse kernel). -1: off.
        # The family sparse_gpt/configs/sparse_pretrain.py sets it from a fraction.
        dense_finetune_start=-1,
    ))

    # Hybrid sparse attention (sparse_gpt/model/attention.py, MST): the pattern replaces dense
    # causal attention on training steps [sparse_start, sparse_end); evaluation stays dense.
    c.attention = ml_collections.ConfigDict(dict(
        pattern="local_strided",  # local | strided | local_strided (Sparse Transformer) | fixed
        window=128,              # local band: the last `window` tokens
        stride=128,              # strided: every `stride`-th token; fixed: block length
        summary=8,               # fixed: summary columns at the end of each block
        block_size=64,           # kernel block (power of two in [16, 256] dividing seq_len)
        sparse_start=0,          # first sparse step
        sparse_end=0,            # first dense step after the window (-1: num_steps; 0: off)
        impl="block_sparse",     # block_sparse (skips empty blocks) | masked (dense oracle)
        backend="auto",          # auto | xla | pallas_gpu | reference
    ))

    # SAT (sparse_gpt/sparsity/sat.py): per step and layer, omit this fraction of attention heads and
    # MLP channels (no compute, zero gradient), chosen by importance; for continual
    # pretraining / fine-tuning from train.init_from. Evaluation stays dense.
    c.sat = ml_collections.ConfigDict(dict(
        omission_rate=0.0,       # fraction of units omitted per layer and step (0: off)
        targets="heads,mlp",     # which units: heads, mlp, or both
        metric="magnitude",      # uniform | magnitude | wanda | max_inner_product
        selection="topk",        # topk | sample (in proportion to importance)
        schedule="ladder",       # ladder (constant, then stairs down to dense) | constant
        ladder_start=0.5,        # ladder: fraction of num_steps at the first stair down
        ladder_stairs=2,         # ladder: stairs from omission_rate to 0 (the last is dense)
        probe_tokens=256,        # max_inner_product: tokens the score is computed on
    ))

    # Device mesh (sparse_gpt/parallel/sharding.py) and pipeline (sparse_gpt/parallel/pipeline.py). The product
    # of the four sizes is the device count; e.g. 8 devices as 2 data x 4 stages:
    #   python train.py --config.mesh.stage=4 --config.mesh.data=2
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                 # batch split; -1: all devices not used by the other axes
        fsdp=1,                  # batch split + params split along `embed` (ZeRO-3 style)
        tensor=1,                # Megatron-style split of heads / MLP hidden / vocabulary
        stage=1,                 # pipeline stages over the stacked layers (>1: pipelined)
        num_microbatches=0,      # pipeline microbatches per step; 0 -> one per stage
        schedule="gpipe",        # gpipe | circular (bubble (S-1)/(R*M+S-1), R repeats)
        circular_repeats=1,      # circular only: layer chunks per stage, R
        # Logical axis -> mesh axes ("a+b" splits over both; "name=" keeps it whole).
        rules=("batch=data+fsdp,layers=stage,embed=fsdp,vocab=tensor,qkv=tensor,"
               "heads=tensor,mlp=tensor"),
    ))
    return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """Returns the config of a named preset.

    Args:
      preset: one of ``PRESETS``.

    Returns:
      A locked ``ConfigDict`` (unknown keys cannot be added by overrides).

    Raises:
      ValueError: the preset is unknown.
    """
    preset = (preset or "tiny").strip()
    if preset not in _SHAPES:
        raise ValueError(
            f"Unknown preset {preset!r}. Choose one of {', '.join(PRESETS)}, "
            f"e.g. --config sparse_gpt/config.py:tiny")
    c = base_config()
    n_layers, d_model, n_heads, max_len = _SHAPES[preset]
    c.model.update(n_layers=n_layers, d_model=d_model, n_heads=n_heads, max_len=max_len)
    c.data.seq_len = max_len
    if preset == "tiny":
        # Byte-level on the bundled corpus: a CPU run of a few minutes.
        c.model.vocab_size = 256 + 8   # 256 bytes + end-of-text, padded to a multiple of 8
        c.data.tokenizer = "byte"
        c.data.seq_len = 128
        c.train.update(batch_size=16, num_steps=600, lr=3e-3, warmup_steps=100,
                       weight_decay=0.1, log_every=25, eval_every=250, eval_batches=8,
                       checkpoint_every=250)
        c.sparsity.block_size = 32
        c.sparsity.update_every = 50
        c.model.scan_unroll = 0        # 4 small layers: unrolled is 1.25x faster on CPU
    else:
        c.data.tokenizer = "gpt2"
        c.model.dtype = "bfloat16"
    if preset in ("gpt-1.3b", "gpt-13b"):
        c.model.remat = True
        c.train.update(lr=2e-4 if preset == "gpt-1.3b" else 1e-4, batch_size=512,
                       warmup_steps=2000, num_steps=100_000)
    c.preset = preset
    c.lock()
    return c
