"""Quality against the attention budget (`oryx eval budget`): every placement policy at every budget, with the realised
attention fraction and the attention work of each cell.

Policies (the schedule each runs at budget B on sequences of length L):

==============  ==============================================================================================
router          ``router:budget=B`` (token units; needs ``oryx train-router``)
router-chunk    ``router:budget=B,chunk=N`` (a chunk's mode from the mean score of the chunk before)
entropy         ``entropy:threshold=H(B),budget=B``, H(B) calibrated like the router's threshold: on calibration
                windows (never the evaluated ones), from the linear mode's entropies
random          ``random:budget=B`` (token units), random-chunk: ``random:budget=B,chunk=N``
head, tail      the first / the last round(B·L) positions (``spans:attn@0,linear@n``, ``tail:attn=n``)
even            round(B·L) positions in spans of ≤ N, spread evenly over the sequence (``spans:...``)
oracle          ppl only: attention at the top round(B·L) tokens of each window by their measured gain Δ (what
                the router is trained to predict; not causal: an upper bound on what a token router can reach)
queries         MQAR only: the oracle, attention exactly at the K query tokens (fraction K/L); "queries capped":
                the oracle's scores under the causal budget rule at K/L (what the rule alone costs)
==============  ==============================================================================================

Budgets 0 and 1 are the linear and the attention mode, the same for every policy (measured once). Every cell records
what the policy realised: the attention fraction and the query-key pairs attention scored (per head and layer,
`oryx.schedule.attention_scores`), divided by all-attention's pairs on the same inputs: the x axis of the plot of
quality against attention work. That is the ideal cost, which block-sparse kernels approach when attention rows come
in aligned blocks (chunk units); the reference kernel pays a whole block of 128 rows for any row in it.

Tasks: held-out perplexity (`budget_perplexity`), MQAR on a model saved by ``oryx eval mqar --save-models``, its
router from ``oryx train-router MODEL`` (`budget_mqar`; each setting's router threshold and entropy threshold are
calibrated on that setting's training rows, and the router and random also run at the oracle's fraction K/L), and
NIAH / record recall (`budget_retrieval`). `routing_cost` measures what routing adds to a forward.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oryx.eval.inference import ModeRule
from oryx.eval.perplexity import evaluate
from oryx.eval.report import ResultRow, markdown_tables, write_results
from oryx.ops import count_score_elements
from oryx.routing.budget import OWN, RoutingState, calibrate_threshold, decide
from oryx.routing.policies import next_token_entropy
from oryx.routing.training import FeatureCapture
from oryx.schedule import Adaptive, attention_scores, parse
from oryx.variants import ATTN, LINEAR, variant

BUDGETS = (0.0, 0.025, 0.05, 0.1, 0.25, 1.0)
POLICIES = ("router", "router-chunk", "entropy", "random", "random-chunk", "head", "tail", "even", "oracle")
SCHEDULE_POLICIES = tuple(p for p in POLICIES if p != "oracle")  # a schedule each; the oracle is one for ppl only
MQAR_POLICIES = ("router", "entropy", "random", "head", "tail", "even")
Batch = tuple[torch.Tensor, torch.Tensor]
Log = Callable[[str], None]

__all__ = [
    "BUDGETS",
    "POLICIES",
    "SCHEDULE_POLICIES",
    "budget_mqar",
    "budget_perplexity",
    "budget_retrieval",
    "placement",
    "plot_quality_against_work",
    "policy_spec",
    "routing_cost",
    "write_budget_report",
]


def placement(kind: str, budget: float, length: int, span: int) -> str:
    """The fixed schedule `head`, `tail` or `even` of round(budget · length) attention positions in a sequence of
    `length` (even: spans of at most `span` positions, their centres spread evenly)."""
    n = round(budget * length)
    if n == 0:
        return "linear"
    if n >= length:
        return "attn"
    if kind == "tail":
        return f"tail:attn={n}"
    if kind == "head":
        return f"spans:attn@0,linear@{n}"
    count = math.ceil(n / span)
    sizes = [n // count + (i < n % count) for i in range(count)]
    switches, previous_end = [], 0
    for i, size in enumerate(sizes):
        start = min(max(previous_end, round((i + 0.5) * length / count - size / 2)), length - size)
        switches += [("linear", previous_end), ("attn", start)] if start > previous_end else [("attn", start)]
        previous_end = start + size
    if previous_end < length:
        switches.append(("linear", previous_end))
    merged = [item for i, item in enumerate(switches) if i == 0 or item[0] != switches[i - 1][0]]
    if merged[0][1] != 0:
        merged.insert(0, ("linear", 0))
    return "spans:" + ",".join(f"{mode}@{pos}" for mode, pos in merged)


def policy_spec(policy: str, budget: float, length: int, chunk: int, entropy_threshold: float | None = None) -> str:
    """The schedule spec of `policy` at `budget` for sequences of `length` (see the module docstring)."""
    if budget <= 0:
        return "linear"
    if budget >= 1:
        return "attn"
    if policy in ("head", "tail", "even"):
        return placement(policy, budget, length, chunk)
    if policy == "entropy":
        if entropy_threshold is None:
            raise ValueError("the entropy policy needs its calibrated threshold")
        return str(parse(f"entropy:threshold={entropy_threshold},budget={budget}"))
    kind, _, unit = policy.partition("-")
    if kind not in ("router", "random") or unit not in ("", "chunk"):
        raise ValueError(f"unknown budget policy {policy!r}; choose from {', '.join(SCHEDULE_POLICIES)}")
    return f"{kind}:budget={budget}" + (f",chunk={chunk}" if unit else "")


@torch.no_grad()
def entropy_thresholds(model: Any, batches: Sequence[Batch], budgets: Sequence[float]) -> dict[float, float]:
    """H(budget): the entropy threshold whose realised fraction on `batches` is closest to each budget, from the
    linear mode's next-token entropies (position t is scored by the entropy at t − 1)."""
    rows = []
    for ids, _ in batches:
        ids = ids.to(model.device)
        hidden = model.model(ids, modes=torch.full_like(ids, LINEAR)).last_hidden_state
        entropy = next_token_entropy(model, hidden).double().cpu().numpy()
        rows += [np.concatenate([[-math.inf], row[:-1]]) for row in entropy]
    return {b: max(0.0, calibrate_threshold(rows, b, 1, OWN)) for b in budgets if 0 < b < 1}


def _row(
    label: str,
    model: Any,
    protocol: str,
    task: str,
    setting: str,
    order: float,
    metrics: dict[str, float],
    modes: torch.Tensor,
    spec: str,
    n: int,
    full_scores: int,
    policy: str,
    budget: float | None,
) -> ResultRow:
    """A result cell: `metrics` beside the realised fraction (as metric "attention") and the attention work."""
    attention = int((modes == ATTN).sum())
    return ResultRow(
        model=label, family=variant(model.config.variant).family, protocol=protocol, task=task, setting=setting,
        seq_len=order, metrics={**metrics, "attention": attention / modes.numel()}, attention_tokens=attention,
        tokens=modes.numel(), n=n,
        extra={"spec": spec, "policy": policy, "budget": budget, "attention_scores": attention_scores(modes),
               "all_attention_scores": full_scores},
    )  # fmt: skip


def _budget_label(budget: float) -> str:
    return f"{100 * budget:g}%"


def budget_perplexity(
    model: Any,
    tokens: Any,
    seq_len: int,
    calibration: Sequence[Batch],
    *,
    budgets: Sequence[float] = BUDGETS,
    policies: Sequence[str] = POLICIES,
    chunk: int = 32,
    max_tokens: int | None = None,
    batch_size: int = 8,
    label: str = "model",
    log: Log = print,
) -> list[ResultRow]:
    """Held-out perplexity of every policy at every budget (`calibration`: windows for the entropy threshold), and
    the non-causal oracle's (`oracle_perplexity`) when `policies` hold "oracle"."""
    thresholds = entropy_thresholds(model, calibration, budgets) if "entropy" in policies else {}
    rows, done = [], {}
    if "oracle" in policies:
        rows += oracle_perplexity(model, tokens, seq_len, budgets, max_tokens=max_tokens, batch_size=batch_size,
                                  label=label)  # fmt: skip
    for budget in budgets:
        for policy in [p for p in policies if p != "oracle"]:
            spec = policy_spec(policy, budget, seq_len, chunk, thresholds.get(budget))
            if spec not in done:
                done[spec] = evaluate(model, tokens, seq_len, spec, batch_size=batch_size, max_tokens=max_tokens)
            result = done[spec]
            windows = result.tokens // seq_len
            full = windows * seq_len * (seq_len + 1) // 2
            fraction, scores = result.attention_fraction, result.attention_scores
            rows.append(ResultRow(
                model=label, family=variant(model.config.variant).family, protocol=policy, task="ppl",
                setting=_budget_label(budget), seq_len=budget,
                metrics={"ppl": result.perplexity, "attention": fraction},
                attention_tokens=round(fraction * result.tokens), tokens=result.tokens, n=windows,
                extra={"spec": spec, "policy": policy, "budget": budget, "attention_scores": scores,
                       "all_attention_scores": full},
            ))  # fmt: skip
            log(f"ppl {policy:<13} budget {budget:6.1%}: ppl {result.perplexity:8.3f}, attention {fraction:6.1%}")
    return rows


@torch.no_grad()
def oracle_perplexity(
    model: Any, tokens: Any, seq_len: int, budgets: Sequence[float], *, max_tokens: int | None, batch_size: int,
    label: str,
) -> list[ResultRow]:  # fmt: skip
    """Perplexity with attention at the top-B fraction of each window's tokens by their measured gain Δ (the
    non-causal oracle a router imitates: it reads both modes' losses of the very tokens it scores), per budget."""
    from oryx.eval.perplexity import window_batches, window_indices
    from oryx.losses import token_losses
    from oryx.routing.training import gains

    windows = len(window_indices(len(tokens), seq_len, max_tokens))
    batches = window_batches(tokens, seq_len, windows, batch_size)
    rows = []
    for budget in [b for b in budgets if 0 < b < 1]:
        total, used = 0.0, []
        k = round(budget * seq_len)
        for ids, labels in batches:
            delta, _ = gains(model, ids, labels, seen=False)
            modes = torch.full_like(ids, LINEAR).scatter_(1, delta.topk(k, dim=1).indices.cpu(), ATTN)
            total += float(token_losses(model(ids.to(model.device), modes=modes.to(model.device)).logits,
                                        labels.to(model.device)).double().sum())  # fmt: skip
            used.append(modes)
        modes = torch.cat(used)
        rows.append(_row(label, model, "oracle", "ppl", _budget_label(budget), budget,
                         {"ppl": math.exp(total / modes.numel())}, modes, f"top {k} of each window by Δ",
                         len(modes), len(modes) * seq_len * (seq_len + 1) // 2, "oracle", budget))  # fmt: skip
    return rows


def _mqar_router_scores(model: Any, router: Any, batch: Any, rows: int) -> torch.Tensor:
    """The router's scores [rows, L] of the first rows of an MQAR batch."""
    ids = batch.input_ids[:rows].to(model.device)
    capture = FeatureCapture(ids if router.config.seen_before else None)
    with torch.no_grad():
        model.model(ids, modes=torch.full_like(ids, LINEAR), route=capture)
        return router.score_features(capture.features).cpu()


@torch.no_grad()
def _mqar_accuracy(model: Any, test: Any, spec: str, budget: float, batch_size: int) -> tuple[float, torch.Tensor]:
    """(accuracy, modes used [n, L]) of an MQAR batch under `spec`: a schedule, "queries" (the oracle), or "queries
    under the rule ..." (the oracle's scores under the budget rule)."""
    from oryx.eval.mqar_run import query_loss_and_hits, query_modes

    L = test.seq_len
    schedule = None if spec.startswith("queries") else parse(spec)
    correct = total = 0
    used = []
    for start in range(0, len(test.input_ids), batch_size):
        part = slice(start, start + batch_size)
        ids, labels = test.input_ids[part].to(model.device), test.labels[part].to(model.device)
        if spec.startswith("queries under"):
            oracle = (labels != -100).double().cpu().numpy()
            positions = np.broadcast_to(np.arange(L), oracle.shape)
            modes = decide(oracle, positions, np.ones(oracle.shape, bool), RoutingState.new(len(ids)), threshold=0.5,
                           budget=budget, chunk=1)  # fmt: skip
            modes = torch.from_numpy(modes).to(model.device)
        elif schedule is None:
            modes = query_modes(test)[part].to(model.device)
        elif isinstance(schedule, Adaptive):
            modes = None
        else:
            modes = schedule.modes(len(ids), L, prompt_length=L, device=model.device)
        _, c, t, modes_used = query_loss_and_hits(model, ids, labels, modes, schedule if modes is None else None)
        correct, total = correct + c, total + t
        used.append(modes_used.cpu())
    return correct / total, torch.cat(used)


def budget_mqar(
    model: Any,
    config: Any,
    *,
    budgets: Sequence[float] = BUDGETS,
    policies: Sequence[str] = MQAR_POLICIES,
    calibration_rows: int = 128,
    batch_size: int = 64,
    settings: Sequence[tuple[int, int]] | None = None,
    label: str = "model",
    log: Log = print,
) -> list[ResultRow]:
    """MQAR accuracy on the sweep's test grid (`config`: its `MQARSweepConfig`; `settings`, (L, K) pairs of it, picks
    some) of every policy at every budget, the `queries` oracle (alone and under the budget rule), and the router and
    random at the oracle's fraction K/L (rows "router K/L", "random K/L")."""
    from oryx.eval.mqar_run import scaled_settings
    from oryx.eval.tasks.mqar import MQAR_TEST_SEED, MQAR_TRAIN_SEED, make_mqar

    grid = scaled_settings(config.test_grid, config.test_scale, 1)
    if settings is not None:
        wanted = set(settings)
        missing = wanted - {(c.seq_len, c.num_kv) for c in grid}
        if missing:
            asked = " ".join(f"{L}:{K}" for L, K in settings if (L, K) in missing)
            sweep = " ".join(f"{c.seq_len}:{c.num_kv}" for c in grid)
            raise ValueError(f"--settings {asked}: not in the model's test grid ({sweep})")
        grid = tuple(c for c in grid if (c.seq_len, c.num_kv) in wanted)
    router = model.router
    policies = [p for p in policies if p != "router" or router is not None]
    rows = []
    for setting in grid:
        L, K = setting.seq_len, setting.num_kv
        test = make_mqar(setting.n, L, K, vocab=config.vocab, seed=[MQAR_TEST_SEED, L, K])
        calibration = make_mqar(calibration_rows, L, K, vocab=config.vocab, seed=[MQAR_TRAIN_SEED, L, K])
        if router is not None:  # this setting's thresholds, from its own training rows
            tuned = copy.deepcopy(router)
            tuned.set_calibration(_mqar_router_scores(model, router, calibration, calibration_rows))
            model.attach_router(tuned)
        oracle = K / L
        thresholds = {}
        if "entropy" in policies:
            thresholds = entropy_thresholds(model, [(calibration.input_ids, calibration.labels)], [*budgets, oracle])
        cells = [(policy, budget, _budget_label(budget)) for budget in budgets for policy in policies]
        cells += [("queries", oracle, ""), ("queries", oracle, "capped")]
        cells += [(p, oracle, "K/L") for p in ("router", "random") if p in policies]
        done: dict[str, tuple[float, torch.Tensor]] = {}  # the endpoints are the same schedule for every policy
        for policy, budget, tag in cells:
            spec = "queries" if policy == "queries" else policy_spec(policy, budget, L, 1, thresholds.get(budget))
            if tag == "capped":  # the oracle's scores under the causal budget rule: what the rule itself costs
                spec = f"queries under the rule at budget {budget:g}"
            if spec not in done:
                done[spec] = _mqar_accuracy(model, test, spec, budget, batch_size)
            accuracy, modes = done[spec]
            protocol = f"{policy} {tag}".strip()
            # The cells at the oracle's fraction (which differs between settings) make one point each in the plot.
            at_oracle = policy == "queries" or tag == "K/L"
            row = _row(label, model, protocol, "mqar", f"{L}x{K}", L, {"accuracy": accuracy}, modes, spec, setting.n,
                       setting.n * L * (L + 1) // 2, protocol if at_oracle else policy,
                       None if at_oracle else budget)  # fmt: skip
            rows.append(row)
            log(f"mqar {L}x{K} {protocol:<16}: accuracy {accuracy:.3f}, attention {row.attention_fraction:.1%}")
    if router is not None:
        model.attach_router(router)
    return rows


def budget_retrieval(
    model: Any,
    tokenizer: Any,
    calibration: Sequence[Batch],
    *,
    tasks: Sequence[str],
    length: int,
    n: int,
    budgets: Sequence[float] = BUDGETS,
    policies: Sequence[str] = SCHEDULE_POLICIES,
    chunk: int = 32,
    batch_size: int = 8,
    label: str = "model",
    log: Log = print,
) -> list[ResultRow]:
    """NIAH and record recall of every schedule policy at every budget (NIAH prompts of `length` tokens; fixed
    placements are laid over the mean prompt length, and every generated token is linear but under `tail`). The
    oracle is not one: it needs the measured gain of the very tokens it scores, which only perplexity has."""
    unknown = [p for p in policies if p not in SCHEDULE_POLICIES]
    if unknown:
        raise ValueError(f"retrieval policies must be schedules ({', '.join(SCHEDULE_POLICIES)}), got {unknown}")
    from oryx.eval.retrieval import run_retrieval, task_samples

    thresholds = entropy_thresholds(model, calibration, budgets) if "entropy" in policies else {}
    rows = []
    for task in tasks:
        prompts, _, _ = task_samples(task, length, n, tokenizer, 0)
        mean_length = round(float(np.mean([len(p) for p in prompts])))
        for budget in budgets:
            rules = {}
            for policy in policies:
                rules.setdefault(policy_spec(policy, budget, mean_length, chunk, thresholds.get(budget)), []).append(
                    policy
                )
            results = run_retrieval(model, tokenizer, label, tasks=[task], lengths=[length], n=n, batch_size=batch_size,
                                    rules=[ModeRule(spec) for spec in rules], log=lambda line: None)  # fmt: skip
            for result, (spec, names) in zip(results, rules.items(), strict=True):
                for policy in names:
                    extra = {"spec": spec, "policy": policy, "budget": budget}
                    rows.append(ResultRow(**{**result.__dict__, "protocol": policy, "setting": _budget_label(budget),
                                             "seq_len": budget, "extra": extra}))  # fmt: skip
                    log(f"{task} {policy:<13} budget {budget:6.1%}: recall {result.metrics['recall']:.3f}, "
                        f"attention {result.attention_fraction:.1%}")  # fmt: skip
    return rows


def _clock(device: torch.device) -> Callable[[], float]:
    """Seconds to time a forward by: this process's CPU time on a CPU (steady beside other work on the machine), wall
    time after the card has finished its queue on CUDA (the card's work is no CPU time)."""
    if device.type != "cuda":
        return time.process_time

    def after_the_card() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return after_the_card


def routing_cost(model: Any, ids: torch.Tensor, spec: str, repeats: int = 7) -> dict[str, float]:
    """What routing adds to a forward of `ids` [B, T] under `spec`: the median seconds (`_clock`) of the routed forward
    and of the same forward given the modes it chose, the routing's share of the routed forward, and the attention
    work of those modes: the query-key pairs of its rows (ideal) and the scores the reference kernel computed (whole
    blocks of 128 rows; NaN where a fast backend ran, which the counter does not see), relative to all-attention's."""
    with torch.no_grad(), count_score_elements() as computed:
        modes = model(ids, schedule=spec).modes  # also a warm-up (and the threshold's calibration)
    clock = _clock(ids.device)
    times: dict[str, list[float]] = {"routed": [], "explicit": []}
    for _ in range(repeats):  # alternating, so that a change of the machine's load hits both alike
        for name, kwargs in (("routed", {"schedule": spec}), ("explicit", {"modes": modes})):
            start = clock()
            with torch.no_grad():
                model(ids, **kwargs)
            times[name].append(clock() - start)
    routed, explicit = (float(np.median(times[name])) for name in ("routed", "explicit"))
    full = attention_scores(torch.full_like(modes, ATTN))
    per_pair = model.config.num_hidden_layers * model.config.num_heads  # the counter counts every head, every layer
    ideal = attention_scores(modes) / full
    return {
        "routed_s": routed,
        "explicit_s": explicit,
        "share": (routed - explicit) / routed,
        "ideal_work": ideal,
        "computed_work": computed.value / per_pair / full if computed.value or not ideal else math.nan,
    }


def plot_quality_against_work(rows: Sequence[ResultRow], metric: str, path: str | Path, title: str) -> Path:
    """`metric` (mean over a policy's cells at one budget) against attention's work at that budget: its query-key
    pairs relative to all-attention's on the same inputs, or, for rows without a count (generation), the realised
    attention fraction. One line per policy; a policy whose rows have no budget (the MQAR oracle, cells at the
    oracle's fraction) is one point over all its rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[str, float], list[ResultRow]] = {}
    for row in rows:
        cells.setdefault((row.extra["policy"], row.extra["budget"]), []).append(row)
    counted = all("attention_scores" in row.extra for row in rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, policy in enumerate(dict.fromkeys(policy for policy, _ in cells)):
        points = []
        for (name, _), group in cells.items():
            if name != policy:
                continue
            if counted:
                work = sum(r.extra["attention_scores"] for r in group) / sum(
                    r.extra["all_attention_scores"] for r in group
                )
            else:
                work = sum(r.attention_tokens for r in group) / sum(r.tokens for r in group)
            points.append((work, float(np.mean([r.metrics[metric] for r in group]))))
        points.sort()
        single = len(points) == 1 and (policy, None) in cells
        style = "" if single else "-" if policy.startswith(("router", "oracle")) else "--"
        marker = "*" if single else "o"
        ax.plot(*zip(*points, strict=True), style, marker=marker, markersize=11 if single else 6, color=f"C{i % 10}",
                label=policy)  # fmt: skip
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("attention query-key pairs / all-attention's" if counted else "attention fraction (realised)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_budget_report(
    rows: Sequence[ResultRow], out: str | Path, benchmark: str, metric: str, meta: dict[str, Any]
) -> list[Path]:
    """`<benchmark>.json` (a result file of `oryx.eval.report`), `<benchmark>.md` (tables of `metric` and of the
    realised attention) and `<benchmark>.png` (quality against attention work) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_results(out / f"{benchmark}.json", benchmark, [metric, "attention"], rows, meta)]
    notes = meta.get("notes", "")
    (out / f"{benchmark}.md").write_text(f"## {benchmark}\n\n" + markdown_tables(benchmark, [metric, "attention"], rows)
                                         + (f"\n{notes}\n" if notes else ""))  # fmt: skip
    paths.append(out / f"{benchmark}.md")
    paths.append(plot_quality_against_work(rows, metric, out / f"{benchmark}.png", f"{benchmark}: {meta['label']}"))
    return paths
