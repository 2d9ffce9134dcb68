"""The budget rule of the adaptive schedules, the state it carries between forwards, and its threshold calibration.

A budgeted schedule decides per *unit*: one token (`chunk` = 1) or a chunk of `chunk` absolute positions. A unit
that starts at position p is attention iff

    its score ≥ τ   and   attention tokens so far + chunk ≤ ceil(budget · (p + chunk)) + chunk,

so at every prefix 0 … t at most ceil(budget · (t + 1)) + one unit of tokens are in attention, and a unit's mode
depends only on what came before it (a global top-k would let it depend on later tokens). A unit's score is either
the score at its first position (`own`: a token's own router score, a random draw, the entropy of the position
before) or the mean score of the chunk before it (`previous`: the router's chunk units, whose first chunk is
linear). The threshold τ(budget) is chosen on calibration rows so that the realised fraction there is close to the
budget (`calibrate_threshold`). A budget of 0 puts nothing in attention.

Positions are the rows' real-token positions (padding excluded), and the counts continue across forwards through a
`RoutingState` in the model's cache, so a prefill followed by decoding takes the modes of one full forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from oryx.variants import ATTN, LINEAR

OWN, PREVIOUS = "own", "previous"  # where a unit's score comes from (see the module docstring)


@dataclass
class RoutingState:
    """Per row, what the budget rule carries from one forward to the next (`OryxCache.routing`).

    attention [B]: attention-mode tokens so far; unit_mode [B]: the mode of the unit in progress; chunk_sum,
    chunk_count [B]: the scores of the chunk in progress (`previous` units); next_score [B]: the score of the next
    position when it is known one forward early (the entropy schedule's), −inf when none; seen_ids [B, V] bool: the
    token ids each row has read so far (a seen-before router's, `oryx.routing.router.seen_before`), None until one
    needs it.
    """

    attention: np.ndarray
    unit_mode: np.ndarray
    chunk_sum: np.ndarray
    chunk_count: np.ndarray
    next_score: np.ndarray
    seen_ids: torch.Tensor | None = None

    @classmethod
    def new(cls, batch: int) -> RoutingState:
        return cls(
            attention=np.zeros(batch, np.int64),
            unit_mode=np.full(batch, LINEAR, np.int64),
            chunk_sum=np.zeros(batch, np.float64),
            chunk_count=np.zeros(batch, np.int64),
            next_score=np.full(batch, -math.inf),
        )

    def reorder(self, rows: np.ndarray) -> None:
        """Select rows (beam search)."""
        for name in ("attention", "unit_mode", "chunk_sum", "chunk_count", "next_score"):
            setattr(self, name, getattr(self, name)[rows])
        if self.seen_ids is not None:
            self.seen_ids = self.seen_ids[torch.as_tensor(rows, device=self.seen_ids.device)]


def budget_cap(budget: float, end: int, chunk: int) -> int:
    """The most attention tokens a unit ending at position `end` (exclusive) may bring the count to."""
    return math.ceil(budget * end - 1e-9) + chunk


def decide(
    scores: np.ndarray,
    positions: np.ndarray,
    real: np.ndarray,
    state: RoutingState,
    *,
    threshold: float,
    budget: float,
    chunk: int,
    score_from: str = OWN,
) -> np.ndarray:
    """The budget rule over one forward's tokens; advances `state` in place.

    Args:
        scores: [B, T] float, each token's score (`own` units read it at their first position, `previous` units
            average it over the chunk before).
        positions: [B, T] int, each token's real-token position (0 for the first real token of a sequence).
        real: [B, T] bool, False at padding (never attention, not counted).
        state: the rows' counts so far (`RoutingState.new(B)` for a fresh sequence).
        threshold: τ; a unit scoring below it is linear.
        budget: in [0, 1].
        chunk: positions per unit (1 = token routing).
        score_from: `OWN` or `PREVIOUS`.

    Returns:
        modes [B, T] int64 (`oryx.ATTN` / `oryx.LINEAR`).
    """
    B, T = scores.shape
    out = np.full((B, T), LINEAR, np.int64)
    from_previous = score_from == PREVIOUS
    for b in range(B):
        count, mode = int(state.attention[b]), int(state.unit_mode[b])
        total, seen = float(state.chunk_sum[b]), int(state.chunk_count[b])
        row_scores, row_positions, row_real = scores[b].tolist(), positions[b].tolist(), real[b].tolist()
        for t in range(T):
            if not row_real[t]:
                continue
            p = row_positions[t]
            if p % chunk == 0:  # a new unit: decide its mode
                if from_previous:
                    score, total, seen = (total / seen if seen else -math.inf), 0.0, 0
                else:
                    score = row_scores[t]
                fits = budget > 0 and count + chunk <= budget_cap(budget, p + chunk, chunk)
                mode = ATTN if fits and score >= threshold else LINEAR
            if from_previous:
                total, seen = total + row_scores[t], seen + 1
            if mode == ATTN:
                count += 1
                out[b, t] = ATTN
        state.attention[b], state.unit_mode[b] = count, mode
        state.chunk_sum[b], state.chunk_count[b] = total, seen
    return out


def realised_fraction(
    rows: Sequence[np.ndarray], threshold: float, budget: float, chunk: int, score_from: str = OWN
) -> float:
    """Fraction of the tokens of `rows` (1-D score arrays, each a sequence from position 0) that the rule puts in
    attention with this threshold."""
    attention = total = 0
    for row in rows:
        modes = decide(
            row[None, :],
            np.arange(len(row))[None, :],
            np.ones((1, len(row)), bool),
            RoutingState.new(1),
            threshold=threshold,
            budget=budget,
            chunk=chunk,
            score_from=score_from,
        )
        attention, total = attention + int((modes == ATTN).sum()), total + len(row)
    return attention / total if total else math.nan


def calibrate_threshold(
    rows: Sequence[np.ndarray], budget: float, chunk: int, score_from: str = OWN, candidates: int = 512
) -> float:
    """The threshold τ whose realised fraction on `rows` (1-D score arrays of sequences from position 0) is closest
    to `budget` under the rule; +inf for budget 0, −inf for budget 1.

    The realised fraction falls as τ rises (a lower threshold only adds candidates, and a unit let in earlier never
    lowers a later count), so τ is found by bisection over the rows' score quantiles (`candidates` of them).
    """
    if budget <= 0:
        return math.inf
    if budget >= 1:
        return -math.inf
    scores = np.concatenate([np.asarray(r, np.float64) for r in rows])
    levels = np.unique(np.quantile(scores[np.isfinite(scores)], np.linspace(0.0, 1.0, candidates)))
    low, high = 0, len(levels) - 1  # realised(levels[low]) ≥ realised(levels[high])
    fraction = {}

    def realised(i: int) -> float:
        if i not in fraction:
            fraction[i] = realised_fraction(rows, float(levels[i]), budget, chunk, score_from)
        return fraction[i]

    while high - low > 1:
        middle = (low + high) // 2
        if realised(middle) > budget:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda i: abs(realised(i) - budget))
    return float(levels[best])


def calibration_rows(scores: torch.Tensor) -> list[np.ndarray]:
    """The score rows of a [n, T] tensor with NaN after each row's end (how a router stores them), as 1-D arrays."""
    rows = scores.detach().double().cpu().numpy()
    return [row[~np.isnan(row)] for row in rows]
