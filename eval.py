"""Evaluates the newest checkpoint of a run and prints one JSON object.

    python eval.py --workdir runs/tiny-dense
    python eval.py --workdir runs/tiny-dense --prompt "ROMEO:" --num_tokens 200
    python eval.py --workdir runs/tiny-dense --tasks sparse_gpt/tasks/sample_mc.jsonl

Prints validation `loss`, `perplexity`, `bits_per_byte`, the run's `step`, cumulative training
`flops` and mask `density`, with --prompt a continuation (`sample`), and with --tasks the
zero-shot multiple-choice accuracies `tasks: {name: {acc, acc_norm, n}}` (sparse_gpt/evaluation/mc_eval.py).
"""

import argparse
import json
import math
import os
import sys


def _number(kind, low, what):
    """An argparse type: ``kind`` (int/float) at least ``low``, finite."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value
    return parse


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="run folder written by train.py")
    p.add_argument("--step", type=_number(int, 0, ">= 0"), default=None,
                   help="checkpoint step (default: newest)")
    p.add_argument("--eval_batches", type=_number(int, 1, "at least 1"), default=None,
                   help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--prompt", default=None, help="text to continue")
    p.add_argument("--num_tokens", type=_number(int, 0, ">= 0"), default=100,
                   help="tokens generated after --prompt")
    p.add_argument("--temperature", type=_number(float, 0.0, "a finite number >= 0"),
                   default=0.0, help="0: greedy, >0: sampling")
    p.add_argument("--top_k", type=_number(int, 0, ">= 0"), default=0,
                   help="sample among the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tasks", default="", help="comma-separated multiple-choice JSONL files")
    p.add_argument("--task_batch_size", type=_number(int, 1, "at least 1"), default=16,
                   help="sequences per scoring call")
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    from sparse_gpt import flops
    from sparse_gpt.training import checkpoint
    from sparse_gpt.evaluation import mc_eval
    from sparse_gpt.evaluation import sampling
    from sparse_gpt.training import trainer
    tasks = [p.strip() for p in args.tasks.split(",") if p.strip()]
    try:
        mc_eval.load_tasks(tasks)  # a bad task file fails before the model is loaded
        config, data, model, eval_step, state = trainer.load_run(args.workdir, args.step)
        if args.prompt is not None:  # a bad request fails before the evaluation
            prompt = data.tokenizer.encode(args.prompt)
            sampling.check_request(prompt, args.num_tokens, model.cfg.max_len,
                                   temperature=args.temperature, top_k=args.top_k,
                                   vocab_size=data.tokenizer.vocab_size)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        if os.environ.get("SPARSE_GPT_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    n = config.train.eval_batches if args.eval_batches is None else args.eval_batches
    out = trainer.evaluate(eval_step, state, data.val_batches(n), data.bytes_per_token)
    out.update(step=int(state.step), flops=float(state.flops),
               density=float(flops.density(state.masks, model.cfg)))
    if args.prompt is not None:
        tokens = sampling.generate(model, state.params, state.masks, prompt, args.num_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   seed=args.seed, vocab_size=data.tokenizer.vocab_size)
        out["prompt"], out["sample"] = args.prompt, data.tokenizer.decode(tokens)
    if tasks:
        out["tasks"] = mc_eval.evaluate_tasks(model, state.params, state.masks, data.tokenizer,
                                              tasks, args.task_batch_size)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
