"""Training a router with the language model frozen: by regression on measured gains (the default), or straight
through the model's per-token select.

Data are batches of `(input_ids [b, T], labels [b, T])` with *aligned* labels: `labels[:, t]` is the target of the
prediction made at position t, −100 where nothing is predicted (MQAR's non-query positions).

**Regression** (`train_router`). Per batch, two no-grad forwards of the frozen model, all-attention and all-linear,
give Δ_t = nll_linear(t) − nll_attention(t) (0 where nothing is predicted), and the all-linear forward also yields
the router's layer-0 features (which no mode changes; with `seen_before`, the default, also each token's
seen-before bit, `oryx.routing.router.seen_before`). The head is fitted to Δ with a Huber loss on standardised
features and targets; a tenth of the tokens is held out to report how well it ranks.

**Straight-through** (`train_router_straight_through`). The router decides each batch's modes with the batch's
(1 − budget) score quantile as threshold, and every layer outputs m·o_attn + (1 − m)·o_linear with
m = hard + p − stop_gradient(p), p = sigmoid(s − τ): the forward is the hard selection, the gradient reaches the
scores through the select. The loss is the next-token loss plus `penalty` · (mean p − budget)². The language model
stays frozen unless `joint` (then it trains too, and its weights change).

Either way the router keeps the scores of calibration windows, from which `Router.threshold` finds τ(budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oryx.losses import IGNORE_INDEX, token_losses
from oryx.routing.router import Router, RouterConfig, seen_before
from oryx.variants import ATTN, LINEAR

Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["RouterTraining", "gains", "train_router", "train_router_straight_through"]


@dataclass(frozen=True)
class RouterTraining:
    """Settings of either training method.

    steps: optimizer steps; lr: AdamW's learning rate; width: the head's hidden width; batch_tokens: token rows per
    regression step; huber_delta: in standard deviations of Δ; calibration_rows: windows whose scores calibrate the
    thresholds; seen_before: whether the router reads the seen-before bits; budget, penalty, joint, lm_lr:
    straight-through only (the training budget, the weight of the budget penalty, whether the language model trains
    too, and its learning rate); seed: of the minibatches and the init.
    """

    steps: int = 500
    lr: float = 3e-3
    width: int = 32
    batch_tokens: int = 4096
    huber_delta: float = 1.0
    calibration_rows: int = 64
    seen_before: bool = True
    budget: float = 0.1
    penalty: float = 1.0
    joint: bool = False
    lm_lr: float = 3e-4
    seed: int = 0


class FeatureCapture:
    """A routing decision that decides nothing: it keeps layer 0's router features [B, T, 2D (+ 1)] and leaves the
    modes. Given the forward's `input_ids` [B, T], the features end with their seen-before bits."""

    def __init__(self, input_ids: torch.Tensor | None = None) -> None:
        self.input_ids = input_ids
        self.features: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, o_linear: torch.Tensor, ctx: Any) -> None:
        seen = None if self.input_ids is None else seen_before(self.input_ids, ctx.pad_mask)
        self.features = Router.features(x, o_linear, seen)


@torch.no_grad()
def gains(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, seen: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ [B, T], router features [B, T, 2D + 1], or [B, T, 2D] without `seen`) of one batch:
    Δ_t = nll_linear(t) − nll_attention(t) of the frozen model (0 where the label is −100), from one all-attention
    and one all-linear forward."""
    device = model.device
    ids, labels = input_ids.to(device), labels.to(device)
    capture = FeatureCapture(ids if seen else None)
    linear = torch.full_like(ids, LINEAR)
    hidden = model.model(ids, modes=linear, route=capture).last_hidden_state
    nll_linear = token_losses(model.lm_head(hidden), labels)
    nll_attention = token_losses(model(ids, modes=torch.full_like(ids, ATTN)).logits, labels)
    return nll_linear - nll_attention, capture.features


@torch.no_grad()
def _calibration_scores(router: Router, features: list[torch.Tensor]) -> torch.Tensor:
    """[n, T_max] scores of the rows of `features` (each [b, T, 2D]), NaN after each row's end."""
    rows = [row for part in features for row in router.score_features(part).cpu()]
    out = torch.full((len(rows), max(len(r) for r in rows)), math.nan)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _frozen(model: Any) -> list[torch.nn.Parameter]:
    """The model's parameters that required gradients, now frozen (give them back with `requires_grad_(True)`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    return params


def _rank_report(predicted: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """How well `predicted` ranks held-out tokens by their gain `delta`: the correlation, and the share of the gain
    the top 10 % by prediction capture against the top 10 % by the gain itself."""
    predicted, delta = predicted.double(), delta.double()
    k = max(1, len(delta) // 10)
    best = delta.topk(k).values.sum()
    chosen = delta[predicted.topk(k).indices].sum()
    return {
        "heldout_correlation": float(torch.corrcoef(torch.stack([predicted, delta]))[0, 1]),
        "heldout_top10_gain_share": float(chosen / best) if best > 0 else math.nan,
        "heldout_mean_gain_nats": float(delta.mean()),
    }


def train_router(
    model: Any,
    batches: Iterable[Batch],
    settings: RouterTraining = RouterTraining(),
    log: Callable[[str], None] = print,
) -> Router:
    """Fit a router to the measured gains of `model` on `batches` (regression; see the module docstring). The model
    is only read: its weights stay bit-identical."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    features, deltas = [], []
    for ids, labels in batches:
        delta, feats = gains(model, ids, labels, seen=settings.seen_before)
        features.append(feats.cpu())
        deltas.append(delta.cpu())
    model.train(was_training)
    flat_features = torch.cat([f.flatten(0, 1) for f in features])
    flat_delta = torch.cat([d.flatten() for d in deltas])
    order = torch.randperm(len(flat_delta), generator=generator)
    held_out, fit = order[: len(order) // 10], order[len(order) // 10 :]

    config = RouterConfig(hidden_size=model.config.hidden_size, variant=model.config.variant, width=settings.width,
                          method="regression", seen_before=settings.seen_before)  # fmt: skip
    router = Router(config)
    router.feature_mean = flat_features[fit].mean(0)
    router.feature_std = flat_features[fit].std(0).clamp_min(1e-6)
    router.target_mean = flat_delta[fit].mean()
    router.target_std = flat_delta[fit].std().clamp_min(1e-6)
    standard = (flat_delta - router.target_mean) / router.target_std
    optimizer = torch.optim.AdamW(router.net.parameters(), lr=settings.lr, weight_decay=0.0)
    losses = []
    for step in range(settings.steps):
        rows = fit[torch.randint(len(fit), (min(settings.batch_tokens, len(fit)),), generator=generator)]
        prediction = (router.score_features(flat_features[rows]) - router.target_mean) / router.target_std
        loss = F.huber_loss(prediction, standard[rows], delta=settings.huber_delta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, settings.steps // 5) == 0:
            log(f"router step {step + 1}/{settings.steps}: huber loss {np.mean(losses[-50:]):.4f}")
    router.eval()
    with torch.no_grad():
        report = _rank_report(router.score_features(flat_features[held_out]), flat_delta[held_out])
    router.set_calibration(_calibration_scores(router, _rows(features, settings.calibration_rows)))
    final = float(np.mean(losses[-50:]))
    router.config.trained = {"steps": settings.steps, "tokens": len(flat_delta), "final_loss": final, **report}
    log(
        f"router: held-out correlation with the gain {report['heldout_correlation']:.3f}; its top 10 % capture "
        f"{report['heldout_top10_gain_share']:.1%} of the best possible gain"
    )
    return router


def _rows(features: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first `n` rows of a list of [b, T, F] batches, as [1, T, F] parts."""
    rows = [row[None] for part in features for row in part]
    return rows[:n]


class SoftRoute:
    """The straight-through routing decision of one training forward (see the module docstring); a seen-before
    router needs the forward's `input_ids` [B, T]."""

    def __init__(self, router: Router, budget: float, input_ids: torch.Tensor | None = None) -> None:
        self.router, self.budget, self.input_ids = router, budget, input_ids
        self.probability: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, o_linear: torch.Tensor, ctx: Any) -> None:
        seen = seen_before(self.input_ids, ctx.pad_mask) if self.router.config.seen_before else None
        self.features = Router.features(x, o_linear, seen).detach()
        scores = self.router.score_features(self.features)  # [B, T]
        real = torch.ones_like(scores, dtype=torch.bool) if ctx.pad_mask is None else ctx.pad_mask
        threshold = torch.quantile(scores.detach()[real].float(), 1.0 - self.budget)
        hard = (scores >= threshold) & real
        probability = torch.sigmoid(scores - threshold)
        select = hard.to(scores.dtype) + probability - probability.detach()
        self.probability = probability[real]
        ctx.set_modes(torch.where(hard, ATTN, LINEAR), soft_select=select)


def _cycle(batches: list[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


def train_router_straight_through(
    model: Any,
    batches: list[Batch],
    settings: RouterTraining = RouterTraining(),
    log: Callable[[str], None] = print,
) -> Router:
    """Train a router through the model's select (see the module docstring); `batches` are cycled for
    `settings.steps` steps. With `settings.joint` the model's weights train too (at `settings.lm_lr`)."""
    torch.manual_seed(settings.seed)
    device = model.device
    router = Router(RouterConfig(hidden_size=model.config.hidden_size, variant=model.config.variant,
                                 width=settings.width, method="straight-through",
                                 seen_before=settings.seen_before)).to(device)  # fmt: skip
    with torch.no_grad():  # standardise the features by the first batch's
        ids = batches[0][0].to(device)
        capture = FeatureCapture(ids if settings.seen_before else None)
        model.model(ids, modes=torch.full_like(ids, LINEAR), route=capture)
        flat = capture.features.flatten(0, 1)
        router.feature_mean, router.feature_std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    groups = [{"params": list(router.net.parameters()), "lr": settings.lr}]
    frozen = _frozen(model)
    if settings.joint:
        for p in frozen:
            p.requires_grad_(True)
        groups.append({"params": frozen, "lr": settings.lm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    was_training = model.training
    model.train(settings.joint)
    losses, features = [], []
    try:
        for step, (ids, labels) in zip(range(settings.steps), _cycle(batches), strict=False):
            ids, labels = ids.to(device), labels.to(device)
            route = SoftRoute(router, settings.budget, ids)
            hidden = model.model(ids, route=route).last_hidden_state
            lm_loss = F.cross_entropy(
                model.lm_head(hidden).flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
            )
            loss = lm_loss + settings.penalty * (route.probability.mean() - settings.budget) ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(lm_loss.item())
            if step < len(batches) and len(features) < settings.calibration_rows:
                features.append(route.features.cpu())
            if (step + 1) % max(1, settings.steps // 5) == 0:
                log(f"router step {step + 1}/{settings.steps}: loss at budget {settings.budget:g} "
                    f"{np.mean(losses[-20:]):.4f}")  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    router = router.cpu().eval()
    router.set_calibration(_calibration_scores(router, _rows(features, settings.calibration_rows)))
    router.config.trained = {"steps": settings.steps, "budget": settings.budget, "joint": settings.joint,
                             "final_loss": float(np.mean(losses[-20:]))}  # fmt: skip
    return router
