"""Config families: Python files whose ``get_config(arg)`` the CLI loads by path.

    python train.py --config sparse_gpt/configs/sparse_pretrain.py:gpt2-small,87.5

=================  ============================================================================
sparse_pretrain    static block-sparse pretraining through the kernels (SambaNova), every
                   preset, 75% / 87.5% sparse, pipeline stages, optional dense phase at the end
=================  ============================================================================

The base presets and every config key live in ``sparse_gpt/config.py``.
"""
