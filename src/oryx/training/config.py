"""`TrainConfig`: every setting of `oryx train`, from defaults, a YAML file and command-line flags (in that order).

Each field is one YAML key and one flag (`seq_len` ↔ `--seq-len`). `check()` validates types, choices and data
paths before any work starts, and every error names the key:

    >>> cfg = TrainConfig.from_dict({"steps": 100, "lr": 3e-3})
    >>> TrainConfig.from_dict({"step": 100})
    ConfigError: unknown config key 'step' (did you mean 'steps'?)

Defaults are the paper's recipe (docs/paper.md §4, docs/design.md §8) at a size that trains on a 2-core CPU in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oryx.cli_common import SEED_LIMIT, UsageError, resolve_device
from oryx.configuration import OryxConfig, preset_names
from oryx.data.corpus import CORPORA
from oryx.schedule import Adaptive, Fixed, parse
from oryx.variants import FAMILIES, MODE_NAMES, Variant

TRAINING_MIX = "chunks:size=128,p_attn=0.25"
# GPT-3's peak LR by size (docs/paper.md §4.1); Oryx trains at 10x it, the baselines at 5x. The CPU sizes take the
# smallest GPT-3's (125M), the closest in scale (benchmarks/RESULTS.md has the default run at two peak LRs).
GPT3_LR = {"130m": 6e-4, "380m": 3e-4, "810m": 2.5e-4, "1.4b": 2e-4, "tiny": 6e-4, "small": 6e-4, "medium": 6e-4}


# Settings a resumed run may change when asked explicitly (`oryx train --resume --change-schedule`): they shape the
# optimizer's steps from here on, not the state saved so far. Each change is recorded in the run's history.
SCHEDULE_KEYS = ("lr", "warmup_ratio", "min_lr_ratio", "grad_clip", "weight_decay")


# Settings added after runs were saved without them, with the value that continues such a run as it was trained
# (a resumed run keeps its numerics; a new run gets the field's default).
BEFORE_THEY_EXISTED = {"loss_chunk_tokens": 0}


class ConfigError(UsageError, ValueError):
    """A bad training config; the message names the key."""


def _opt(default: Any, help: str, group: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its help text, its --help group and (for strings) its allowed values."""
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """All settings of a training run. See `oryx train --help` for each field's meaning."""

    # model
    preset: str = _opt("oryx-tg-tiny", "model preset <family>-<size> (oryx info lists them)", "model")
    hidden_size: int | None = _opt(None, "override the preset's hidden size", "model")
    num_hidden_layers: int | None = _opt(None, "override the preset's number of layers", "model")
    head_dim: int | None = _opt(None, "override the preset's head dimension", "model")
    intermediate_size: int | None = _opt(
        None, "override the MLP width (default ≈ 8D/3, matched for baselines)", "model"
    )
    gradient_checkpointing: bool = _opt(False, "recompute each block in the backward pass to save memory", "model")
    compile: bool | None = _opt(
        None, "torch.compile every block and the loss (regional compilation, fullgraph); unset: on CUDA only", "model"
    )
    cuda_graphs: bool | None = _opt(
        None,
        "replay each compiled block from a CUDA graph (no host cost per kernel launch); unset: on when the run "
        "compiles on CUDA in one process without gradient accumulation",
        "model",
    )
    loss_chunk_tokens: int = _opt(
        4096, "compute the loss this many tokens at a time, never all [tokens, vocab] logits (0 = all at once)", "model"
    )
    # data
    train_data: str = _opt("prose:train", "training text: prose:<split>, a .txt/.jsonl/.bin file or a folder", "data")
    val_data: str = _opt("prose:validation", "validation text (same forms as train_data)", "data")
    text_field: str = _opt("text", "the JSONL key / dataset column holding the text", "data")
    tokenizer: str = _opt("bpe:4096", "gpt2, byte, bpe:<vocab> (trained on the embedded corpus) or a path", "data")
    seq_len: int = _opt(512, "tokens per training sequence", "data")
    batch_size: int = _opt(8, "global batch in sequences per optimizer step (split over ranks and micro-steps)", "data")
    grad_accum: int = _opt(1, "micro-steps per optimizer step (gradient accumulation)", "data")
    # modes
    schedule: str | None = _opt(
        None,
        f"training mode schedule; default {TRAINING_MIX!r} for Oryx and the only mode for a baseline; "
        "'attn'/'linear' for single-mode training, 'chunks:size=N,p_attn=1' style for sequence-level mixing",
        "modes",
    )
    # optimizer
    steps: int = _opt(500, "optimizer steps", "optimizer")
    lr: float | None = _opt(None, "peak learning rate; default 10x GPT-3's for Oryx, 5x for baselines", "optimizer")
    min_lr_ratio: float = _opt(0.1, "the cosine schedule ends at lr * min_lr_ratio", "optimizer")
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent in linear warmup", "optimizer")
    weight_decay: float = _opt(0.1, "AdamW weight decay (never on norms, biases, A_log, dt_bias, D)", "optimizer")
    decay_embeddings: bool = _opt(
        True, "weight-decay the (tied) embedding matrix too, as GPT-2/nanoGPT do with their tied head", "optimizer"
    )
    beta1: float = _opt(0.9, "AdamW beta1", "optimizer")
    beta2: float = _opt(0.95, "AdamW beta2", "optimizer")
    eps: float = _opt(1e-8, "AdamW epsilon", "optimizer")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)", "optimizer")
    # evaluation
    eval_every: int = _opt(100, "validate (perplexity in each mode) every N steps and at the end", "evaluation")
    eval_tokens: int = _opt(
        32768, "validation tokens per mode at each evaluation (windows spread over the whole split)", "evaluation"
    )
    report: bool = _opt(True, "write the report folder (plots, switching curve, summary.md) at the end", "evaluation")
    switch_at: list[int] | None = _opt(  # noqa: RUF009 (_opt returns a dataclass field)
        None, "switch positions of the report's switching curve (default: seq_len/4, /2, 3/4)", "evaluation"
    )
    switch_windows: int = _opt(128, "validation sequences averaged in the switching curve", "evaluation")
    # checkpoints
    out_dir: str = _opt("runs/oryx-tg-default", "run folder: checkpoints, metrics.jsonl, report", "checkpoints")
    save_every: int = _opt(200, "write a checkpoint every N steps and at the end", "checkpoints")
    keep_checkpoints: int = _opt(
        2, "how many recent checkpoints to keep (the newest good one is never removed)", "checkpoints"
    )
    # system
    seed: int = _opt(0, "seed of the model init, the data order and the mode draws", "system")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:N", "system")
    precision: str = _opt(
        "auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16", "system", ("auto", "fp32", "bf16")
    )
    parallel: str = _opt(
        "ddp", "data parallelism under torchrun: ddp or fsdp (FSDP2 fully_shard)", "system", ("ddp", "fsdp")
    )
    threads: int | None = _opt(
        None,
        "CPU threads for torch (default: the cores other processes leave free, re-checked every 20 steps)",
        "system",
    )
    progress: bool = _opt(True, "show a progress bar", "system")
    tensorboard: bool = _opt(True, "also log to TensorBoard when it is installed", "system")

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """`base` (default: the defaults) with `values` applied; unknown keys and wrong types raise ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"a training config must be a mapping of keys to values, got {type(values).__name__}")
        hints = _field_types()
        for key in values:
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        config = dataclasses.replace(base or cls(), **{k: _coerce(k, v, hints[k]) for k, v in values.items()})
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], base: TrainConfig | None = None) -> TrainConfig:
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (is it a YAML file?)") from None
        return cls.from_yaml_text(text, base, str(path))

    @classmethod
    def from_yaml_text(
        cls, text: str, base: TrainConfig | None = None, source: str = "train_config.yaml"
    ) -> TrainConfig:
        """`base` with the settings of a YAML document; errors name `source`."""
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {source} is not valid YAML: {err}") from None
        try:
            return cls.from_dict(values, base)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # --- derived values ---------------------------------------------------------------------------------------
    @property
    def family(self) -> Variant:
        """The preset's row of the variant table."""
        return FAMILIES[self.preset.rpartition("-")[0]]

    @property
    def variant(self) -> str:
        return self.family.name

    @property
    def is_oryx(self) -> bool:
        return self.family.is_oryx

    @property
    def schedule_spec(self) -> str:
        """The schedule actually trained with: the given one, or the recipe's default for the variant."""
        if self.schedule is not None:
            return self.schedule
        return TRAINING_MIX if self.is_oryx else MODE_NAMES[self.family.default_mode]

    @property
    def eval_modes(self) -> dict[str, str]:
        """Validation modes, name -> schedule: both for Oryx, the one mode for a baseline."""
        return {MODE_NAMES[mode]: MODE_NAMES[mode] for mode in self.family.modes}

    def compiles(self, device_type: str) -> bool:
        """Whether the run compiles its blocks: `compile` when set, else on CUDA, where the compiled step is faster
        than the eager one (benchmarks/RESULTS.md), and not on a CPU, where the compile costs more than a short run
        gains."""
        return self.compile if self.compile is not None else device_type == "cuda"

    def uses_cuda_graphs(self, device_type: str, world_size: int) -> bool:
        """Whether the compiled blocks replay from CUDA graphs (`mode="reduce-overhead"`): `cuda_graphs` when set,
        else whenever the run compiles on CUDA in one process without gradient accumulation. A step of the 130m
        models is bound by the host's kernel launches without them (fla's kernels launch from Python). Gradient
        accumulation is out: CUDA-graph trees hand a micro-step's gradients out in graph memory that the next
        micro-step's replay overwrites (PyTorch #169545), and so are several ranks (their gradient hooks)."""
        possible = self.compiles(device_type) and device_type == "cuda" and world_size == 1 and self.grad_accum == 1
        if self.cuda_graphs and not possible:
            raise ConfigError(
                "cuda_graphs needs a compiled run on CUDA in one process with grad_accum 1 "
                f"(here: compile {self.compiles(device_type)}, device {device_type}, {world_size} rank(s), "
                f"grad_accum {self.grad_accum}); drop --cuda-graphs"
            )
        return possible if self.cuda_graphs is None else self.cuda_graphs

    @property
    def peak_lr(self) -> float:
        """`lr`, or the recipe's: 10x GPT-3's LR for Oryx, 5x for the baselines (docs/paper.md §4.1)."""
        if self.lr is not None:
            return self.lr
        return GPT3_LR[self.preset.rpartition("-")[2]] * (10 if self.is_oryx else 5)

    @property
    def switch_positions(self) -> list[int]:
        return (
            self.switch_at
            if self.switch_at is not None
            else [self.seq_len // 4, self.seq_len // 2, 3 * self.seq_len // 4]
        )

    # --- validation -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can be checked without loading data or building the model; raises ConfigError."""
        if self.preset not in preset_names():
            raise ConfigError(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(preset_names())}")
        for key in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "keep_checkpoints",
                    "eval_tokens", "switch_windows"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(
                f"loss_chunk_tokens must be >= 0 (0 = the whole batch at once), got {self.loss_chunk_tokens}"
            )
        for key in ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size", "threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.cuda_graphs and (self.grad_accum > 1 or self.compile is False):
            raise ConfigError(
                f"cuda_graphs needs compile and grad_accum 1 (got compile {self.compile}, grad_accum "
                f"{self.grad_accum}): CUDA graphs replay compiled blocks and would overwrite the gradients of one "
                "micro-step with the next; drop --cuda-graphs or --grad-accum"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        for key in ("lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            if getattr(self, key) is not None and not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "eps", "grad_clip", "seed"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.seed >= SEED_LIMIT:
            raise ConfigError(f"seed must be below 2^32, got {self.seed}")
        for key in ("min_lr_ratio", "warmup_ratio", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key, value in self.to_dict().items():
            choices = _FIELDS[key].metadata["choices"]
            if choices and value not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        try:
            schedule = parse(self.schedule_spec)
        except ValueError as err:
            raise ConfigError(f"schedule: {err}") from None
        if isinstance(schedule, Adaptive):
            raise ConfigError(
                f"schedule: '{schedule}' is adaptive (a trained model decides its modes); train with a fixed schedule "
                f"such as the default {TRAINING_MIX!r}, then train a router with oryx train-router"
            )
        if not self.is_oryx and not (isinstance(schedule, Fixed) and self.schedule_spec in self.eval_modes):
            raise ConfigError(
                f"schedule: {self.preset} is a single-mixer baseline; it trains only in mode "
                f"{next(iter(self.eval_modes))!r}, not {self.schedule_spec!r}"
            )
        if any(p <= 0 or p >= self.seq_len for p in self.switch_positions):
            raise ConfigError(
                f"switch_at positions must be inside (0, seq_len={self.seq_len}), got {self.switch_positions}"
            )
        self._check_model()
        for key in ("train_data", "val_data"):
            _check_data(key, getattr(self, key))
        _check_tokenizer(self.tokenizer)
        _check_out_dir(self.out_dir)
        try:
            resolve_device(self.device, "--device")
        except UsageError as err:
            raise ConfigError(str(err)) from None

    def _check_model(self) -> None:
        """The model the preset and the overrides describe must exist (e.g. hidden_size a multiple of head_dim);
        the vocabulary comes from the tokenizer later, so any valid size stands in for it here."""
        overrides = {k: getattr(self, k) for k in ("hidden_size", "num_hidden_layers", "head_dim", "intermediate_size")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        try:
            OryxConfig.from_preset(self.preset, vocab_size=257, **overrides)
        except (ValueError, TypeError) as err:
            given = ", ".join(f"{k}={v}" for k, v in overrides.items())
            raise ConfigError(f"{self.preset}{f' with {given}' if given else ''}: {err}") from None


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` checked against the field's type (ints are accepted for floats); ConfigError names the key."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must not be null")
    if typing.get_origin(base) is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key {key!r} must be a list of integers, got {value!r}")
        return list(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (base is int and isinstance(value, bool)) or not isinstance(value, base):
        raise ConfigError(f"config key {key!r} must be {base.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_data(key: str, source: str) -> None:
    corpus, colon, split = source.partition(":")
    if colon and corpus in CORPORA and not os.path.exists(source):
        if split not in CORPORA[corpus]:
            raise ConfigError(f"{key}: corpus {corpus!r} has splits {', '.join(CORPORA[corpus])}, not {split!r}")
        return
    if not os.path.exists(source):
        raise ConfigError(
            f"{key}: data path {source!r} does not exist (give a .txt/.jsonl/.bin file, a folder of them, "
            f"or an embedded split such as prose:train)"
        )


def _check_out_dir(out_dir: str) -> None:
    """The run folder must be a folder, or creatable as one, and writable."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file, not a folder; choose another --out-dir")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"out_dir {out_dir} cannot be created: {existing} is a file; choose another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir} is not writable ({existing} refuses new files); choose another --out-dir")


def _check_tokenizer(spec: str) -> None:
    if spec in ("gpt2", "byte") or os.path.exists(spec):
        return
    if spec.startswith("bpe:") and spec[4:].isdigit() and int(spec[4:]) >= 257:
        return
    raise ConfigError(
        f"tokenizer: {spec!r} is neither gpt2, byte, bpe:<vocab size >= 257> nor an existing tokenizer path"
    )


# --- command line -----------------------------------------------------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped as in the YAML file; a flag not given leaves the attribute unset, so
    only flags the user typed override the config file."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for name, annotation in _field_types().items():
        meta = _FIELDS[name].metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(f"{meta['group']} (YAML keys of the same name)")
        )
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        help_text = f"{meta['help']} (default: {default})"
        args = typing.get_args(annotation)
        base = next((a for a in args if a is not type(None)), annotation) if args else annotation
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is list:
            group.add_argument(flag, type=int, nargs="+", metavar="N", **kwargs)
        else:
            group.add_argument(
                flag,
                type=_cli_type(name, base),
                choices=meta["choices"],
                metavar=None if meta["choices"] else name.upper(),
                **kwargs,
            )


def _cli_type(name: str, base: type) -> Any:
    def convert(text: str) -> Any:
        if text.lower() in ("none", "null") and _FIELDS[name].default is None:
            return None
        return base(text)

    convert.__name__ = base.__name__  # argparse names the type in its error message
    return convert
