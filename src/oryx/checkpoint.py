"""Checkpoint folders, shared by training (which writes and resumes them) and evaluation or generation (which load
them): atomic, verifiable training checkpoints, and loading a trained model.

A run folder holds `checkpoints/step-NNNNNNNN/` folders and a `checkpoints/latest` file naming the newest. Each
checkpoint folder is a complete `from_pretrained` folder (model safetensors + config + tokenizer) plus what resuming
needs:

    config.json, model.safetensors, tokenizer files   save_pretrained of the model and the tokenizer
    optimizer.pt      AdamW state, full (unsharded), keyed by parameter name, so DDP/FSDP/single runs share it
    scheduler.pt      the LR scheduler's state
    rng.pt            python, numpy, torch (and cuda) RNG states of every rank
    trainer_state.json   step, tokens seen, the data position, elapsed time
    train_config.yaml    the run's TrainConfig
    checksums.json       sha256 of every file above, written last (`oryx.manifest`)
    router.safetensors   optional: a router added later by `oryx train-router` (and to the manifest); resuming
                         ignores it, loading a model attaches it

A checkpoint is written to a hidden temporary folder and renamed into place (`os.replace`), then `latest` is
replaced the same way; older checkpoints beyond `keep` are removed only after that, each first renamed to a hidden
`.deleting-` name (so an interrupted removal never leaves a half-deleted `step-` folder; `remove_temporaries`
finishes it at the next start). So a crash at any moment leaves the previous good checkpoint and a `latest` that
points to a complete one. Loading verifies every checksum, reads only the files the manifest lists, and refuses a
damaged or unverifiable checkpoint without touching anything; `.pt` files are read with `weights_only=True`, and
one that would need more (a pickle with code) is refused as unsafe.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from oryx.manifest import MANIFEST, CheckpointError, unlisted_files, verified_view, verify_manifest, write_manifest
from oryx.routing.router import ROUTER_FILE

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CHECKSUMS = MANIFEST
TRAINER_STATE = "trainer_state.json"
TRAIN_CONFIG = "train_config.yaml"
# What resuming reads besides the weights; a training checkpoint's manifest must list them.
TRAINING_FILES = ("config.json", "optimizer.pt", "scheduler.pt", "rng.pt", TRAINER_STATE, TRAIN_CONFIG)
TEMPORARY = (".tmp-", ".old-", ".deleting-")  # prefixes of folders an interrupted write or removal leaves
DIVERGED = "diverged-"  # prefix of checkpoints set aside after a divergence
_STEP_DIR = re.compile(r"^step-(\d{8})$")

__all__ = ["CheckpointError"]  # re-exported: it is defined with the manifest


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


def is_checkpoint_name(name: str) -> bool:
    return bool(_STEP_DIR.match(name))


def step_of(path: str | os.PathLike[str]) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete-looking checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none.

    Raises:
        CheckpointError: `latest` is damaged or names a folder that does not exist.
    """
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(
            f"{pointer} is damaged: it should name a step-NNNNNNNN folder, not {name[:40]!r}; delete it to use the "
            "newest complete checkpoint, or pass the checkpoint folder itself"
        )
    target = pointer.parent / name
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
    """Write the checkpoint of `step` atomically (call on one rank), point `latest` at it, prune old ones (beyond
    the newest `keep`).

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
        write_manifest(tmp)
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
    write_atomic(root / LATEST, target.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != target:
            remove_checkpoint(old)
    return target


def set_aside_from(run_dir: str | os.PathLike[str], step: int) -> Path | None:
    """After a divergence: rename the checkpoints of `step` and later (their weights already fail) to
    `diverged-step-N` (kept for inspection, never resumed from or pruned), point `latest` at the newest earlier
    checkpoint and return it (None when there is none)."""
    root = Path(run_dir) / CHECKPOINTS
    good = None
    for path in list_checkpoints(run_dir):
        if step_of(path) >= step:
            doomed = path.with_name(f"{DIVERGED}{path.name}")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
        else:
            good = path
    if good is not None:
        write_atomic(root / LATEST, good.name + "\n")
    elif (root / LATEST).exists():
        (root / LATEST).unlink()
    return good


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden `.deleting-` name first, so that an interrupted removal
    leaves no half-deleted `step-` folder behind (`remove_temporaries` finishes it)."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def remove_temporaries(run_dir: str | os.PathLike[str]) -> None:
    """Delete half-written or half-deleted folders left by a killed run (never a complete checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TEMPORARY):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


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


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file through a temporary file and a rename: readers see the old or the new text."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0o600 would hide the file from the run's other readers
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
    """Check a training checkpoint: its manifest lists every file resuming reads, and every listed file matches.

    Raises:
        CheckpointError: naming the checkpoint and the first missing, damaged or unlisted file.
    """
    verify_manifest(path, TRAINING_FILES)


def read(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Verify and load a training checkpoint (CPU tensors): the weights from exactly the `.safetensors` files its
    manifest lists. `verify=False` (`--no-verify`) reads the folder as it is, unchecked.

    Raises:
        CheckpointError: the checkpoint is incomplete, damaged, unverifiable, or holds an unsafe pickle.
    """
    path = Path(path)
    if verify:
        names = sorted(verify_manifest(path, TRAINING_FILES))
    else:
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a folder")
        names = sorted(p.name for p in path.iterdir())
    model_state: dict[str, torch.Tensor] = {}
    for shard in [n for n in names if n.endswith(".safetensors") and n != ROUTER_FILE]:  # the router is no LM weight
        try:
            model_state.update(load_file(path / shard))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint {path}: {shard} is not a readable safetensors file ({err})") from None
    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_bytes())
        train_config = (path / TRAIN_CONFIG).read_text()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {err}") from None
    return Checkpoint(
        path=path,
        model_state=model_state,
        optimizer_state=safe_load(path / "optimizer.pt"),
        scheduler_state=safe_load(path / "scheduler.pt"),
        rng_states=safe_load(path / "rng.pt"),
        trainer_state=trainer_state,
        train_config=train_config,
    )


def safe_load(path: Path) -> Any:
    """`torch.load(path, weights_only=True)`; a file that needs more than tensors and plain values is refused.

    Raises:
        CheckpointError: the file is missing, damaged, or a pickle that would run code.
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(_unsafe(path)) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint file ({type(err).__name__}); refusing it") from None


def _unsafe(path: Path) -> str:
    return (
        f"{path} is not a safe checkpoint file: it holds Python objects that loading would have to construct, "
        "which can run arbitrary code; refusing it. Oryx checkpoints hold only tensors and plain values; re-create "
        "the checkpoint (or the model folder, with save_pretrained's safetensors) from a trusted source"
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
        CheckpointError: nothing loadable there (naming what is missing), or a damaged `latest`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "config.json").is_file():
        return path
    if path.is_dir():
        found = latest(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} is neither a model folder (with config.json) nor a run folder with checkpoints; "
        "pass e.g. runs/oryx-tg-default or runs/oryx-tg-default/checkpoints/step-00000600"
    )


def load_pretrained(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", verify: bool = True
) -> tuple[Any, Any, Path]:
    """(model in eval mode, tokenizer, resolved folder) for evaluation and generation.

    The folder's `checksums.json` (written by our checkpoints and by `OryxForCausalLM.save_pretrained`) is checked
    first, and the model and tokenizer are read from exactly the files it lists. `verify=False` loads a folder as it
    is, unchecked, with a warning.

    Raises:
        CheckpointError: the folder is missing, unverifiable, damaged or not loadable (the message says why).
    """
    folder = resolve(path)
    if not verify:
        print(f"warning: loading {folder} unverified (--no-verify): its files are not checked", file=sys.stderr)
        return (*_load_model_folder(folder, folder, device), folder)
    with verified_view(folder, required=("config.json",)) as view:
        return (*_load_model_folder(view, folder, device), folder)


def _load_model_folder(source: Path, folder: Path, device: str | torch.device) -> tuple[Any, Any]:
    """Model and tokenizer from `source` (the folder itself or its verified view); errors name `folder`."""
    from oryx.data import load_tokenizer
    from oryx.modeling import OryxForCausalLM

    try:
        model = OryxForCausalLM.from_pretrained(source, dtype=torch.float32)
    except pickle.UnpicklingError:
        weights = next((p for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".pt", ".pth")), folder)
        raise CheckpointError(_unsafe(weights)) from None
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"cannot load the model in {folder}: {err}") from None
    model.config._name_or_path = str(folder)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError, TypeError, KeyError) as err:
        unlisted = [n for n in unlisted_files(folder) if "token" in n or n in ("vocab.json", "merges.txt")]
        if source != folder and unlisted:
            raise CheckpointError(
                f"{folder}: {', '.join(unlisted)} not listed in {MANIFEST} (saved after the model?), so the "
                f"tokenizer cannot be verified; save the tokenizer before the model, record the files with "
                f"oryx.write_manifest('{folder}'), or pass --no-verify"
            ) from None
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {err}") from None
    return model.to(device).eval(), tokenizer
