"""The run folder's safety: one writer at a time, a record of what `oryx train` wrote, and a reversible `--overwrite`.

    RUN/.oryx.lock       held (flock) by the process writing the run; holds its pid and host
    RUN/.oryx-run.json   the marker: the files outside checkpoints/ that oryx train wrote (checkpoint folders are
                         recognised by their names and their checksums.json)

`RunLock` is an exclusive `fcntl.flock`: the kernel releases it when its process exits, however it exits, so a
lock is never stale after a crash or a kill. `replace_run` (--overwrite) moves only what a previous run wrote into
a hidden `RUN/.oryx-replaced-<time>/` folder, leaves every other file where it is, and refuses a folder without
the marker; `RunReplacement.commit` deletes the old run once the new run's first checkpoint is saved, and `restore`
puts it back if the new run stops before that (`settle_replacements` does it at the next start after a kill).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from oryx import checkpoint as ckpt
from oryx.training.config import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest still works)
    fcntl = None

LOCK = ".oryx.lock"
MARKER = ".oryx-run.json"
REPLACED = ".oryx-replaced-"
METRICS = "metrics.jsonl"
# The files oryx train writes outside checkpoints/ (besides TensorBoard's event files).
WRITES = (
    "train_config.yaml", METRICS, "report/summary.md", "report/final.json", "report/val_ppl.png",
    "report/switching.json", "report/switching.png",
)  # fmt: skip
# Folders inside a checkpoint that `oryx eval` writes by default (its results belong to the checkpoint).
EVAL_OUTPUTS = ("eval", "switching")


# --- the lock -----------------------------------------------------------------------------------------------------
class RunLock:
    """Exclusive lock of a run folder (created if needed) for the life of a `with` block, reentrant in a process.

    Raises:
        ConfigError: another process holds it; the message names its pid.
    """

    _held: dict[str, list[int]] = {}  # lock path -> [file descriptor, depth]

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.absolute() / LOCK

    def __enter__(self) -> RunLock:
        key = str(self.path)
        if key in self._held:
            self._held[key][1] += 1
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200)
                os.close(fd)
                raise ConfigError(_busy(self.run_dir, owner)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._held[key] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        entry = self._held[str(self.path)]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[str(self.path)]
            os.close(entry[0])  # releases the flock; the file stays (unlinking it would race with a new owner)


def check_unlocked(run_dir: str | os.PathLike[str]) -> None:
    """Raise the RunLock's ConfigError if another process holds the lock of `run_dir` now: a probe that writes
    nothing, for reading a run's checkpoint before taking the lock."""
    path = Path(run_dir).absolute() / LOCK
    if fcntl is None or not path.is_file() or str(path) in RunLock._held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(_busy(Path(run_dir), os.read(fd, 200))) from None
    finally:
        os.close(fd)  # releases the probe's lock


def _busy(run_dir: Path, owner: bytes) -> str:
    words = owner.decode(errors="replace").split()
    pid = f"pid {words[0]}" + (f" on {words[1]}" if len(words) > 1 else "") if words else "pid unknown"
    return (
        f"{run_dir} is being written by another oryx train ({pid}); wait for it to finish or choose another --out-dir"
    )


# --- the marker ---------------------------------------------------------------------------------------------------
def recorded(run_dir: str | os.PathLike[str]) -> set[str] | None:
    """The files (paths relative to the run folder) the marker lists, or None when the folder has no marker.

    Raises:
        ConfigError: the marker is damaged.
    """
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} is damaged ({type(err).__name__}); it should be the JSON record of the files oryx train wrote. "
            "Move the run's files away by hand or choose another --out-dir"
        ) from None
    return set(files)


def record(run_dir: str | os.PathLike[str], *paths: str | os.PathLike[str]) -> None:
    """Add files that oryx train wrote in `run_dir` (absolute, or relative to it) to the marker (atomically)."""
    run_dir = Path(run_dir)
    files = recorded(run_dir) or set()
    for path in paths:
        path = Path(path)
        files.add((path.relative_to(run_dir) if path.is_absolute() else path).as_posix())
    payload = {"written_by": "oryx train", "files": sorted(files)}
    ckpt.write_atomic(run_dir / MARKER, json.dumps(payload, indent=1) + "\n")


def holds_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the folder holds (part of) a training run: checkpoints or a metrics log."""
    root = Path(run_dir) / ckpt.CHECKPOINTS
    return (Path(run_dir) / METRICS).is_file() or (root.is_dir() and any(root.iterdir()))


def check_fresh_run(run_dir: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise ConfigError unless a new run may start in `run_dir`: it holds no run, or `overwrite` and a marked
    Oryx run whose checkpoint folders hold only files Oryx wrote; and no file of the user's sits where the run
    will write one. Changes nothing."""
    run_dir = Path(run_dir)
    if holds_run(run_dir):
        if not overwrite:
            raise ConfigError(
                f"out_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out-dir"
            )
        if recorded(run_dir) is None:
            raise ConfigError(
                f"--overwrite: {run_dir} has no {MARKER}, the record oryx train keeps of the files it wrote, so it "
                "cannot tell them from yours (the folder was not written by oryx train, or by an older version); "
                "nothing was changed. Move its contents away yourself or choose another --out-dir"
            )
        foreign = [p for folder in _checkpoint_folders(run_dir) for p in foreign_entries(folder)]
        if foreign:
            names = ", ".join(p.relative_to(run_dir).as_posix() for p in foreign[:5])
            raise ConfigError(
                f"--overwrite: checkpoint folders of {run_dir} hold files oryx train did not write ({names}); move "
                "them out of the run folder first (nothing was changed)"
            )
    ours = recorded(run_dir) or set()
    clashes = [name for name in WRITES if (run_dir / name).exists() and name not in ours]
    if clashes:
        raise ConfigError(
            f"{run_dir} holds {', '.join(clashes)}, which oryx train did not write but would overwrite; move "
            "it away or choose another --out-dir (nothing was changed)"
        )


def foreign_entries(checkpoint: Path) -> list[Path]:
    """Entries of a checkpoint folder that neither oryx train (its checksums.json) nor oryx eval wrote."""
    try:
        listed = set(json.loads((checkpoint / ckpt.CHECKSUMS).read_text()))
    except (OSError, ValueError, TypeError):
        listed = set()
    return sorted(p for p in checkpoint.iterdir() if p.name not in {*listed, ckpt.CHECKSUMS, *EVAL_OUTPUTS})


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    root = run_dir / ckpt.CHECKPOINTS
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and ckpt.is_checkpoint_name(p.name)]


def _oryx_paths(run_dir: Path) -> list[Path]:
    """What previous runs wrote in `run_dir`: the marker's files, checkpoint folders (whole), `latest`, leftovers
    of interrupted writes, and the marker itself."""
    paths = [run_dir / name for name in sorted(recorded(run_dir) or ())]
    root = run_dir / ckpt.CHECKPOINTS
    if root.is_dir():
        for p in sorted(root.iterdir()):
            ours = p.name == ckpt.LATEST or ckpt.is_checkpoint_name(p.name)
            if ours or p.name.startswith((*ckpt.TEMPORARY, ckpt.DIVERGED)):
                paths.append(p)
    paths.append(run_dir / MARKER)
    return [p for p in paths if p.exists() or p.is_symlink()]


# --- --overwrite --------------------------------------------------------------------------------------------------
@dataclass
class RunReplacement:
    """The previous run of a folder, moved aside by `replace_run`; `kept` are the files left in place."""

    run_dir: Path
    folder: Path
    kept: list[str] = field(default_factory=list)

    def commit(self) -> None:
        """The new run has its first checkpoint: delete the old run for good."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore(self) -> None:
        """The new run stopped before its first checkpoint: remove what it wrote and put the old run back."""
        _restore(self.run_dir, self.folder)


def replace_run(run_dir: str | os.PathLike[str]) -> RunReplacement | None:
    """Move what previous oryx train runs wrote in `run_dir` into `RUN/.oryx-replaced-<time>/` (same paths inside);
    every other file stays where it is. Call under the RunLock; raises ConfigError (changing nothing) as
    `check_fresh_run` does."""
    run_dir = Path(run_dir)
    check_fresh_run(run_dir, overwrite=True)
    if not holds_run(run_dir):
        return None
    folder = run_dir / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    moved = _oryx_paths(run_dir)
    for path in moved:
        target = folder / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    _remove_empty_parents(run_dir, moved)
    kept = sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and p != run_dir / LOCK and not p.relative_to(run_dir).parts[0].startswith(REPLACED)
    )
    return RunReplacement(run_dir, folder, kept)


def settle_replacements(run_dir: str | os.PathLike[str]) -> list[str]:
    """Finish replacements a killed run left behind (call under the RunLock): deleted when the run folder has a
    complete checkpoint again, restored otherwise. Returns notes for the user."""
    run_dir = Path(run_dir)
    notes = []
    for folder in sorted(run_dir.glob(f"{REPLACED}*")):
        if any((p / ckpt.CHECKSUMS).is_file() for p in _checkpoint_folders(run_dir)):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _restore(run_dir, folder)
            notes.append(
                f"restored the previous run of {run_dir} (the --overwrite run that replaced it stopped before its "
                "first checkpoint)"
            )
    return notes


def _restore(run_dir: Path, folder: Path) -> None:
    for path in _oryx_paths(run_dir):  # what the stopped run wrote (it has no checkpoint folder)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts)):
        if not path.exists():  # inside a folder moved back already
            continue
        target = run_dir / path.relative_to(folder)
        if path.is_dir() and target.is_dir() and not ckpt.is_checkpoint_name(path.name):
            continue  # e.g. report/, which holds the user's files too: move its contents one by one
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(folder)


def _remove_empty_parents(run_dir: Path, moved: list[Path]) -> None:
    """Remove the folders that held only moved files (the user's files keep theirs)."""
    parents = {q for p in moved for q in p.parents if run_dir in q.parents}
    for path in sorted(parents, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if empty
