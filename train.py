"""Trains a (sparse) GPT. With no arguments: a small sparse GPT on the bundled corpus, on CPU.

    python train.py        # sparse_pretrain.py:tiny,75 -> runs/sparse_pretrain-tiny-75-static
    python train.py --config sparse_gpt/config.py:tiny              # the dense tiny preset
    python train.py --config sparse_gpt/config.py:gpt2-small --workdir runs/small
    python train.py --config sparse_gpt/config.py:tiny --config.sparsity.method=rigl \
        --config.sparsity.density=0.25

The default is the SambaNova recipe (sparse_gpt/configs/sparse_pretrain.py) at the `tiny`
shape: static 75% block-sparse attention and MLP projections through the block-sparse kernels.

Re-running the same command resumes from the newest checkpoint in --workdir. One run at a
time may use a workdir (a second is refused, naming the first's host and PID). SIGTERM or
Ctrl-C stops after the current step with a checkpoint of it and exits with status 75
(run the command again to resume); a second one exits at once, without a checkpoint.

Parallelism is the `mesh` section (sparse_gpt/parallel/sharding.py, sparse_gpt/parallel/pipeline.py), e.g. on 8
fake CPU devices, 2-way data parallel x 4 pipeline stages:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python train.py --config.mesh.stage=4 --config.mesh.data=2
    python train.py --config.mesh.stage=4 --config.mesh.schedule=circular \
        --config.mesh.circular_repeats=2 --config.model.n_layers=8 --config.mesh.num_microbatches=8

Multi-host: set SPARSE_GPT_DISTRIBUTED=1 (or JAX_COORDINATOR_ADDRESS) to start
jax.distributed on every process; the default is a single process.
"""

import os
import signal
import sys

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_gpt", "configs",
                       "sparse_pretrain.py") + ":tiny,75"


def main(argv):
    # Ctrl-C before training ends the process quietly; during training the trainer turns the
    # first one into a clean stop and gives this default back for the second.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from sparse_gpt import cli
    try:
        config, args = cli.parse_args(argv, description=__doc__.splitlines()[0],
                                      default_config=DEFAULT)
    except ValueError as e:  # bad preset, path or override: one clear line, no traceback
        sys.exit(f"error: {e}")
    import jax
    from sparse_gpt.parallel import sharding
    sharding.maybe_initialize_distributed()  # before anything asks for devices
    # Re-running a command (e.g. to resume) reuses the compiled steps of the previous run.
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "SPARSE_GPT_JAX_CACHE", os.path.expanduser("~/.cache/sparse_gpt/jax")))
    from sparse_gpt.training import checkpoint
    from sparse_gpt.training import trainer
    from sparse_gpt.training import workdir as workdir_lib
    workdir = args.workdir or os.path.join(
        "runs", f"{config.get('preset', 'custom')}-{config.sparsity.method}")
    try:
        result = trainer.train(config, workdir)
    except workdir_lib.Stopped as e:   # SIGTERM / Ctrl-C: checkpoint written, resumable
        print(e, file=sys.stderr, flush=True)
        sys.exit(workdir_lib.STOPPED_EXIT_CODE)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError,
            workdir_lib.WorkdirInUseError, trainer.NonFiniteLossError) as e:
        # Bad input and stopped runs explain themselves; set SPARSE_GPT_TRACEBACK=1 for more.
        if os.environ.get("SPARSE_GPT_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    val = result.get("val") or {}
    if result.get("start_step") == result.get("step"):
        print(f"already finished at step {result.get('step')} (train.num_steps="
              f"{config.train.num_steps}); raise --config.train.num_steps to train on.")
    print(f"done: step {result.get('step')} train loss {result.get('loss', float('nan')):.4f} "
          f"val loss {val.get('loss', float('nan')):.4f} "
          f"bits/byte {val.get('bits_per_byte', float('nan')):.3f} -> {workdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
