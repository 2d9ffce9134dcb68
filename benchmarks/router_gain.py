"""How predictable the router's target is: the per-token gain of attention over the linear mode on held-out text.

    PYTHONPATH=src python benchmarks/router_gain.py runs/router-tg --windows 64

Δ_t = nll_linear(t) − nll_attention(t) of the frozen model (`oryx.routing.training.gains`, what the regression router
is fitted to) on `--windows` windows of `--data`. Printed: Δ's mean and spread, its mean by position and for tokens
seen earlier in the window (a copy opportunity), the lag-1 correlation of consecutive tokens' and consecutive chunks'
gains, the spread of chunk means beside what independent noise would give, and the mean gain of the top 10 % of
tokens (the non-causal oracle's pick) beside a random 10 %. If Δ has no structure that the causal signals see, no
router can reach the oracle, whatever its features.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import torch

from oryx.checkpoint import CheckpointError, load_pretrained
from oryx.data import DataError, load_tokens
from oryx.eval.perplexity import window_batches
from oryx.routing.training import gains

CHUNK = 32
POSITION_BINS = (0, 32, 128, 256, 512, 1024, 2048)  # lower edges; the last bin ends at T


def seen_before(ids: np.ndarray) -> np.ndarray:
    """[n, T] bool: token t of each row occurred at an earlier position of that row."""
    out = np.zeros(ids.shape, bool)
    for b, row in enumerate(ids):
        seen: set[int] = set()
        for t, token in enumerate(row.tolist()):
            out[b, t] = token in seen
            seen.add(token)
    return out


def lag_correlation(x: np.ndarray) -> float:
    """Correlation of each column of [n, m] `x` with the next one, over all rows."""
    return float(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1])


def report(delta: np.ndarray, ids: np.ndarray) -> list[str]:
    """The lines the module docstring lists, for gains `delta` [n, T] of windows `ids` [n, T]."""
    n, T = delta.shape
    positions = np.broadcast_to(np.arange(T), delta.shape)
    seen = seen_before(ids)
    lines = [
        f"{n} windows × {T} tokens: mean gain {delta.mean():+.4f} nats, std {delta.std():.3f}, "
        f"gain > 0 at {(delta > 0).mean():.1%} of the tokens"
    ]
    for lo, hi in itertools.pairwise([*(e for e in POSITION_BINS if e < T), T]):
        inside = (positions >= lo) & (positions < hi)
        lines.append(f"  positions {lo:4d}-{hi - 1:4d}: mean gain {delta[inside].mean():+.4f}")
    lines.append(
        f"  token seen earlier in the window ({seen.mean():.0%} of the tokens): mean gain {delta[seen].mean():+.4f}; "
        f"unseen: {delta[~seen].mean():+.4f}; correlation with the gain "
        f"{np.corrcoef(delta.ravel(), seen.ravel())[0, 1]:+.3f}"
    )
    lines.append(f"  correlation of consecutive tokens' gains {lag_correlation(delta):+.3f}")
    if T >= 2 * CHUNK:
        chunks = delta[:, : T // CHUNK * CHUNK].reshape(n, T // CHUNK, CHUNK).mean(-1)
        lines.append(
            f"  {CHUNK}-token chunk means: std {chunks.std():.4f} "
            f"(independent noise: {delta.std() / np.sqrt(CHUNK):.4f}), "
            f"correlation of consecutive chunks {lag_correlation(chunks):+.3f}"
        )
    top = np.sort(delta.ravel())[-max(1, delta.size // 10) :]
    lines.append(
        f"  top 10 % of the tokens by their own gain (the oracle): mean {top.mean():+.3f}; "
        f"a random 10 %: {delta.mean():+.4f}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an Oryx run or checkpoint folder")
    parser.add_argument("--data", default="prose:validation", help="held-out text (default: prose:validation)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--windows", type=int, default=64, help="windows (default: 64)")
    args = parser.parse_args(argv)
    try:
        if args.seq_len < 2 or args.windows < 1:
            raise ValueError(f"--seq-len must be ≥ 2 and --windows ≥ 1, got {args.seq_len} and {args.windows}")
        model, tokenizer, folder = load_pretrained(args.checkpoint, torch.device("cpu"))
        if not model.config.is_oryx:
            raise ValueError(f"{folder} holds a {model.config.variant!r} baseline, which has one mode: no gain")
        tokens = load_tokens(args.data, tokenizer)
    except (ValueError, FileNotFoundError, CheckpointError, DataError) as err:
        print(f"router_gain.py: error: {err}", file=sys.stderr)
        return 2
    deltas, rows = [], []
    for ids, labels in window_batches(tokens, args.seq_len, args.windows, 8):
        deltas.append(gains(model, ids, labels)[0].double())
        rows.append(ids)
    print(f"{folder} on {args.data}:")
    print("\n".join(report(torch.cat(deltas).numpy(), torch.cat(rows).numpy())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
