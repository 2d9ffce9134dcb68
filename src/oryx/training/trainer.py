"""The training loop: the paper's recipe (chunked mixed-mode training, AdamW, cosine LR) with exact resume.

One optimizer step:
    for each of `grad_accum` micro-steps:
        rows = next(data)                            # this rank's slice of the global micro-batch [b, T+1]
        modes = draw(global micro-batch)[rank slice] # from (seed, micro-step index): identical for any world size
        loss = CE(model(rows[:, :-1], modes), rows[:, 1:]) / grad_accum;  loss.backward()
    clip the gradient norm; AdamW step; LR scheduler step
    stop with TrainingDiverged if the loss or the gradient norm is not finite (nothing is saved)

Resuming restores the weights, AdamW, the scheduler, every RNG and the data position, and the modes depend only
on the step, so a resumed run repeats the uninterrupted one's losses exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from oryx import compat
from oryx.configuration import OryxConfig
from oryx.data import PackedDataset, load_tokenizer, load_tokens
from oryx.eval.perplexity import PerplexityResult, autocast, evaluate
from oryx.layers.common import no_decay_names
from oryx.modeling import OryxForCausalLM
from oryx.schedule import Schedule, parse
from oryx.training import checkpoint as ckpt
from oryx.training import distributed
from oryx.training.config import ConfigError, TrainConfig

METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final: dict[str, PerplexityResult]
    checkpoint: Path | None
    seconds: float


# --- model and optimizer ----------------------------------------------------------------------------------------
def model_config(config: TrainConfig, tokenizer: Any) -> OryxConfig:
    """The preset with the config's overrides, the tokenizer's vocabulary (padded to a multiple of 64 for fast
    matmuls) and its end-of-text id, and room for `seq_len` positions."""
    overrides = {
        key: getattr(config, key)
        for key in ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size")
        if getattr(config, key) is not None
    }
    eos = tokenizer.eos_token_id
    return OryxConfig.from_preset(
        config.preset,
        vocab_size=-(-len(tokenizer) // 64) * 64,
        max_position_embeddings=max(2048, config.seq_len),
        bos_token_id=eos,
        eos_token_id=eos,
        **overrides,
    )


def split_decay(
    model: nn.Module, decay_embeddings: bool = True
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) parameters by name. Not decayed: what the modules tag (`no_weight_decay`: norm weights,
    the recurrences' decay, step and skip parameters), biases, and the embedding when `decay_embeddings` is False. The
    tied LM head is the embedding and appears once."""
    tagged = no_decay_names(model)
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = {}, {}
    for name, param in model.named_parameters():
        skip = name in tagged or (id(param) in embedding and not decay_embeddings)
        (no_decay if skip else decay)[name] = param
    return decay, no_decay


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = split_decay(model, config.decay_embeddings)
    groups = [
        {"params": list(decay.values()), "weight_decay": config.weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=(config.beta1, config.beta2), eps=config.eps)


def lr_factor(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over `warmup_ratio` of the steps, then cosine from 1 down to `min_ratio` at the last step."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def use_every_parameter(model: OryxForCausalLM) -> None:
    """Make every mixer parameter take part in every forward (adding 0·Σp to the mixer output).

    A batch without attention tokens leaves the attention-only parameters unused (and vice versa). Then DDP would
    need its unused-parameter search, FSDP2's reduce-scatter would differ between ranks, and AdamW would skip those
    parameters (no moment or weight-decay update) in a single process but not under DDP. With a zero gradient
    instead, every configuration takes the same optimizer step.
    """

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + 0.0 * sum(p.sum() for p in module.parameters())

    for block in model.model.layers:
        block.mixer.register_forward_hook(hook)


class CpuThreads:
    """Torch's CPU thread count: `requested`, or kept at the cores other processes leave free (checked every
    `period` steps), shared by the ranks of this host, at least 1.

    Why: when another process keeps a core busy, torch's thread pool waits on its descheduled thread at every
    operation; on 2 cores beside one busy process we measured 10–30× slower steps with 2 threads, and none with 1.
    An automatic count follows the machine's load, so it is not bitwise reproducible; pass `threads` for that.
    """

    def __init__(self, requested: int | None, ranks: int = 1, period: int = 20) -> None:
        self.requested, self.ranks, self.period = requested, ranks, period
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(requested or self._free())

    def _free(self) -> int:
        return max(1, min(self.cores, round(self.cores - _busy_cores())) // self.ranks)

    def update(self, step: int) -> int:
        """Re-check the free cores every `period` steps (automatic count only); returns the thread count."""
        if self.requested is None and step % self.period == 0:
            free = self._free()
            if free != torch.get_num_threads():
                torch.set_num_threads(free)
        return torch.get_num_threads()


def _busy_cores(samples: int = 10, interval: float = 0.005) -> float:
    """How many other tasks are running, averaged over a few samples (Linux: /proc/loadavg's running count, which
    includes this process); elsewhere the 1-minute load average."""
    try:
        time.sleep(0.02)  # let this process's idle pool threads stop spinning, or they would count as busy
        counts = []
        for _ in range(samples):
            with open("/proc/loadavg") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)
            time.sleep(interval)
        return sum(counts) / samples
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def draw_modes(schedule: Schedule, rows: int, seq_len: int, seed: int, index: int) -> torch.Tensor:
    """Modes [rows, T] of micro-batch `index` of the run, from a generator seeded by (seed, index) only, so that a
    resumed run and any number of ranks draw the same ones."""
    generator = torch.Generator().manual_seed((seed << 32) + index)
    return schedule.modes(rows, seq_len, generator=generator)


# --- metrics ------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Append-only JSONL log (and TensorBoard scalars when installed and wanted), on the main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        self.fh = open(self.path, "a")  # noqa: SIM115 (open for the whole run; close() closes it)

    def _truncate(self, step: int) -> None:
        """Drop records after `step` (written by a run killed after its last checkpoint) and any torn last line."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# --- the run --------------------------------------------------------------------------------------------------------
def prepare_run_dir(config: TrainConfig, resume: str | None, overwrite: bool) -> Path | None:
    """Check the run folder before any work; returns the checkpoint to resume from (None for a fresh run).

    Raises:
        ConfigError: a fresh run into a folder that holds checkpoints (without `overwrite`), or `--resume` without
            a checkpoint.
        CheckpointError: the checkpoint to resume from is damaged (nothing is changed).
    """
    run_dir = Path(config.out_dir)
    if resume is not None:
        target = ckpt.latest(run_dir) if resume == "latest" else Path(resume)
        if target is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
        ckpt.verify(target)
        return target
    if (ckpt.list_checkpoints(run_dir) or (run_dir / METRICS).is_file()) and not overwrite:
        raise ConfigError(
            f"out_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out-dir"
        )
    return None


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run (or resume) training as configured; on the main rank, also write the report at the end.

    Args:
        config: the run's settings (checked here again before any work).
        resume: "latest" (the run folder's newest checkpoint), a checkpoint folder, or None for a fresh run.
        overwrite: allow a fresh run to replace an existing run folder.

    Raises:
        ConfigError, CheckpointError: before any work.
        TrainingDiverged: NaN/inf loss or gradient; the last good checkpoint is left as it was.
    """
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # our bar is enough; save_pretrained's would break it
    config.check()
    info = distributed.setup(config.device)
    try:
        return _train(config, info, resume, overwrite, started)
    finally:
        distributed.teardown(info)


def _train(
    config: TrainConfig, info: distributed.Dist, resume: str | None, overwrite: bool, started: float
) -> TrainResult:
    rows_per_rank = config.batch_size // config.grad_accum // info.world_size
    if config.batch_size % (config.grad_accum * info.world_size):
        raise ConfigError(
            f"batch_size ({config.batch_size}) must be a multiple of grad_accum × ranks "
            f"({config.grad_accum} × {info.world_size})"
        )
    resume_from = prepare_run_dir(config, resume, overwrite)
    run_dir = Path(config.out_dir)
    if info.is_main:
        if resume_from is None and overwrite:
            for name in (ckpt.CHECKPOINTS, "report", "tensorboard"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            (run_dir / METRICS).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(run_dir)
        (run_dir / "train_config.yaml").write_text(config.to_yaml())
    threads = CpuThreads(config.threads, info.world_size) if info.device.type == "cpu" else None

    # Tokenizer and token cache: the main rank builds them, the others then read the cached files.
    tokenizer = train_tokens = val_tokens = None
    for turn in (0, 1):
        if info.is_main == (turn == 0):
            tokenizer = load_tokenizer(config.tokenizer)
            train_tokens = load_tokens(config.train_data, tokenizer, text_field=config.text_field)
            val_tokens = load_tokens(config.val_data, tokenizer, text_field=config.text_field)
        info.barrier()

    torch.manual_seed(config.seed)
    model = OryxForCausalLM(model_config(config, tokenizer))
    state = None
    if resume_from is not None:
        state = ckpt.read(resume_from)
        if compat.is_legacy(state.model_state):  # written by Oryx 0.1.0: parameter names of that layout
            state.model_state = compat.upgrade_state(state.model_state, model.config)
            state.optimizer_state = compat.upgrade_optimizer_state(state.optimizer_state, model.config)
        missing, unexpected = model.load_state_dict(state.model_state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is saved once, as the embedding
            raise ckpt.CheckpointError(
                f"checkpoint {resume_from} does not fit this model: missing {missing}, unexpected {unexpected}"
            )
    model.to(info.device)
    if model.config.is_oryx:
        use_every_parameter(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = distributed.wrap(model, info, config.parallel)
    if config.compile:
        wrapped = torch.compile(wrapped)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor, total=config.steps, warmup_ratio=config.warmup_ratio, min_ratio=config.min_lr_ratio
        ),
    )
    data = PackedDataset(
        train_tokens, config.seq_len, rows_per_rank, seed=config.seed, rank=info.rank, world_size=info.world_size
    )
    step = 0
    if state is not None:
        set_optimizer_state_dict(
            model, optimizer, state.optimizer_state, options=StateDictOptions(full_state_dict=True)
        )
        scheduler.load_state_dict(state.scheduler_state)
        data.load_state_dict(state.trainer_state["data"])
        if len(state.rng_states) != info.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint {resume_from} was written by {len(state.rng_states)} ranks; resume it with as many"
            )
        ckpt.set_rng_state(state.rng_states[info.rank])
        step = state.trainer_state["step"]
        del state

    log = MetricsLog(run_dir, info.is_main, config.tensorboard, None if resume_from is None else step)
    log.write({"kind": "start", "step": step, "device": str(info.device), "ranks": info.world_size})
    schedule = parse(config.schedule_spec)
    tokens_per_step = config.batch_size * config.seq_len
    last_checkpoint = resume_from
    final: dict[str, PerplexityResult] = {}
    bar = tqdm(
        total=config.steps,
        initial=step,
        unit="step",
        disable=not (config.progress and info.is_main),
        dynamic_ncols=True,
    )
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        tqdm.write(
            f"{config.preset}: {n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
            f"{len(train_tokens):,} training tokens; {config.steps} steps × {tokens_per_step:,} tokens, "
            f"schedule {schedule}, peak lr {config.peak_lr:g}, {info.world_size} rank(s) on {info.device}"
            + (
                f" ({torch.get_num_threads()} threads{' to start with' if config.threads is None else ''})"
                if threads
                else ""
            )
        )
    try:
        while step < config.steps:
            cpu_threads = threads.update(step) if threads else None
            tick = time.perf_counter()
            loss, grad_norm = _step(wrapped, model, data, schedule, optimizer, config, info, rows_per_rank, step)
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                where = (
                    f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                )
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm} (lr {lr:.3g}); "
                    f"stopped without saving, {where}. Lower --lr or raise --warmup-ratio, then --resume."
                )
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - tick
            log.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
                       "threads": cpu_threads})  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            done = step == config.steps
            if step % config.eval_every == 0 or done:
                results = _validate(wrapped, val_tokens, config, info, rows_per_rank, tokenizer if done else None)
                record = {"kind": "final" if done else "eval", "step": step}
                for name, result in results.items():
                    record[f"val_loss_{name}"], record[f"val_ppl_{name}"] = result.nll, result.perplexity
                    if result.bytes:
                        record[f"val_bpb_{name}"] = result.bits_per_byte
                    record["val_tokens"] = result.tokens
                log.write(record)
                if info.is_main:
                    tqdm.write(f"step {step}: validation perplexity " + ", ".join(
                        f"{name} {r.perplexity:.2f}" for name, r in results.items()))  # fmt: skip
                if done:
                    final = results
            if step % config.save_every == 0 or done:
                last_checkpoint = _save(run_dir, step, model, optimizer, scheduler, tokenizer, data, config, info)
    finally:
        bar.close()
        log.close()
    return TrainResult(run_dir, step, final, last_checkpoint, time.perf_counter() - started)


def _step(
    wrapped: nn.Module,
    model: nn.Module,
    data: PackedDataset,
    schedule: Schedule,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    info: distributed.Dist,
    rows: int,
    step: int,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss over ranks, gradient norm)."""
    wrapped.train()
    total = torch.zeros((), device=info.device)
    global_rows = rows * info.world_size
    for micro in range(config.grad_accum):
        batch = next(data).to(info.device)  # [rows, T+1]
        modes = draw_modes(schedule, global_rows, config.seq_len, config.seed, step * config.grad_accum + micro)
        modes = modes[info.rank * rows : (info.rank + 1) * rows].to(info.device)
        with (
            distributed.gradient_sync(wrapped, micro == config.grad_accum - 1),
            autocast(info.device, config.precision),
        ):
            logits = wrapped(batch[:, :-1], modes=modes).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        (loss / config.grad_accum).backward()
        total += loss.detach() / config.grad_accum
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss_value = info.mean(total).item()
    if math.isfinite(loss_value) and math.isfinite(grad_norm.item()):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm.item()


def _validate(
    wrapped: nn.Module,
    val_tokens: Any,
    config: TrainConfig,
    info: distributed.Dist,
    rows: int,
    tokenizer: Any,
) -> dict[str, PerplexityResult]:
    """Validation perplexity in each mode (attention-only and linear-only; a baseline's one mode), on the same
    windows every time; with `tokenizer`, bits per byte too."""
    wrapped.eval()
    results = {
        name: evaluate(
            wrapped,
            val_tokens,
            config.seq_len,
            spec,
            batch_size=max(rows, 4),
            max_tokens=config.eval_tokens,
            tokenizer=tokenizer,
            precision=config.precision,
            rank=info.rank,
            world_size=info.world_size,
            reduce=info.sum,
        )
        for name, spec in config.eval_modes.items()
    }
    wrapped.train()
    return results


def _save(
    run_dir: Path,
    step: int,
    model: OryxForCausalLM,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tokenizer: Any,
    data: PackedDataset,
    config: TrainConfig,
    info: distributed.Dist,
) -> Path:
    """Gather the full model and optimizer state (a collective under FSDP) and write a checkpoint on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng_states = info.gather_objects(ckpt.rng_state())
    path = ckpt.step_dir(run_dir, step)
    if info.is_main:
        path = ckpt.save(
            run_dir,
            step,
            model=model,
            model_state=model_state,
            tokenizer=tokenizer,
            optimizer_state=optimizer_state,
            scheduler_state=scheduler.state_dict(),
            rng_states=rng_states,
            trainer_state={
                "step": step,
                "tokens": step * config.batch_size * config.seq_len,
                "data": data.state_dict(),
                "world_size": info.world_size,
            },
            train_config=config.to_yaml(),
            keep=config.keep_checkpoints,
        )
    info.barrier()
    return path
