"""Where a token's time goes outside the LM forward and the search; prints JSON.

    python benchmarks/bench_hot_path.py --out hot_path.json        # ~1 minute on 2 cores
    python benchmarks/bench_hot_path.py --device cuda              # on a GPU

A random GPT-2 of the ``small`` preset's shape (4 x 256, vocab 16,384, context 256) scores
random tokens in the evaluation's windows; the datastore is random keys searched exactly in
torch. Two passes are timed, a kNN-LM pass (fixed weight) and a gated one (an ``mlp`` gate at
retrieval rate 0.5 with its learned weight), and inside them each part is timed where it runs
(wrapped, synchronized on a GPU): the LM forward, the gate's statistics (``lm_stats``), the
gate, the search, p_knn, the mixing; ``other`` is the pass less all of these (windows, host
copies, masking, Python). Figures are microseconds per scored token, the fastest of
``--repeats`` passes, so a shared machine's noise shows in the totals, not in the parts.
``lm_stats_only`` times ``lm_stats`` alone (given the logsumexp, as the pass gives it, where
it takes one) against the previous formula (an (n, V) copy of the
scored rows, a second logsumexp, three (n, V) temporaries) on one batch's logits.

Run it on two checkouts (``PYTHONPATH=<src>``) to compare before and after.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import numpy as np
import torch


def old_lm_stats(logits: torch.Tensor) -> torch.Tensor:
    """The formula before the one-pass version, kept here as the comparison's baseline."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_p = logits - lse
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.stack([entropy, log_p.max(-1).values], dim=-1)


def make_model(vocab: int, hidden: int, layers: int, ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=hidden, n_layer=layers,
                     n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def make_retriever(n_keys: int, dim: int, vocab: int, k: int, device: torch.device):
    """A Retriever over random keys (no datastore folder): the real search, p_knn and mixing."""
    from knnlm.retrieval.retriever import KnnSettings, Retriever
    from knnlm.retrieval.search.exact import TorchExactSearch

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n_keys, dim)).astype(np.float32)
    values = rng.integers(0, vocab, n_keys).astype(np.int32)
    r = Retriever.__new__(Retriever)
    r.knn, r.counts, r.vocab_size, r.key_type = KnnSettings(k=k), None, vocab, "ffn_input"
    r.backend = TorchExactSearch(keys, values, "l2", device=device, recompute=False)
    return r


def make_gate(dim: int, stream):
    from knnlm.retrieval.gate import Gate, GateMLP, score_quantiles

    torch.manual_seed(1)
    g = Gate("mlp", {}, np.zeros(1), GateMLP(dim + 2).eval(), torch.zeros(dim + 2),
             torch.ones(dim + 2))  # fmt: skip
    b = next(iter(stream()))
    g.quantiles = score_quantiles(g.scores(b.keys.float(), b.lm_stats))
    return g


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class Parts:
    """Seconds spent inside named functions, wrapped in place (synchronized on a GPU)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed_fn(*a, **kw):
            self.sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            return out

        setattr(owner, attr, timed_fn)


def one_pass(parts: Parts, fn) -> tuple[float, dict[str, float]]:
    parts.seconds = {}
    parts.sync()
    t = time.perf_counter()
    fn()
    parts.sync()
    return time.perf_counter() - t, dict(parts.seconds)


def best_pass(parts: Parts, fn, repeats: int) -> tuple[float, dict[str, float]]:
    return min((one_pass(parts, fn) for _ in range(repeats)), key=lambda r: r[0])


def run(args: argparse.Namespace) -> dict:
    from knnlm import forward_pass, token_scores
    from knnlm.retrieval.gate import Gate
    from knnlm.retrieval.retriever import MixSettings, Retriever

    device = torch.device(args.device)
    model = make_model(args.vocab, args.hidden, args.layers, args.context).to(device)
    ids = np.random.default_rng(2).integers(0, args.vocab, args.tokens + 1)

    def stream(stats: bool = False):
        return forward_pass.score_stream(
            model, ids, args.context, args.context // 2, batch_size=args.batch,
            key_type="ffn_input", want_stats=stats, progress=False,
        )  # fmt: skip

    n = sum(len(b.targets) for b in stream())
    retriever = make_retriever(args.keys, args.hidden, args.vocab, args.k, device)
    gate = make_gate(args.hidden, lambda: stream(True))
    parts = Parts(device)
    parts.wrap(model, "forward", "forward")
    parts.wrap(forward_pass, "lm_stats", "lm_stats")
    parts.wrap(Retriever, "search", "search")
    parts.wrap(Retriever, "target_log_prob", "p_knn")
    parts.wrap(Gate, "scores", "gate")
    parts.wrap(token_scores, "combine", "mix")

    def knnlm():
        for _ in token_scores.score_tokens(stream(), retriever=retriever):
            pass

    mix = MixSettings(gate=gate, retrieval_rate=0.5, gate_weight="learned")

    def gated():
        for _ in token_scores.score_tokens(stream(True), retriever=retriever, gate=gate,
                                           mix=mix):  # fmt: skip
            pass

    us = 1e6 / n
    out = {}
    for name, fn in (("knnlm", knnlm), ("gated", gated)):
        total, sec = best_pass(parts, fn, args.repeats)
        row = {key: v * us for key, v in sorted(sec.items())}
        row["other"] = (total - sum(sec.values())) * us
        row["total"] = total * us
        row["outside_lm_and_search"] = row["total"] - row["forward"] - row["search"]
        out[name] = row
    logits = torch.randn(args.batch * args.context // 2, args.vocab, device=device) * 3
    lse, rows = torch.logsumexp(logits, -1), torch.arange(len(logits), device=device)
    if "lse" in inspect.signature(forward_pass.lm_stats).parameters:  # as the pass calls it
        t_new = timed(
            lambda: (forward_pass.lm_stats(logits, lse, rows), parts.sync()), args.repeats
        )
    else:
        t_new = timed(lambda: (forward_pass.lm_stats(logits), parts.sync()), args.repeats)
    t_old = timed(lambda: (old_lm_stats(logits), parts.sync()), args.repeats)
    return {
        "settings": vars(args)
        | {
            "scored_tokens": n,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),  # a shared machine shows here
        },  # fmt: skip
        "per_token_us": out,
        "lm_stats_only": {
            "rows": logits.shape[0],
            "vocab": args.vocab,
            "current_us_per_row": t_new * 1e6 / logits.shape[0],
            "previous_formula_us_per_row": t_old * 1e6 / logits.shape[0],
        },  # fmt: skip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
