"""Does "this token id occurred earlier in the row" predict where attention pays on MQAR, better than the router?

    python benchmarks/router_seen_before.py MODEL [--settings 512:128 1024:64] [--rows 64]

MODEL is an MQAR model folder with a router (`oryx eval mqar --save-models`, then `oryx train-router`). For fresh
rows of each setting (a seed apart from the sweep's training and test seeds), it measures the gain of attention
Δ_t = nll_linear(t) − nll_attention(t) (`oryx.routing.training.gains`; 0 where nothing is predicted), the seen-before
bit of every token (`oryx.routing.seen_before`, which routers now read too), and prints how the bit covers the query
tokens and how it and the router's scores correlate with the gain. A diagnostic for the router's features
(benchmarks/RESULTS.md), not a policy of the library.
"""

from __future__ import annotations

import argparse
import re

import torch

from oryx.checkpoint import CheckpointError
from oryx.eval.mqar_run import load_mqar_model
from oryx.eval.tasks.mqar import make_mqar
from oryx.routing import seen_before
from oryx.routing.training import gains

SEED = 12345  # neither the sweep's training seed nor its test seed


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an MQAR model folder with a router")
    parser.add_argument("--settings", nargs="+", default=["512:128", "1024:64"], help="L:K settings")
    parser.add_argument("--rows", type=int, default=64, help="rows per setting")
    args = parser.parse_args()
    settings = [tuple(map(int, s.split(":"))) for s in args.settings if re.fullmatch(r"[1-9]\d*:[1-9]\d*", s)]
    if len(settings) != len(args.settings):
        parser.error(f"--settings must be L:K pairs of positive integers such as 512:128, got {args.settings}")
    try:
        model, config = load_mqar_model(args.model)
    except CheckpointError as err:
        parser.error(str(err))
    if model.router is None:
        parser.error(f"{args.model} has no router: run oryx train-router on it first")
    for length, pairs in settings:
        batch = make_mqar(args.rows, length, pairs, vocab=config.vocab, seed=[SEED, length, pairs])
        delta, features = gains(model, batch.input_ids, batch.labels, seen=model.router.config.seen_before)
        with torch.no_grad():
            scores = model.router.score_features(features)
        seen, query = seen_before(batch.input_ids).float(), batch.labels != -100
        print(
            f"{length}x{pairs}: queries {query.float().mean():.3f} of the tokens, seen-before {seen.mean():.3f}; "
            f"P(query | seen) {query[seen.bool()].float().mean():.3f}, P(seen | query) {seen[query].mean():.3f}; "
            f"corr(gain, seen) {correlation(delta, seen):.3f}, corr(gain, router) {correlation(delta, scores):.3f}"
        )


if __name__ == "__main__":
    main()
