"""How an adaptive schedule runs inside a forward: its scores, its threshold, and the layer-0 routing decision.

Every adaptive schedule (`oryx.schedule.Adaptive`) becomes a `BudgetRoute`: layer 0's mixer calls it after its linear
branch, it scores the forward's tokens, applies the budget rule (`oryx.routing.budget.decide`, counting on from the
cache's `RoutingState`) and sets the modes for that layer's attention and every later layer. The scores:

    router:   the attached `Router` on layer 0's input and linear output, and which token ids came before (token
              units: a token's own score; chunks: the mean score of the chunk before)
    random:   a uniform draw per unit from a generator seeded by (seed, batch row), the same for a unit however the
              sequence is cut into forwards
    entropy:  position t's score is the next-token entropy at t − 1: of the linear mode, from a look-ahead forward of
              the same tokens in linear mode, for positions inside one forward; of the distribution the model
              produced, for the first position of a forward that continues a cache (the previous forward's last)

`prepare` checks the schedule against the model and returns the route and what to do with the logits afterwards.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from oryx.routing.budget import OWN, PREVIOUS, RoutingState, calibrate_threshold, decide
from oryx.routing.router import seen_before
from oryx.schedule import Adaptive, Entropy, Random, Router
from oryx.variants import LINEAR, variant

Scores = Callable[[torch.Tensor, torch.Tensor, Any], np.ndarray]
RANDOM_CALIBRATION = (64, 1024, 2**31 - 1)  # rows, length and seed of the draws that calibrate random thresholds
ENTROPY_SLICE = 512  # positions per slice of the look-ahead's vocabulary projection


class BudgetRoute:
    """The routing decision of one forward (see the module docstring). After the call, `scores` holds the [B, T]
    scores it decided from."""

    def __init__(
        self, scores: Scores, state: RoutingState, threshold: float, budget: float, chunk: int, score_from: str
    ) -> None:
        self.score, self.state = scores, state
        self.threshold, self.budget, self.chunk, self.score_from = threshold, budget, chunk, score_from
        self.scores: np.ndarray | None = None

    def __call__(self, x: torch.Tensor, o_linear: torch.Tensor, ctx: Any) -> None:
        scores = self.score(x, o_linear, ctx)
        real = np.ones(scores.shape, bool) if ctx.pad_mask is None else ctx.pad_mask.cpu().numpy()
        modes = decide(
            scores,
            ctx.positions.cpu().numpy(),
            real,
            self.state,
            threshold=self.threshold,
            budget=self.budget,
            chunk=self.chunk,
            score_from=self.score_from,
        )
        ctx.set_modes(torch.from_numpy(modes).to(x.device))
        self.scores = scores


def check_schedule(schedule: Adaptive, model: Any) -> None:
    """ValueError unless `model` can run `schedule`: an Oryx model (both modes), with a router for `router:`."""
    config = model.config
    if not config.is_oryx:
        only = "attention" if config.supported_modes == (0,) else "the linear mode"
        raise ValueError(
            f"schedule '{schedule}' chooses between attention and the linear mode per token, but a "
            f"{variant(config.variant).family} model has only {only}; use it with an Oryx model"
        )
    if isinstance(schedule, Router) and getattr(model, "router", None) is None:
        where = getattr(config, "_name_or_path", "") or "this model"
        raise ValueError(
            f"schedule '{schedule}' needs a trained router, and {where} has none: train one with "
            "`oryx train-router RUN_DIR` (it is saved into the run's latest checkpoint), or attach one with "
            "model.attach_router(...)"
        )


@functools.lru_cache(maxsize=64)
def random_threshold(budget: float, chunk: int) -> float:
    """τ of `random:budget=B,chunk=N`: calibrated on uniform draws (`RANDOM_CALIBRATION`), like the router's."""
    rows, length, seed = RANDOM_CALIBRATION
    rng = np.random.default_rng(seed)
    draws = [np.repeat(rng.random(-(-length // chunk)), chunk)[:length] for _ in range(rows)]
    return calibrate_threshold(draws, budget, chunk, OWN)


def random_scores(seed: int, chunk: int) -> Scores:
    """Uniform scores, one draw per (row, unit) from generators seeded by (seed, row)."""

    def scores(x: torch.Tensor, o_linear: torch.Tensor, ctx: Any) -> np.ndarray:
        units = ctx.positions.cpu().numpy() // chunk  # [B, T]
        out = np.empty(units.shape)
        for b, row in enumerate(units):
            out[b] = np.random.default_rng([seed, b]).random(int(row.max()) + 1)[row]
        return out

    return scores


def router_scores(router: torch.nn.Module, input_ids: torch.Tensor | None, state: RoutingState, vocab: int) -> Scores:
    """The router's scores; a seen-before router marks this forward's ids in `state.seen_ids` ([B, vocab])."""

    def scores(x: torch.Tensor, o_linear: torch.Tensor, ctx: Any) -> np.ndarray:
        seen = None
        if router.config.seen_before:
            if state.seen_ids is None:
                state.seen_ids = torch.zeros(len(input_ids), vocab, dtype=torch.bool, device=input_ids.device)
            seen = seen_before(input_ids, ctx.pad_mask, state.seen_ids)
        with torch.no_grad():
            return router.to(x.device)(x, o_linear, seen).double().cpu().numpy()

    return scores


def next_token_entropy(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Entropy [B, T] (nats, float32) of the next-token distributions of final hidden states [B, T, D], projected onto
    the vocabulary a slice of positions at a time."""
    parts = []
    for start in range(0, hidden.shape[1], ENTROPY_SLICE):
        logp = model.lm_head(hidden[:, start : start + ENTROPY_SLICE]).float().log_softmax(-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts, dim=1)


def entropy_scores(
    model: Any,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Any,
    state: RoutingState,
) -> np.ndarray:
    """Scores [B, T] of the entropy schedule for the tokens of one forward (see the module docstring): a look-ahead
    forward in linear mode (on a copy of the cache, when there is one) gives the entropies inside it."""
    B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    scores = np.full((B, T), -math.inf)
    scores[:, 0] = state.next_score
    if T > 1:
        with torch.no_grad():
            hidden = model.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                modes=torch.full((B, T), LINEAR, dtype=torch.long, device=model.device),
                attention_mask=attention_mask,
                cache=None if cache is None or cache.get_seq_length() == 0 else copy.deepcopy(cache),
            ).last_hidden_state
            entropy = next_token_entropy(model, hidden[:, :-1]).double().cpu().numpy()
        if attention_mask is not None:
            real = attention_mask[:, -T:].bool().cpu().numpy()
            entropy = np.where(real[:, :-1], entropy, -math.inf)  # after padding: as at a sequence's start
        scores[:, 1:] = entropy
    return scores


def prepare(
    schedule: Adaptive,
    model: Any,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Any,
) -> tuple[BudgetRoute, Callable[[torch.Tensor], None] | None]:
    """(the route of one forward of `model` under `schedule`, what to call with the forward's logits [B, T', V] or
    None when nothing reads them).

    The budget rule counts on from `cache.routing` (created on the cache's first routed forward); without a cache
    every forward starts a fresh sequence.

    Raises:
        ValueError: `check_schedule`'s errors, or a static cache (CUDA-graph decoding takes fixed schedules only).
    """
    check_schedule(schedule, model)
    B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    state = RoutingState.new(B)
    if cache is not None:
        if cache.is_static:
            raise ValueError(
                f"schedule '{schedule}' is adaptive; decoding from a static cache (cuda_graphs=True) takes fixed "
                "schedules only"
            )
        if cache.routing is None:
            cache.routing = state
        state = cache.routing

    if isinstance(schedule, Router):
        router = model.router
        if router.config.seen_before and input_ids is None:
            raise ValueError(
                f"schedule '{schedule}': this router reads whether each token id occurred earlier in the row, so it "
                "needs input_ids; inputs_embeds do not say which tokens they are"
            )
        threshold = router.threshold(schedule.budget, schedule.chunk)
        score_from = OWN if schedule.chunk == 1 else PREVIOUS
        scores = router_scores(router, input_ids, state, model.config.vocab_size)
        return BudgetRoute(scores, state, threshold, schedule.budget, schedule.chunk, score_from), None
    if isinstance(schedule, Random):
        threshold = random_threshold(schedule.budget, schedule.chunk)
        scores = random_scores(schedule.seed, schedule.chunk)
        return BudgetRoute(scores, state, threshold, schedule.budget, schedule.chunk, OWN), None
    if isinstance(schedule, Entropy):
        lookahead = entropy_scores(model, input_ids, inputs_embeds, attention_mask, cache, state)
        budget = 1.0 if schedule.budget is None else schedule.budget

        def remember(logits: torch.Tensor) -> None:
            # The next position's score: the entropy of the distribution the model just produced.
            logp = logits[:, -1].detach().float().log_softmax(-1)
            state.next_score = -(logp.exp() * logp).sum(-1).double().cpu().numpy()

        route = BudgetRoute(lambda x, o, ctx: lookahead, state, schedule.threshold, budget, 1, OWN)
        return route, remember
    raise TypeError(f"no routing for schedule {schedule!r}")
