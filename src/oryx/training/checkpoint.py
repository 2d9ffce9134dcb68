"""Atomic, verifiable training checkpoints, and loading a trained model for evaluation or generation.

A run folder holds `checkpoints/step-NNNNNNNN/` folders and a `checkpoints/latest` file naming the newest. Each
checkpoint folder is a complete `from_pretrained` folder (model safetensors + config + tokenizer) plus what resuming
needs:

    config.json, model.safetensors, tokenizer files   save_pretrained of the model and the tokenizer
    optimizer.pt      AdamW state, full (unsharded), keyed by parameter name, so DDP/FSDP/single runs share it
    scheduler.pt      the LR scheduler's state
    rng.pt            python, numpy, torch (and cuda) RNG states of every rank
    trainer_state.json   step, tokens seen, the data position, elapsed time
    train_config.yaml    the run's TrainConfig
    checksums.json       sha256 of every file above, written last

A checkpoint is written to a hidden temporary folder and renamed into place (`os.replace`), then `latest` is
replaced the same way; older checkpoints beyond `keep` are removed only after that. So a crash at any moment leaves
the previous good checkpoint and a `latest` that points to a complete one. Loading verifies every checksum and
refuses a damaged checkpoint without touching anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CHECKSUMS = "checksums.json"
TRAINER_STATE = "trainer_state.json"
TRAIN_CONFIG = "train_config.yaml"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged."""


@dataclass
class Checkpoint:
    """Everything `read` loads from a checkpoint folder (tensors on CPU)."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: list[dict[str, Any]]
    trainer_state: dict[str, Any]
    train_config: str


def step_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none.

    Raises:
        CheckpointError: `latest` names a folder that does not exist.
    """
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    target = pointer.parent / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
    return target


# --- writing ----------------------------------------------------------------------------------------------------
def save(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: torch.nn.Module,
    model_state: dict[str, torch.Tensor],
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    train_config: str,
    keep: int,
) -> Path:
    """Write the checkpoint of `step` atomically (call on one rank), point `latest` at it, prune old ones.

    `model` provides `save_pretrained` (config and tied-weight handling); its weights come from `model_state`, the
    full state dict, so a sharded model saves the same file as an unsharded one.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = step_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{target.name}-"))
    try:
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / TRAIN_CONFIG).write_text(train_config)
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        _fsync_folder(tmp)
        if target.exists():  # e.g. re-training a step after resuming from an older checkpoint
            old = target.with_name(f".old-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, target.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != target:
            shutil.rmtree(old)
    return target


def remove_temporaries(run_dir: str | os.PathLike[str]) -> None:
    """Delete half-written folders left by a killed run (never a complete checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- reading ----------------------------------------------------------------------------------------------------
def verify(path: str | os.PathLike[str]) -> None:
    """Check every file of a checkpoint against `checksums.json`.

    Raises:
        CheckpointError: naming the checkpoint and the first missing or damaged file.
    """
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {CHECKSUMS} is missing; refusing to use it")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {CHECKSUMS} is not valid JSON; refusing to use it"
        ) from None
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; refusing to use it")
        if _sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} does not match its checksum; refusing to use it"
            )


def read(path: str | os.PathLike[str]) -> Checkpoint:
    """Verify and load a training checkpoint (CPU tensors).

    Raises:
        CheckpointError: the checkpoint is incomplete or damaged.
    """
    path = Path(path)
    verify(path)
    model_state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        model_state.update(load_file(shard))
    return Checkpoint(
        path=path,
        model_state=model_state,
        optimizer_state=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler_state=torch.load(path / "scheduler.pt", weights_only=True),
        rng_states=torch.load(path / "rng.pt", weights_only=True),
        trainer_state=json.loads((path / TRAINER_STATE).read_text()),
        train_config=(path / TRAIN_CONFIG).read_text(),
    )


# --- RNG ----------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and (if any) CUDA RNG states, as plain values and tensors (so that
    `torch.load(weights_only=True)` reads them back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- inference ----------------------------------------------------------------------------------------------------
def resolve(path: str | os.PathLike[str]) -> Path:
    """A model folder from a checkpoint folder, a `from_pretrained` folder, or a run folder (its latest checkpoint).

    Raises:
        FileNotFoundError: nothing loadable there.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        found = latest(path)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path} is neither a model folder (with config.json) nor a run folder with checkpoints; "
        "pass e.g. runs/oryx-tg-default or runs/oryx-tg-default/checkpoints/step-00000600"
    )


def load_pretrained(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Any, Any, Path]:
    """(model in eval mode, tokenizer, resolved folder) for evaluation and generation.

    A folder with `checksums.json` (one of our checkpoints) is verified first; a plain `save_pretrained` folder is
    loaded as is.
    """
    from oryx.data import load_tokenizer
    from oryx.modeling import OryxForCausalLM

    folder = resolve(path)
    if (folder / CHECKSUMS).is_file():
        verify(folder)
    model = OryxForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return model, load_tokenizer(folder), folder
