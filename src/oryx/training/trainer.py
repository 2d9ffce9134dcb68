"""The training loop: the paper's recipe (chunked mixed-mode training, AdamW, cosine LR) with exact resume.

One optimizer step:
    for each of `grad_accum` micro-steps:
        rows = next(data)                            # this rank's slice of the global micro-batch [b, T+1]
        modes = draw(global micro-batch)[rank slice] # from (seed, micro-step index): identical for any world size
        loss = CE(model(rows[:, :-1], modes), rows[:, 1:]) / grad_accum;  loss.backward()
                                                     # (CE `loss_chunk_tokens` at a time: no [b·T, V] logits)
    clip the gradient norm; AdamW step; LR scheduler step
    stop with TrainingDiverged if the loss or the gradient norm is not finite (nothing is saved)

Validation runs every `eval_every` steps and before every checkpoint, so each checkpoint's weights had a finite
validation perplexity; a non-finite one (a loss above ~709 nats is perplexity inf) is a divergence too. After a
divergence `latest` names the newest checkpoint whose weights came before the failure, from which
`--resume --change-schedule --lr ...` continues with a lower learning rate (recorded in the run's history).

Before the run folder is touched, everything that can be checked is: the folder (`runfolder`: another writer,
files that are not Oryx's), the checkpoint to resume from, the data (its token ids against the vocabulary, its
fingerprint against the checkpoint's), the model's shape and its memory. Then the main rank locks the folder.

Resuming restores the weights, AdamW, the scheduler, every RNG and the data position, and the modes depend only
on the step, so a resumed run repeats the uninterrupted one's losses exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from oryx import checkpoint as ckpt
from oryx import compat
from oryx.cli_common import UsageError
from oryx.configuration import OryxConfig
from oryx.data import PackedDataset, check_token_ids, fingerprint, load_tokenizer, load_tokens
from oryx.data.checks import fingerprint_change
from oryx.eval.perplexity import PerplexityResult, autocast, evaluate
from oryx.modeling import OryxForCausalLM
from oryx.optim import adamw, lr_factor
from oryx.schedule import Schedule, parse
from oryx.training import distributed, runfolder
from oryx.training.config import SCHEDULE_KEYS, ConfigError, TrainConfig
from oryx.training.metrics import MetricsLog
from oryx.training.report import write_report


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final: dict[str, PerplexityResult]
    checkpoint: Path | None
    seconds: float
    report: Path | None = None  # summary.md of the report folder, when the config asks for one (main rank)


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
    operation, which slows every step many times over (benchmarks/RESULTS.md, "CPU threads beside a busy core").
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


# --- the run --------------------------------------------------------------------------------------------------------
class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; `checkpoint` is the newest one it can resume from (None: none yet)."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__("interrupted")
        self.checkpoint = checkpoint


def train(
    config: TrainConfig,
    resume: str | None = None,
    overwrite: bool = False,
    *,
    verify: bool = True,
    accept_data_change: bool = False,
) -> TrainResult:
    """Run (or resume) training as configured; on the main rank, also write the report at the end (`config.report`).

    Args:
        config: the run's settings (checked here again before any work).
        resume: "latest" (the run folder's newest checkpoint), a checkpoint folder, or None for a fresh run.
        overwrite: let a fresh run replace the previous run in its folder: what that run wrote is moved aside and
            deleted once the new run's first checkpoint is saved (restored if it stops before); other files stay.
        verify: check the checkpoint to resume from against its checksums (False: load it unverified).
        accept_data_change: resume even though the data's fingerprint differs from the checkpoint's.

    Raises:
        ConfigError, CheckpointError: before the run folder is changed (bad settings or data, a folder another
            process is writing, a damaged checkpoint).
        TrainingDiverged: a non-finite loss, gradient norm or validation perplexity; `latest` then names the last
            checkpoint a lower learning rate can start from.
        TrainingInterrupted: Ctrl-C.
    """
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # our bar is enough; save_pretrained's would break it
    config.check()
    info = distributed.setup(config.device)
    try:
        return _train(config, info, resume, overwrite, verify, accept_data_change, started)
    finally:
        distributed.teardown(info)


def on_main(info: distributed.Dist, fn: Any, then_others: bool = False) -> Any:
    """`fn()` on the main rank (then on the others with `then_others`, e.g. to read what it cached); a UsageError
    there is raised on every rank, so no rank waits forever in a collective."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except UsageError as err:
            error = err
    message = info.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message)
    if then_others and not info.is_main:
        result = fn()
    return result


def _as_config_error(key: str, fn: Any, source: Any = None) -> Any:
    """`fn()`, with a data or model error turned into a ConfigError naming the setting `key` (and its value
    `source`, unless the message names it already)."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, TypeError) as err:
        where = key if source is None or str(source) in str(err) else f"{key} {source}"
        raise ConfigError(f"{where}: {err}") from None


def _load_data(config: TrainConfig) -> tuple[Any, Any, Any]:
    tokenizer = _as_config_error("tokenizer", lambda: load_tokenizer(config.tokenizer), config.tokenizer)
    train_tokens, val_tokens = (
        _as_config_error(
            key,
            lambda key=key: load_tokens(getattr(config, key), tokenizer, text_field=config.text_field),
            getattr(config, key),
        )
        for key in ("train_data", "val_data")
    )
    return tokenizer, train_tokens, val_tokens


def _train(
    config: TrainConfig,
    info: distributed.Dist,
    resume: str | None,
    overwrite: bool,
    verify: bool,
    accept_data_change: bool,
    started: float,
) -> TrainResult:
    rows_per_rank = config.batch_size // config.grad_accum // info.world_size
    if config.batch_size % (config.grad_accum * info.world_size):
        raise ConfigError(
            f"batch_size ({config.batch_size}) must be a multiple of grad_accum × ranks "
            f"({config.grad_accum} × {info.world_size})"
        )
    config.uses_cuda_graphs(info.device.type, info.world_size)  # its ConfigError before the run folder changes
    run_dir = Path(config.out_dir)
    with contextlib.ExitStack() as stack:
        # The main rank locks the run folder for the whole run; an Oryx run's folder (it has the marker) is locked
        # first, so that another process writing it is named before anything of it is read. Any other folder is
        # locked once everything is checked, still before anything is written.
        def lock() -> None:
            stack.enter_context(runfolder.RunLock(run_dir))  # reentrant: taking it twice is harmless

        if info.broadcast_object((run_dir / runfolder.MARKER).is_file()):
            on_main(info, lock)
        # Everything that can fail is checked before the run folder changes: the folder, the checkpoint, the data,
        # the model's shape and its memory.
        resume_from = on_main(info, lambda: _checkpoint_to_resume(run_dir, resume, overwrite, verify))
        resume_from = info.broadcast_object(resume_from)
        tokenizer, train_tokens, val_tokens = on_main(info, lambda: _load_data(config), then_others=True)
        cfg = _as_config_error("model", lambda: model_config(config, tokenizer))
        check_memory(config, cfg, rows_per_rank, info.device)
        for key, tokens in (("train_data", train_tokens), ("val_data", val_tokens)):
            source = getattr(config, key)
            _as_config_error(key, lambda t=tokens, s=source: check_token_ids(t, cfg.vocab_size, str(s)), source)
        data = _as_config_error(
            "train_data",
            lambda: PackedDataset(
                train_tokens, config.seq_len, rows_per_rank, seed=config.seed, rank=info.rank,
                world_size=info.world_size,
            ),
            config.train_data,
        )  # fmt: skip
        fingerprints = {"train_data": fingerprint(train_tokens), "val_data": fingerprint(val_tokens)}
        state = None
        if resume_from is not None:
            state = ckpt.read(resume_from, verify=verify)
            _check_fingerprints(state, fingerprints, accept_data_change)

        on_main(info, lock)
        replacement = on_main(info, lambda: _prepare_run_dir(config, run_dir, resume_from is not None, overwrite))
        try:
            session = _setup(config, info, run_dir, tokenizer, cfg, val_tokens, data, rows_per_rank, state, resume_from)
            if state is not None:
                _resume(session, state, resume_from, fingerprints, accept_data_change)
                del state  # the checkpoint's tensors: the model and AdamW hold their own copies now
            result = _loop(session, resume_from, fingerprints, replacement, started)
            if config.report and info.is_main:  # still under the lock
                result.report = write_report(run_dir, config, started)
            return result
        except BaseException:
            if replacement is not None and replacement.folder.exists():
                replacement.restore()  # stopped before its first checkpoint: the previous run is back
            raise


def _checkpoint_to_resume(run_dir: Path, resume: str | None, overwrite: bool, verify: bool) -> Path | None:
    """The checkpoint to resume from (verified unless `verify` is False), or None for a fresh run, after checking
    that a fresh run may start in `run_dir`. Changes nothing."""
    if resume is None:
        runfolder.check_fresh_run(run_dir, overwrite)
        return None
    if resume == "latest":
        target = ckpt.latest(run_dir)
        if target is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    else:
        target = Path(resume)
        if not target.exists():
            raise ConfigError(f"--resume: {target} does not exist")
    if verify:
        ckpt.verify(target)
    else:
        print(f"warning: resuming from {target} unverified (--no-verify): its files are not checked", file=sys.stderr)
    return target


def _prepare_run_dir(
    config: TrainConfig, run_dir: Path, resuming: bool, overwrite: bool
) -> runfolder.RunReplacement | None:
    """Under the lock: settle what a killed run left, move a replaced run aside, write the config."""
    for note in runfolder.settle_replacements(run_dir):
        tqdm.write(f"note: {note}", file=sys.stderr)
    replacement = None
    if not resuming:
        if overwrite:
            replacement = runfolder.replace_run(run_dir)
        else:
            runfolder.check_fresh_run(run_dir, overwrite=False)  # again, now that no other process can write
    if replacement is not None:
        tqdm.write(
            f"note: --overwrite moved the previous run aside to {replacement.folder}; it is deleted once the new run "
            "saves its first checkpoint, and put back if the new run stops before",
            file=sys.stderr,
        )
        kept = replacement.kept
        if kept:
            shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
            tqdm.write(f"note: --overwrite kept {len(kept)} file(s) oryx train did not write: {shown}", file=sys.stderr)
    ckpt.remove_temporaries(run_dir)
    (run_dir / ckpt.TRAIN_CONFIG).write_text(config.to_yaml())
    runfolder.record(run_dir, ckpt.TRAIN_CONFIG)
    return replacement


def _check_fingerprints(state: ckpt.Checkpoint, current: dict[str, Any], accept: bool) -> None:
    saved = state.trainer_state.get("data_fingerprint")
    if saved is None:  # a checkpoint from before fingerprints: nothing to compare
        return
    saved_config = TrainConfig.from_yaml_text(state.train_config)
    for key, value in current.items():
        change = fingerprint_change(saved.get(key, value), value)
        if change is not None and not accept:
            raise ConfigError(
                f"{key} {getattr(saved_config, key)} changed since checkpoint {state.path} was written: {change}; "
                "resuming would continue on other tokens. Restore the data, or pass --accept-data-change to "
                "resume on it knowingly (recorded in the run's history)"
            )


def check_memory(config: TrainConfig, model_cfg: OryxConfig, rows: int, device: torch.device) -> None:
    """Refuse, before any work, a run whose micro-batch clearly cannot fit in the machine's memory."""
    need = activation_bytes(model_cfg, rows, config.seq_len, config.gradient_checkpointing)
    have = total_memory(device)
    if have is not None and need > have:
        raise ConfigError(
            f"seq_len {config.seq_len}: one micro-batch of {rows} sequences needs about {need / 2**30:,.0f} GiB "
            f"for its activations and logits alone, but {device} has {have / 2**30:,.0f} GiB; lower --seq-len or "
            "--batch-size, or raise --grad-accum"
        )


def activation_bytes(cfg: OryxConfig, rows: int, seq_len: int, checkpointing: bool = False) -> int:
    """A conservative (low) estimate of one training micro-batch's memory: fp32 logits and their gradient, and per
    layer a few [tokens, hidden] activations kept for the backward pass (fewer with gradient checkpointing)."""
    tokens = rows * seq_len
    per_layer = 2 if checkpointing else 8
    return 4 * tokens * (2 * cfg.vocab_size + per_layer * cfg.num_hidden_layers * cfg.hidden_size)


def total_memory(device: torch.device) -> int | None:
    """The device's total memory in bytes (RAM and swap for the CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    swap = 0
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        swap = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("SwapTotal"))
    return ram + swap


def _resume_changes(config: TrainConfig, state: ckpt.Checkpoint) -> dict[str, list[Any]]:
    """The schedule settings that differ from the checkpoint's run: {key: [saved, now]}."""
    saved = TrainConfig.from_yaml_text(state.train_config)
    changes = {
        k: [getattr(saved, k), getattr(config, k)] for k in SCHEDULE_KEYS if getattr(saved, k) != getattr(config, k)
    }
    if "lr" in changes:
        changes["lr"] = [saved.peak_lr, config.peak_lr]
    return changes


def _apply_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig, step: int) -> None:
    """Point the restored optimizer and scheduler at the config's peak lr, warm-up, floor and weight decay."""
    factor = lr_factor(step, config.steps, config.warmup_ratio, config.min_lr_ratio)
    scheduler.base_lrs = [config.peak_lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.peak_lr
        group["lr"] = config.peak_lr * factor
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # group 1 takes no weight decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


@dataclass
class _Session:
    """What one training process works with: set up by `_setup`, advanced to a checkpoint by `_resume`, trained by
    `_loop`."""

    config: TrainConfig
    info: distributed.Dist
    run_dir: Path
    tokenizer: Any
    val_tokens: Any
    data: PackedDataset
    rows_per_rank: int
    model: OryxForCausalLM
    wrapped: nn.Module  # the model as trained: DDP/FSDP-wrapped and compiled when asked
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cuda_graphs: bool = False  # the compiled blocks replay from CUDA graphs (TrainConfig.uses_cuda_graphs)
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # resumes and their changes, kept in checkpoints
    start_record: dict[str, Any] = field(default_factory=dict)  # what the run's "start" metrics record adds


def _setup(
    config: TrainConfig,
    info: distributed.Dist,
    run_dir: Path,
    tokenizer: Any,
    cfg: OryxConfig,
    val_tokens: Any,
    data: PackedDataset,
    rows_per_rank: int,
    state: ckpt.Checkpoint | None,
    resume_from: Path | None,
) -> _Session:
    """The model (with the checkpoint's weights when resuming), its wrapping for the ranks, AdamW and the schedule."""
    torch.manual_seed(config.seed)
    model = OryxForCausalLM(cfg)
    if state is not None:
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
    # Regional: one graph for all the blocks, compiled before the ranks' wrapping (as torchtitan).
    # CUDA graphs take the host's launch cost out of a compiled step (config.uses_cuda_graphs says when they can).
    graphs = config.uses_cuda_graphs(info.device.type, info.world_size)
    if config.compiles(info.device.type):
        model.compile_blocks(cuda_graphs=graphs)
    wrapped = distributed.wrap(model, info, config.parallel)
    optimizer = adamw(
        model, config.peak_lr, config.weight_decay, (config.beta1, config.beta2), config.eps, config.decay_embeddings
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor, total=config.steps, warmup_ratio=config.warmup_ratio, min_ratio=config.min_lr_ratio
        ),
    )
    return _Session(config, info, run_dir, tokenizer, val_tokens, data, rows_per_rank, model, wrapped, optimizer,
                    scheduler, graphs)  # fmt: skip


def _resume(
    session: _Session,
    state: ckpt.Checkpoint,
    resume_from: Path | None,
    fingerprints: dict[str, Any],
    accept_data_change: bool,
) -> None:
    """Restore AdamW, the schedule, the data position and every RNG from `state`; apply and record the schedule
    changes the resume asked for."""
    config, info, data = session.config, session.info, session.data
    set_optimizer_state_dict(
        session.model, session.optimizer, state.optimizer_state, options=StateDictOptions(full_state_dict=True)
    )
    session.scheduler.load_state_dict(state.scheduler_state)
    position = dict(state.trainer_state["data"])
    if accept_data_change and position.get("num_windows") != data.num_windows:
        # Other data, knowingly: the same epoch, at the same batch or the epoch's end, in the new windows.
        position.update(num_windows=data.num_windows, step=min(position["step"], data.batches_per_epoch))
    try:
        data.load_state_dict(position)
    except ValueError as err:
        raise ConfigError(f"--resume {resume_from}: {err}") from None
    if len(state.rng_states) != info.world_size:
        raise ckpt.CheckpointError(
            f"checkpoint {resume_from} was written by {len(state.rng_states)} ranks; resume it with as many"
        )
    ckpt.set_rng_state(state.rng_states[info.rank])
    session.step = step = state.trainer_state["step"]
    changes = _resume_changes(config, state)
    if changes:
        _apply_schedule(session.optimizer, session.scheduler, config, step)
    saved_prints = state.trainer_state.get("data_fingerprint")
    data_changed = sorted(k for k in fingerprints if saved_prints and saved_prints.get(k) != fingerprints[k])
    session.history = list(state.trainer_state.get("history", []))
    session.start_record = {"resumed_from": str(resume_from), "changes": changes, "data_changed": data_changed}
    session.history.append({"step": step, **session.start_record})


def _loop(
    session: _Session,
    resume_from: Path | None,
    fingerprints: dict[str, Any],
    replacement: runfolder.RunReplacement | None,
    started: float,
) -> TrainResult:
    """Train from `session.step` to the last step: validate at every evaluation and before every checkpoint, stop on
    divergence or Ctrl-C with the checkpoint to resume from."""
    config, info, run_dir, model, optimizer = (
        session.config,
        session.info,
        session.run_dir,
        session.model,
        session.optimizer,
    )
    threads = CpuThreads(config.threads, info.world_size) if info.device.type == "cpu" else None
    step = session.step
    log = MetricsLog(run_dir, info.is_main, config.tensorboard, None if resume_from is None else step)
    log.write({"kind": "start", "step": step, "device": str(info.device), "ranks": info.world_size,
               **session.start_record})  # fmt: skip
    schedule = parse(config.schedule_spec)
    tokens_per_step = config.batch_size * config.seq_len
    last_checkpoint = resume_from
    saved_here: list[Path] = []  # checkpoints this process wrote
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
            f"{len(session.data.tokens):,} training tokens; {config.steps} steps × {tokens_per_step:,} tokens, "
            f"schedule {schedule}, peak lr {config.peak_lr:g}, {info.world_size} rank(s) on {info.device}"
            + (
                f" ({torch.get_num_threads()} threads{' to start with' if config.threads is None else ''})"
                if threads
                else ""
            )
        )
    first_step = step  # this process's first step pays for compiling and kernel tuning: reported on its own
    try:
        while step < config.steps:
            cpu_threads = threads.update(step) if threads else None
            tick = time.perf_counter()
            loss, grad_norm = _step(session.wrapped, model, session.data, schedule, optimizer, config, info,
                                    session.rows_per_rank, step, session.cuda_graphs)  # fmt: skip
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # The loss of step k is computed with the weights after step k−1: a checkpoint of step k−1 holds
                # weights that already fail, so only an older one can take a lower learning rate.
                raise _diverged(run_dir, info, step + 1, step, f"loss {loss}, gradient norm {grad_norm} (lr {lr:.3g})")
            session.scheduler.step()
            step += 1
            seconds = time.perf_counter() - tick
            log.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / seconds,
                       "threads": cpu_threads})  # fmt: skip
            if step == first_step + 1:
                compiled = config.compiles(info.device.type)
                log.write({"kind": "first_step", "step": step, "seconds": seconds, "compiled": compiled,
                           "cuda_graphs": session.cuda_graphs})  # fmt: skip
                if info.is_main:
                    tqdm.write(f"first step: {seconds:.1f} s" + " (compiling, tuning kernels)" * compiled)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}")
            done = step == config.steps
            saving = step % config.save_every == 0 or done
            if step % config.eval_every == 0 or saving:  # every checkpoint is validated before it is written
                results = _validate(session.wrapped, session.val_tokens, config, info, session.rows_per_rank,
                                    session.tokenizer if done else None)  # fmt: skip
                log.write(_validation_record(results, step, done))
                if info.is_main:
                    tqdm.write(f"step {step}: validation perplexity " + ", ".join(
                        f"{name} {r.perplexity:.2f}" for name, r in results.items()))  # fmt: skip
                if not all(math.isfinite(r.perplexity) for r in results.values()):
                    where = ", ".join(f"{name} {r.perplexity}" for name, r in results.items())
                    raise _diverged(run_dir, info, step, step, f"validation perplexity {where}")
                if done:
                    final = results
            if saving:
                extra = {"data_fingerprint": fingerprints, "history": session.history}
                last_checkpoint = _save(run_dir, step, model, optimizer, session.scheduler, session.tokenizer,
                                        session.data, config, info, extra)  # fmt: skip
                saved_here.append(last_checkpoint)
                if replacement is not None and info.is_main:
                    replacement.commit()  # the new run has a checkpoint: the previous one goes for good
                    replacement = None
    except KeyboardInterrupt:
        raise TrainingInterrupted(saved_here[-1] if saved_here else resume_from) from None
    finally:
        bar.close()
        log.close()
    return TrainResult(run_dir, step, final, last_checkpoint, time.perf_counter() - started)


def _validation_record(results: dict[str, PerplexityResult], step: int, done: bool) -> dict[str, Any]:
    """The metrics record of a validation: loss, perplexity and (at the end) bits per byte of each mode."""
    record: dict[str, Any] = {"kind": "final" if done else "eval", "step": step}
    for name, result in results.items():
        record[f"val_loss_{name}"], record[f"val_ppl_{name}"] = result.nll, result.perplexity
        if result.bytes:
            record[f"val_bpb_{name}"] = result.bits_per_byte
        record["val_tokens"] = result.tokens
    return record


def _diverged(run_dir: Path, info: distributed.Dist, step: int, first_bad: int, what: str) -> TrainingDiverged:
    """Set checkpoints from step `first_bad` on aside (their weights fail), point `latest` at the newest older one,
    and describe it all. Main rank; the others wait."""
    good = None
    if info.is_main:
        good = ckpt.set_aside_from(run_dir, first_bad)
    info.barrier()
    if good is None:
        where = "no checkpoint from before the divergence is left, so start again"
    else:
        where = (
            f"the last good checkpoint is {good} (validated; `latest` names it). Resume from it with a lower "
            f"learning rate or a longer warm-up: oryx train --resume --out-dir {run_dir} --change-schedule "
            "--lr <lower> (or --warmup-ratio <larger>)"
        )
    return TrainingDiverged(f"training diverged at step {step}: {what}; stopped without saving; {where}")


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
    cuda_graphs: bool,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss over ranks, gradient norm)."""
    wrapped.train()
    total = torch.zeros((), device=info.device)
    global_rows = rows * info.world_size
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead: replay over them
    for micro in range(config.grad_accum):
        batch = next(data).to(info.device)  # [rows, T+1]
        modes = draw_modes(schedule, global_rows, config.seq_len, config.seed, step * config.grad_accum + micro)
        modes = modes[info.rank * rows : (info.rank + 1) * rows].to(info.device)
        with (
            distributed.gradient_sync(wrapped, micro == config.grad_accum - 1),
            autocast(info.device, config.precision),
        ):
            chunk = config.loss_chunk_tokens  # > 0: the loss without the [rows·T, V] logits (oryx.ops.cross_entropy)
            loss = wrapped(batch[:, :-1], modes=modes, shift_labels=batch[:, 1:], loss_chunk_tokens=chunk).loss
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
    extra: dict[str, Any],
) -> Path:
    """Gather the full model and optimizer state (a collective under FSDP) and write a checkpoint on rank 0;
    `extra` joins the trainer state (the data's fingerprint, the run's history)."""
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
                **extra,
            },
            train_config=config.to_yaml(),
            keep=config.keep_checkpoints,
        )
    info.barrier()
    return path
