"""Training and evaluation throughput of the ``small`` preset on WikiText-2; prints JSON.

    python benchmarks/bench_train_eval.py --quick
    python benchmarks/bench_train_eval.py --model /work/runs/small-wt2 --out foundation.json

- train tokens/s: the toolkit's training loop (``knnlm.lm.train.train``) on a fresh
  ``small``-preset model over WikiText-2 train tokens, timed over ``--train-steps`` optimizer
  steps after ``--warmup-steps`` untimed ones (preset batch size and context).
- eval tokens/s and valid perplexity: ``knnlm.evaluate.evaluate`` of the trained model
  (``--model``, default /work/runs/small-wt2 when it exists; otherwise a random ``small``
  model, marked "random weights") on the valid split, at the model's training context with
  stride = context (every token scored once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    machine_info,
    model_context,
    model_under_test,
    peak_rss_mib,
    prefix_corpus,
    quiet_libraries,
    run_and_emit,
    skip_unless_corpus,
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (30; quick 6)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (3; quick 2)")
    ap.add_argument(
        "--valid-fraction", type=float, default=None, help="prefix of valid (1.0; quick 0.05)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="evaluation batch (windows)")
    args = ap.parse_args()
    args.train_steps = args.train_steps or (6 if args.quick else 30)
    args.warmup_steps = args.warmup_steps or (2 if args.quick else 3)
    args.valid_fraction = args.valid_fraction or (0.05 if args.quick else 1.0)
    return args


def bench_eval(model_dir: str, corpus: Path, args: argparse.Namespace) -> dict:
    from knnlm.evaluate import evaluate
    from knnlm.lm.loading import load_lm

    lm = load_lm(model_dir, device="cpu")
    ctx = model_context(model_dir)
    res = evaluate(
        lm,
        str(corpus),
        "valid",
        context_len=ctx,
        stride=ctx,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    return {
        "context_len": ctx,
        "stride": ctx,
        "batch_size": args.batch_size,
        "tokens": res["tokens"],
        "seconds": res["timing"]["seconds"],
        "tokens_per_s": res["timing"]["tokens_per_s"],
        "valid_perplexity": res["lm"]["perplexity"],
    }


def bench_train(tokenizer, corpus: Path, work: Path, args: argparse.Namespace) -> dict:
    from knnlm.data.corpus import load_tokens
    from knnlm.lm.presets import build_model_from_preset, get_preset
    from knnlm.lm.train import train
    from knnlm.lm.train_config import TrainConfig

    preset = get_preset("small")
    ids = load_tokens(tokenizer, str(corpus), "train")
    model = build_model_from_preset("small", len(tokenizer), tokenizer, seed=args.seed)

    def config(steps: int) -> TrainConfig:
        return TrainConfig(
            lr=preset.lr,
            batch_size=preset.batch_size,
            max_steps=steps,
            warmup_ratio=preset.warmup_ratio,
            weight_decay=preset.weight_decay,
            seed=args.seed,
            context_len=preset.context_len,
            checkpoint_every=None,
        )

    # Warm-up (allocator, kernels) in a first call; the second call continues the same model
    # with a fresh optimizer and is the one timed (its seconds exclude the final save).
    train(model, tokenizer, ids, config(args.warmup_steps), work / "warm", progress=False)
    res = train(model, tokenizer, ids, config(args.train_steps), work / "timed",
                progress=args.progress)  # fmt: skip
    return {
        "preset": "small",
        "context_len": preset.context_len,
        "batch_size": preset.batch_size,
        "precision": "float32",
        "warmup_steps": args.warmup_steps,
        "timed_steps": res.steps,
        "tokens": res.tokens_this_run,
        "seconds": res.seconds,
        "tokens_per_s": res.tokens_per_second,
        "seconds_per_step": res.seconds / max(res.steps, 1),
        "train_tokens_available": int(len(ids)),
        "final_loss": res.final_loss,
    }


def run(args: argparse.Namespace, work: Path) -> dict:
    corpus = skip_unless_corpus(args.corpus, args.out)
    res: dict = {"benchmark": "foundation", "quick": args.quick, "machine": machine_info()}
    model, res["model"] = model_under_test(args.model, corpus, work, args.seed)
    # Enough train text for the steps (with margin); valid cut to --valid-fraction.
    from knnlm.lm.presets import get_preset

    p = get_preset("small")
    need_tokens = 2 * (args.warmup_steps + args.train_steps + 2) * p.batch_size * p.context_len
    train_bytes = (corpus / "train.txt").stat().st_size
    frac = min(1.0, need_tokens * 5 / train_bytes)  # ~4.4 bytes per BPE token on WikiText-2
    sub = work / "corpus"
    prefix_corpus(corpus, sub, {"train": frac, "valid": args.valid_fraction, "test": 0.01})
    res["settings"] = {
        "corpus": str(corpus),
        "valid_fraction": args.valid_fraction,
        "train_fraction_loaded": round(frac, 4),
    }
    res["eval"] = bench_eval(model, sub, args)

    from knnlm.lm.loading import load_tokenizer

    res["train"] = bench_train(load_tokenizer(model), sub, work, args)
    res["summary"] = {
        "train_tokens_per_s": res["train"]["tokens_per_s"],
        "eval_tokens_per_s": res["eval"]["tokens_per_s"],
        "valid_perplexity": res["eval"]["valid_perplexity"],
        "context_len": res["eval"]["context_len"],
        "stride": res["eval"]["stride"],
        "weights": res["model"]["weights"],
        "peak_rss_mib": peak_rss_mib(),
    }
    return res


def main() -> None:
    quiet_libraries()
    run_and_emit("foundation", run, parse_args())


if __name__ == "__main__":
    main()
