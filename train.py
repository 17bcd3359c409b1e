"""Trains a (sparse) GPT. With no arguments: the `tiny` preset on the bundled corpus, on CPU.

    python train.py                                   # tiny preset -> runs/tiny-dense
    python train.py --config sparse_gpt/config.py:gpt2-small --workdir runs/small
    python train.py --config.sparsity.method=rigl --config.sparsity.density=0.25

Re-running the same command resumes from the newest checkpoint in --workdir.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "sparse_gpt", "config.py") + ":tiny",
    "Config file and preset, PATH[:PRESET]; override fields with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (checkpoints, metrics.jsonl, tensorboard/, sample.txt); "
    "default runs/<preset>-<method>.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from sparse_gpt import trainer  # after flag parsing: keeps --help fast
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.get('preset', 'custom')}-{config.sparsity.method}")
    result = trainer.train(config, workdir)
    val = result.get("val") or {}
    print(f"done: step {result.get('step')} train loss {result.get('loss', float('nan')):.4f} "
          f"val loss {val.get('loss', float('nan')):.4f} "
          f"bits/byte {val.get('bits_per_byte', float('nan')):.3f} -> {workdir}")


if __name__ == "__main__":
    app.run(main)
