"""The run plan: the config checked once, across sections, before any work starts.

Every cross-section check lives here, each message naming the key to fix and how.
"""

from __future__ import annotations

import jax
import ml_collections

from sparse_gpt.parallel import pipeline, sharding


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the constraints the config sections cannot check alone.

    Raises:
      ValueError: the first problem found, naming the key and the fix.
    """
    if config.data.seq_len > config.model.max_len and not config.model.use_rope:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds the model context "
            f"model.max_len={config.model.max_len}; lower --config.data.seq_len or raise "
            "--config.model.max_len.")
    _check_train(config.train)
    sizes = sharding.mesh_shape(config.mesh, jax.device_count())
    sharding.parse_rules(config.mesh.rules)
    if sizes["stage"] > 1:
        pipeline.PipelineConfig.from_config(config.mesh, sizes["stage"]).validate(
            config.model.n_layers, config.train.batch_size)


def _check_train(t: ml_collections.ConfigDict) -> None:
    """Values of ``config.train``."""
    for key in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every"):
        if t[key] <= 0:
            raise ValueError(f"train.{key}={t[key]} must be positive.")
