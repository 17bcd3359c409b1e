"""Evaluates the newest checkpoint of a run and prints one JSON object.

    python eval.py --workdir runs/tiny-dense
    python eval.py --workdir runs/tiny-dense --prompt "ROMEO:" --num_tokens 200

Prints validation `loss`, `perplexity`, `bits_per_byte`, the run's `step`, cumulative training
`flops` and mask `density`, and with --prompt a continuation (`sample`).
"""

import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by train.py.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_BATCHES = flags.DEFINE_integer("eval_batches", None, "Validation batches (default: the run's).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 100, "Tokens to generate after --prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; >0: sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from sparse_gpt import flops, sampling, trainer
    config, data, model, eval_step, state = trainer.load_run(_WORKDIR.value, _STEP.value)
    n = _BATCHES.value or config.train.eval_batches
    out = trainer.evaluate(eval_step, state, data.val_batches(n), data.bytes_per_token)
    out.update(step=int(state.step), flops=float(state.flops),
               density=float(flops.density(state.masks)))
    if _PROMPT.value is not None:
        tokens = sampling.generate(model, state.params, state.masks,
                                   data.tokenizer.encode(_PROMPT.value), _NUM_TOKENS.value,
                                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                   seed=_SEED.value, vocab_size=data.tokenizer.vocab_size)
        out["prompt"], out["sample"] = _PROMPT.value, data.tokenizer.decode(tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
