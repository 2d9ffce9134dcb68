"""The MQAR sweep: train a small model of every family on Zoology's MQAR mix and test it on the standard grid, in
every mode it has and under the cross-mode protocols (docs/data.md §7.2, docs/paper.md §6).

    oryx eval mqar --out runs/mqar                       # the full sweep (GPU: see benchmarks/mqar_gpu.sh)
    oryx eval mqar --out /tmp/mqar --vocab 512 --hidden-size 64 --head-dim 32 --train-mix 64:4:8000 \
        128:8:2000 --test-grid 64:4:200 64:8:200 64:16:200 128:32:200 256:64:100 --epochs 2 --batch-size 32 \
        --jobs 2 --device cpu                                      # CPU-sized: ~17 min on 2 busy cores

Every family gets the same shape (default 2 layers × 128 wide, head dim 64; Zoology uses d_model 64–256 and two
layers). Training: AdamW (0.9, 0.95), weight decay 0.1 off norms and decay parameters, linear warmup then cosine
to zero, gradient clipping at 1, batches of one setting each (lengths differ between settings), bf16 autocast on
GPU. The baselines train in their one mode. Oryx models train with the chunked mixed schedule of the paper, scaled
to MQAR's short rows: by default chunks of 16 tokens, each attention with probability 1/4 (the paper's 128-token
chunks would put most MQAR rows in a single mode). The loss and the accuracy are computed only at the K query
positions of a row; projecting the other positions onto the vocabulary would be wasted work.

Test rows, per family, per setting (L, K) of the grid:

==========  =====================================================  ============================
mode        what runs in attention                                 attention fraction
==========  =====================================================  ============================
attn        every token                                            1
linear      none                                                   0
cross       every token after the key–value block (docs/paper.md §6.4)     (L − 2K) / L
queries     only the K query tokens (the minimum MQAR needs)       K / L
==========  =====================================================  ============================

A baseline runs only its own mode (transformer: attn; mamba2, gdn: linear). With several learning rates (``--lrs``)
each family keeps the one with the best mean accuracy over all its rows (Zoology reports the best of its sweep).
``--train-minutes`` caps the training runs, all of them at one number of steps: before any run trains, a short timed
probe of every run (the training step itself, in the processes that will train; every probe warms up, waits for the
others, and then all time their steps at once, sharing the device as the runs will) gives its time per step, and the
slowest run's sets the step count of every run, so the families are compared at equal steps and every cosine schedule
still ends at its last step. Should a probe have been optimistic, a run stops at 1.25× the budget;
a run that trained fewer steps than another is printed, and listed under the table, as a FAILED comparison.

Output (``--out``): ``runs/<family>-lr<lr>.json`` per training run, ``mqar.json`` (the best run of each family, a
result file of ``oryx.eval.report``), ``mqar.md`` and ``mqar.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from oryx.configuration import OryxConfig
from oryx.eval.perplexity import autocast
from oryx.eval.report import ResultRow, write_report, write_results
from oryx.eval.tasks.mqar import (
    IGNORE_INDEX,
    MQAR_TEST_GRID,
    MQAR_TEST_SEED,
    MQAR_TRAIN_MIX,
    MQAR_TRAIN_SEED,
    MQARBatch,
    MQARConfig,
    make_mqar,
    mqar_modes,
)
from oryx.modeling import OryxForCausalLM
from oryx.optim import adamw, lr_factor
from oryx.schedule import Adaptive, Schedule, parse
from oryx.variants import ATTN, LINEAR, MODE_NAMES, family_names
from oryx.variants import FAMILIES as FAMILY_TABLE

FAMILIES = tuple(family_names())  # every family of the variant table, the baselines first
MQAR_PROTOCOLS = ("attn", "linear", "cross", "queries")
PROBE_WARMUP, PROBE_STEPS = 4, 3  # untimed and timed steps per setting of the --train-minutes probe
PROBE_BARRIER_SECONDS = 900.0  # how long a probe waits for the others to finish warming up

__all__ = [
    "FAMILIES",
    "MQAR_PROTOCOLS",
    "MQARSweepConfig",
    "evaluate_mqar",
    "probe_step_seconds",
    "query_modes",
    "run_sweep",
    "shared_steps",
    "train_mqar",
    "unequal_steps",
]


@dataclass(frozen=True)
class MQARSweepConfig:
    """Everything one sweep depends on (saved with its results)."""

    families: tuple[str, ...] = FAMILIES
    hidden_size: int = 128
    num_layers: int = 2
    head_dim: int = 64
    vocab: int = 8192
    train_mix: tuple[MQARConfig, ...] = MQAR_TRAIN_MIX
    test_grid: tuple[MQARConfig, ...] = MQAR_TEST_GRID
    scale: float = 1.0  # multiplies the rows of every training setting
    test_scale: float = 1.0  # multiplies the rows of every test setting
    epochs: float = 16
    batch_size: int = 256
    eval_batch_size: int = 64
    lrs: tuple[float, ...] = (3e-3,)
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    oryx_schedule: str = "chunks:size=16,p_attn=0.25"
    protocols: tuple[str, ...] = MQAR_PROTOCOLS
    train_minutes: float | None = None
    device: str = "cpu"
    precision: str = "auto"
    seed: int = 0
    log_every: int = 50
    save_models: bool = False  # each trained model into <out>/models/<family>-lr<lr>/ (for oryx eval budget)

    def __post_init__(self) -> None:
        if not self.families or not self.lrs:
            raise ValueError("an MQAR sweep needs at least one family and one learning rate")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
        bad = [p for p in self.protocols if p not in MQAR_PROTOCOLS]
        if bad:
            raise ValueError(f"unknown MQAR protocols {bad}; choose from {', '.join(MQAR_PROTOCOLS)}")
        if isinstance(parse(self.oryx_schedule), Adaptive):  # parse fails before any work on a bad spec
            raise ValueError(f"oryx_schedule must be a fixed training schedule, not the adaptive {self.oryx_schedule}")
        longest = max(c.seq_len for c in (*self.train_mix, *self.test_grid))
        if self.vocab <= longest:
            raise ValueError(f"MQAR needs vocab > sequence length; got vocab {self.vocab} for length {longest}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_mix"] = [list(c) for c in self.train_mix]
        data["test_grid"] = [list(c) for c in self.test_grid]
        return data


def build_model(family: str, config: MQARSweepConfig) -> OryxForCausalLM:
    """A ``family`` model of the sweep's shape; positions up to the longest test row."""
    longest = max(c.seq_len for c in (*config.train_mix, *config.test_grid))
    return OryxForCausalLM(
        OryxConfig(
            variant=FAMILY_TABLE[family].name,
            vocab_size=config.vocab,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            head_dim=config.head_dim,
            max_position_embeddings=longest,
        )
    )


def query_modes(batch: MQARBatch) -> torch.Tensor:
    """Modes [n, L] of the ``queries`` protocol: attention exactly at the K query tokens, linear elsewhere."""
    return torch.where(batch.labels != IGNORE_INDEX, ATTN, LINEAR)


def protocol_modes_for(batch: MQARBatch, protocol: str) -> torch.Tensor:
    """Modes [n, L] of ``batch`` under one of ``MQAR_PROTOCOLS``."""
    if protocol == "queries":
        return query_modes(batch)
    return mqar_modes(len(batch.input_ids), batch.seq_len, batch.num_kv, protocol)


def scaled_settings(configs: Sequence[MQARConfig], scale: float, minimum: int) -> tuple[MQARConfig, ...]:
    """The settings with their rows multiplied by `scale` (at least `minimum` each)."""
    return tuple(c._replace(n=max(minimum, round(c.n * scale))) for c in configs)


def query_loss_and_hits(
    model: OryxForCausalLM,
    ids: torch.Tensor,
    labels: torch.Tensor,
    modes: torch.Tensor | None = None,
    schedule: Schedule | None = None,
) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """Cross-entropy at the supervised positions of aligned ``labels`` [B, L], the correct and supervised counts, and
    the modes used [B, L] (``modes``, or those an adaptive ``schedule`` decided)."""
    out = model.hidden_states(ids, modes=modes, schedule=schedule)
    supervised = labels != IGNORE_INDEX
    logits = model.lm_head(out.last_hidden_state[supervised]).float()
    targets = labels[supervised]
    loss = F.cross_entropy(logits, targets)
    return loss, int((logits.argmax(-1) == targets).sum()), int(supervised.sum()), out.modes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


ModeDrawer = Callable[[int, MQARBatch], "torch.Tensor | None"]


def _train_step(
    model: OryxForCausalLM,
    optimizer: torch.optim.Optimizer,
    batch: MQARBatch,
    rows: torch.Tensor,
    modes: torch.Tensor | None,
    precision: str,
) -> tuple[float, int, int]:
    """One optimizer step on `rows` of `batch` (clipped at 1.0): the loss, the correct and the supervised counts."""
    device = next(model.parameters()).device
    with autocast(device, precision):
        loss, correct, supervised, _ = query_loss_and_hits(
            model, batch.input_ids[rows].to(device), batch.labels[rows].to(device), modes
        )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), correct, supervised


class Barrier(Protocol):
    """What the probes wait at (a `multiprocessing.Barrier` or its manager's proxy): `wait(timeout)`."""

    def wait(self, timeout: float | None = None) -> Any: ...


def _probe_seconds(
    model: OryxForCausalLM,
    train: list[MQARBatch],
    config: MQARSweepConfig,
    draw_modes: ModeDrawer,
    barrier: Barrier | None = None,
) -> list[float]:
    """Seconds of one training step (`_train_step`, on this throwaway model) per training setting: PROBE_WARMUP
    untimed steps of every setting, then (with `barrier`) a wait for the other probes, then the median of PROBE_STEPS
    timed steps of each.

    Several steps, because an Oryx step draws new modes each time and so meets new shapes (the attention rows'
    blocks) for a while: timing one early step overestimates a trained step several times over, which would cut the
    Oryx runs of an equal-steps sweep short (benchmarks/RESULTS.md, the H100 MQAR sweep). Timing all probes together
    after all have warmed up, because a probe that times while the others still compile has the device to itself and
    underestimates a shared step (about 1.7x on the H200 sweep of 2026-12-02).
    """
    device = next(model.parameters()).device
    optimizer = adamw(model, config.lrs[0], config.weight_decay)
    rows = [torch.arange(min(config.batch_size, len(batch.input_ids))) for batch in train]
    for batch, picked in zip(train, rows, strict=True):
        for _ in range(PROBE_WARMUP):
            _train_step(model, optimizer, batch, picked, draw_modes(len(picked), batch), config.precision)
    if barrier is not None:
        with contextlib.suppress(Exception):  # a broken or timed-out barrier: time alone, as before
            barrier.wait(PROBE_BARRIER_SECONDS)
    seconds = []
    for batch, picked in zip(train, rows, strict=True):
        timed = []
        for _ in range(PROBE_STEPS):
            modes = draw_modes(len(picked), batch)
            _sync(device)
            start = time.perf_counter()
            _train_step(model, optimizer, batch, picked, modes, config.precision)
            _sync(device)
            timed.append(time.perf_counter() - start)
        seconds.append(float(np.median(timed)))
    return seconds


def _train_data(config: MQARSweepConfig) -> list[MQARBatch]:
    return [
        make_mqar(c.n, c.seq_len, c.num_kv, vocab=config.vocab, seed=[MQAR_TRAIN_SEED, c.seq_len, c.num_kv])
        for c in scaled_settings(config.train_mix, config.scale, config.batch_size)
    ]


def _steps_per_setting(train: Sequence[MQARBatch], batch_size: int) -> list[int]:
    return [math.ceil(len(b.input_ids) / batch_size) for b in train]


def _mode_drawer(model: OryxForCausalLM, config: MQARSweepConfig, device: torch.device) -> ModeDrawer:
    """Training modes of a batch: the Oryx schedule's draws (seeded), None (the one mode) for a baseline."""
    schedule = parse(config.oryx_schedule) if model.config.is_oryx else None
    generator = torch.Generator().manual_seed(config.seed)

    def draw_modes(rows: int, batch: MQARBatch) -> torch.Tensor | None:
        return None if schedule is None else schedule.modes(rows, batch.seq_len, generator=generator).to(device)

    return draw_modes


def probe_step_seconds(family: str, config: MQARSweepConfig, barrier: Barrier | None = None) -> float:
    """Seconds per training step of a ``family`` run of ``config``: ``_probe_seconds`` of a fresh model (timed
    together with the other probes at ``barrier``), weighted by the steps each setting takes in an epoch. The run
    itself starts from its own fresh model (the probe draws no modes or rows from the run's generators)."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model = build_model(family, config).to(device)
    train = _train_data(config)
    per_setting = _steps_per_setting(train, config.batch_size)
    seconds = _probe_seconds(model, train, config, _mode_drawer(model, config, device), barrier)
    return float(np.dot(seconds, per_setting)) / sum(per_setting)


def shared_steps(per_step: Mapping[str, float], planned: int, minutes: float) -> tuple[int, str]:
    """One step count for every run (equal steps, not equal minutes): the most that the slowest run (by its probed
    seconds per step, ``per_step``) fits into ``minutes``, never more than ``planned``. Returns it and that run."""
    slowest = max(per_step, key=lambda name: per_step[name])
    return max(1, min(planned, int(60 * minutes / per_step[slowest]))), slowest


def unequal_steps(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A FAILED line for every run that trained fewer steps than another run of the sweep (cut by the time budget):
    its numbers are not an equal-steps comparison."""
    if not runs:
        return []
    most = max(runs, key=lambda run: run["steps"])
    return [
        f"FAILED: {_run_name(run['family'], run['lr'])} trained {run['steps']} steps, fewer than "
        f"{_run_name(most['family'], most['lr'])}'s {most['steps']} (stopped at 1.25x --train-minutes): not an "
        "equal-steps comparison"
        for run in runs
        if run["steps"] < most["steps"]
    ]


@torch.no_grad()
def evaluate_mqar(
    model: OryxForCausalLM, test: Sequence[MQARBatch], protocols: Sequence[str], batch_size: int, precision: str
) -> list[dict[str, Any]]:
    """Accuracy (pooled over the K queries of every row) and attention counts per (protocol, setting).

    Protocols the model cannot run (a baseline's other mode, or a mixed protocol) are skipped.
    """
    model.eval()
    device = next(model.parameters()).device
    supported = set(model.config.supported_modes)
    out = []
    for protocol in protocols:
        for batch in test:
            modes = protocol_modes_for(batch, protocol)
            if not set(modes.unique().tolist()) <= supported:
                break
            correct = total = 0
            for start in range(0, len(batch.input_ids), batch_size):
                part = slice(start, start + batch_size)
                with autocast(device, precision):
                    _, c, t, _ = query_loss_and_hits(
                        model, batch.input_ids[part].to(device), batch.labels[part].to(device), modes[part].to(device)
                    )
                correct, total = correct + c, total + t
            out.append(
                {
                    "protocol": protocol,
                    "seq_len": batch.seq_len,
                    "num_kv": batch.num_kv,
                    "n": len(batch.input_ids),
                    "accuracy": correct / total,
                    "attention_tokens": int((modes == ATTN).sum()),
                    "tokens": modes.numel(),
                }
            )
    return out


def train_mqar(
    family: str,
    lr: float,
    config: MQARSweepConfig,
    log: Callable[[str], None] = print,
    save_to: str | Path | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Train one ``family`` model at learning rate ``lr`` on the (scaled) MQAR mix and test it on the grid; with
    ``save_to``, save the model there with the sweep's settings (``mqar.json``), for ``oryx train-router`` and
    ``oryx eval budget``.

    ``steps``: the schedule's length (a sweep's shared step count, ``shared_steps``); by default the planned epochs,
    or, with ``config.train_minutes``, what this run's own probe fits into them.
    Returns a JSON-able dict: the run's settings, its training summary and ``results`` from ``evaluate_mqar``.
    """
    train = _train_data(config)
    steps_per_epoch = sum(_steps_per_setting(train, config.batch_size))
    planned = max(1, round(config.epochs * steps_per_epoch))
    if steps is None and config.train_minutes is not None:
        per_step = probe_step_seconds(family, config)
        steps, _ = shared_steps({family: per_step}, planned, config.train_minutes)
        log(f"{family}: probe {per_step * 1e3:.0f} ms/step; {steps} of {planned} planned steps fit the budget")
    total = planned if steps is None else steps
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model = build_model(family, config).to(device)
    test = [
        make_mqar(c.n, c.seq_len, c.num_kv, vocab=config.vocab, seed=[MQAR_TEST_SEED, c.seq_len, c.num_kv])
        for c in scaled_settings(config.test_grid, config.test_scale, 1)
    ]
    schedule = parse(config.oryx_schedule) if model.config.is_oryx else None
    draw_modes = _mode_drawer(model, config, device)
    optimizer = adamw(model, lr, config.weight_decay)
    rng = np.random.default_rng(config.seed)
    model.train()
    started = time.perf_counter()
    # A hard stop at 1.25× the budget, in case the probe was optimistic (e.g. other runs sharing the GPU sped up).
    deadline = started + 75 * config.train_minutes if config.train_minutes is not None else math.inf
    step, losses, correct, supervised = 0, [], 0, 0
    while step < total and time.perf_counter() < deadline:
        # One epoch: every row once, in batches of one setting, the batches in random order.
        epoch = [
            (s, rows[i : i + config.batch_size])
            for s, batch in enumerate(train)
            for rows in [torch.from_numpy(rng.permutation(len(batch.input_ids)))]
            for i in range(0, len(rows), config.batch_size)
        ]
        for k in rng.permutation(len(epoch)):
            if step == total or time.perf_counter() >= deadline:
                break
            s, rows = epoch[k]
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, total, config.warmup_ratio, 0.0)
            loss, c, t = _train_step(
                model, optimizer, train[s], rows, draw_modes(len(rows), train[s]), config.precision
            )
            losses.append(loss)
            correct, supervised = correct + c, supervised + t
            step += 1
            if step % config.log_every == 0 or step == total:
                log(
                    f"{family} lr {lr:g}: step {step}/{total} loss {np.mean(losses[-config.log_every :]):.3f} "
                    f"train acc {correct / supervised:.3f} ({time.perf_counter() - started:.0f} s)"
                )
                correct = supervised = 0
    if step < total:
        log(f"FAILED: {family} lr {lr:g} stopped at step {step} of {total}: past 1.25× the time budget")
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    results = evaluate_mqar(model, test, config.protocols, config.eval_batch_size, config.precision)
    summary = ", ".join(
        f"{p} {np.mean([r['accuracy'] for r in results if r['protocol'] == p]):.3f}"
        for p in dict.fromkeys(r["protocol"] for r in results)
    )
    log(f"{family} lr {lr:g}: mean test accuracy {summary} (eval {time.perf_counter() - started:.0f} s)")
    if save_to is not None:
        save_mqar_model(model, config, save_to)
    return {
        "family": family,
        "lr": lr,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "schedule_steps": total,
        "planned_steps": planned,
        "epochs": step / steps_per_epoch,
        "train_seconds": train_seconds,
        "final_loss": float(np.mean(losses[-config.log_every :])),
        "train_schedule": config.oryx_schedule
        if schedule is not None
        else MODE_NAMES[FAMILY_TABLE[family].default_mode],
        "results": results,
    }


MQAR_SETTINGS = "mqar.json"  # the sweep's settings, in a saved model's folder


def router_batches(config: MQARSweepConfig, rows: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, aligned labels) batches for training a router on MQAR: ``rows`` rows of every setting of the
    sweep (its training mix and its test grid) drawn from the training seed, never the test rows. The gain of
    attention is measured at the query positions; elsewhere nothing is predicted."""
    settings = dict.fromkeys((c.seq_len, c.num_kv) for c in (*config.train_mix, *config.test_grid))
    data = [make_mqar(rows, L, K, vocab=config.vocab, seed=[MQAR_TRAIN_SEED, L, K]) for L, K in settings]
    return [
        (batch.input_ids[start : start + batch_size], batch.labels[start : start + batch_size])
        for batch in data
        for start in range(0, rows, batch_size)
    ]


def save_mqar_model(model: OryxForCausalLM, config: MQARSweepConfig, folder: str | Path) -> Path:
    """Save a trained MQAR model with the sweep's settings into ``folder`` (checksummed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MQAR_SETTINGS).write_text(json.dumps(config.to_json(), indent=1))  # first: save_pretrained lists it
    model.cpu().save_pretrained(folder)
    return folder


def load_mqar_model(folder: str | Path, verify: bool = True) -> tuple[OryxForCausalLM, MQARSweepConfig]:
    """A model saved by ``save_mqar_model`` (with its router, when it has one) and its sweep's settings.

    Raises:
        CheckpointError: the folder is missing, damaged or not verifiable, or not an MQAR model's.
    """
    from oryx.checkpoint import CheckpointError
    from oryx.manifest import verified_view

    folder = Path(folder)
    if not (folder / MQAR_SETTINGS).is_file():
        raise CheckpointError(f"{folder} is no MQAR model folder (no {MQAR_SETTINGS}); save one with --save-models")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(verified_view(folder, required=(MQAR_SETTINGS,))) if verify else folder
        model = OryxForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        settings = json.loads((source / MQAR_SETTINGS).read_text())
    settings["train_mix"] = tuple(MQARConfig(*c) for c in settings["train_mix"])
    settings["test_grid"] = tuple(MQARConfig(*c) for c in settings["test_grid"])
    for key in ("families", "lrs", "protocols"):
        settings[key] = tuple(settings[key])
    model.config._name_or_path = str(folder)
    return model, MQARSweepConfig(**settings)


def _run_name(family: str, lr: float) -> str:
    return f"{family}-lr{lr:g}"


def _probe_job(family: str, config: MQARSweepConfig, threads: int, barrier: Barrier | None) -> float:
    """``probe_step_seconds`` in a worker process."""
    if config.device == "cpu":
        torch.set_num_threads(threads)
    return probe_step_seconds(family, config, barrier)


def _job(family: str, lr: float, config: MQARSweepConfig, out_dir: str, threads: int, steps: int | None) -> str:
    """One training run in a worker process; writes its JSON and returns the path."""
    if config.device == "cpu":
        torch.set_num_threads(threads)
    path = Path(out_dir) / "runs" / f"{_run_name(family, lr)}.json"
    models = Path(out_dir) / "models" / _run_name(family, lr) if config.save_models else None
    result = train_mqar(family, lr, config, log=lambda line: print(line, flush=True), save_to=models, steps=steps)
    path.write_text(json.dumps({"config": config.to_json(), **result}, indent=1))
    return str(path)


def _rows(run: dict[str, Any]) -> list[ResultRow]:
    return [
        ResultRow(
            model=run["family"],
            family=run["family"],
            protocol=r["protocol"],
            task="mqar",
            setting=f"{r['seq_len']}x{r['num_kv']}",
            seq_len=r["seq_len"],
            metrics={"accuracy": r["accuracy"]},
            attention_tokens=r["attention_tokens"],
            tokens=r["tokens"],
            n=r["n"],
            extra={"lr": run["lr"], "steps": run["steps"], "train_schedule": run["train_schedule"]},
        )
        for r in run["results"]
    ]


def _training_notes(config: MQARSweepConfig, runs: list[dict[str, Any]], best: dict[str, dict[str, Any]]) -> str:
    """Markdown: how each run trained (the chosen one of each family in bold)."""
    lines = [
        f"Training: {config.num_layers} layers × {config.hidden_size} (head dim {config.head_dim}), "
        f"V = {config.vocab}, batch {config.batch_size}, {config.epochs:g} epochs planned, device {config.device}; "
        f"Oryx trains with `{config.oryx_schedule}`, baselines in their mode.",
        "",
        "| run | lr | parameters | steps (of the schedule's, of the plan's) | epochs | train min | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        name = _run_name(run["family"], run["lr"])
        if best[run["family"]]["lr"] == run["lr"]:
            name = f"**{name}**"
        lines.append(
            f"| {name} | {run['lr']:g} | {run['parameters']:,} | {run['steps']} ({run['schedule_steps']}, "
            f"{run['planned_steps']}) | "
            f"{run['epochs']:.2f} | {run['train_seconds'] / 60:.1f} | {run['final_loss']:.3f} |"
        )
    failed = unequal_steps(runs)
    if failed:
        lines += ["", *(f"**{line}**" for line in failed)]
    return "\n".join(lines) + "\n"


def _write_summary(config: MQARSweepConfig, out: Path, paths: Sequence[str]) -> list[Path]:
    """``mqar.json`` and the report from the finished runs: the best lr of each family that has one."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs.sort(key=lambda run: (config.families.index(run["family"]), config.lrs.index(run["lr"])))
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        score = float(np.mean([r["accuracy"] for r in run["results"]]))
        if run["family"] not in best or score > best[run["family"]]["_score"]:
            best[run["family"]] = {**run, "_score": score}
    rows = [row for family in config.families if family in best for row in _rows(best[family])]
    meta = {
        "config": config.to_json(),
        "runs": [{k: v for k, v in run.items() if k != "results"} for run in runs],
        "chosen_lr": {family: run["lr"] for family, run in best.items()},
        "notes": _training_notes(config, runs, best),
    }
    write_results(out / "mqar.json", "mqar", ["accuracy"], rows, meta)
    return write_report(out)


def run_sweep(config: MQARSweepConfig, out_dir: str | Path, jobs: int = 1) -> list[Path]:
    """Train and test every (family, lr) of ``config`` (``jobs`` of them at once, in separate processes), keep the
    best lr per family, write ``mqar.json`` and the report into ``out_dir``; returns the report files.

    The summary is rewritten as each run finishes, so a sweep cut short (a time limit) keeps what it finished.
    """
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_json(), indent=1))
    pairs = [(family, lr) for family in config.families for lr in config.lrs]
    paths: list[str] = []
    if jobs <= 1:
        steps = _budget_steps(config, lambda family: probe_step_seconds(family, config))
        for family, lr in pairs:
            paths.append(_job(family, lr, config, str(out), torch.get_num_threads(), steps))
            written = _write_summary(config, out, paths)
        _report_unequal(paths)
        return written
    # GPU runs need one host thread each for launching (more only spin, and starve whatever shares the machine).
    threads = 1 if config.device.startswith("cuda") else max(1, (os.cpu_count() or 1) // jobs)
    # spawn: CUDA cannot be used in forked children.
    spawn = get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool, contextlib.ExitStack() as stack:
        # The probes run at once, as the runs will (they share the device), one per family (its lrs step alike),
        # and time their steps together once all have warmed up, where every probe has a worker to run in.
        families = config.families if config.train_minutes is not None else ()
        barrier = None
        if 1 < len(families) <= jobs:
            barrier = stack.enter_context(spawn.Manager()).Barrier(len(families))
        probes = {family: pool.submit(_probe_job, family, config, threads, barrier) for family in families}
        steps = _budget_steps(config, lambda family: probes[family].result())
        futures = [pool.submit(_job, family, lr, config, str(out), threads, steps) for family, lr in pairs]
        for future in as_completed(futures):
            paths.append(future.result())
            written = _write_summary(config, out, paths)
    _report_unequal(paths)
    return written


def _budget_steps(config: MQARSweepConfig, probe: Callable[[str], float]) -> int | None:
    """The sweep's shared step count under ``config.train_minutes`` (None without a budget), printed with every
    family's probed time per step: ``probe(family)`` gives it."""
    if config.train_minutes is None:
        return None
    per_step = {family: probe(family) for family in config.families}
    planned = max(1, round(config.epochs * sum(_steps_per_setting(_train_data(config), config.batch_size))))
    steps, slowest = shared_steps(per_step, planned, config.train_minutes)
    probed = ", ".join(f"{family} {seconds * 1e3:.0f}" for family, seconds in per_step.items())
    print(
        f"probe (ms/step): {probed}; every run trains {steps} of {planned} planned steps "
        f"(what {slowest}, the slowest, fits into {config.train_minutes:g} min)",
        flush=True,
    )
    return steps


def _report_unequal(paths: Sequence[str]) -> None:
    for line in unequal_steps([json.loads(Path(p).read_text()) for p in paths]):
        print(line, flush=True)
