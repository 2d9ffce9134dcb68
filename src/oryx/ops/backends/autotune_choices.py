"""fla's Triton autotune choices, shipped with the package for the cards they were measured on.

fla's kernels autotune on their first call at every new shape key and keep the winner as a
``<hash>/<kernel>.autotune.json`` file in Triton's cache directory (the hash covers the kernel's source, its key values
and the Triton version). On a fresh card that benchmarking is most of the first training step's wait. The choices
measured on a known card, Triton and fla-core ship here as a tarball (``autotune/``); ``restore_shipped_choices`` copies
those the cache lacks into it before the first fla kernel of a process runs. The compile of each chosen config still
happens once.

Safe by construction: a file already in the cache is never replaced, only ``*.autotune.json`` members with plain
relative paths are read, each file is written to a temporary name and renamed, and nothing happens on another card,
Triton or fla-core version (a choice timed elsewhere is not assumed good). ``ORYX_AUTOTUNE_CHOICES=0`` turns the restore
off. ``oryx autotune export/import`` moves a cache's choices between machines (``oryx.autotune``).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import torch

SUFFIX = ".autotune.json"
ENV_VAR = "ORYX_AUTOTUNE_CHOICES"  # "0" turns the restore off
SHIPPED_DIR = Path(__file__).with_name("autotune")
# (torch.cuda.get_device_name, triton.__version__, fla-core's version) -> tarball in SHIPPED_DIR
SHIPPED: dict[tuple[str, str, str], str] = {
    ("NVIDIA H200", "3.6.0", "0.6.0"): "h200-triton3.6.0-fla0.6.0.tar.gz",
}

_restored: set[int] = set()  # CUDA device indices this process has restored for


def triton_cache_dir() -> Path:
    """Triton's cache directory, as Triton resolves it (its ``knobs``) where Triton is installed; otherwise by its rule:
    ``TRITON_CACHE_DIR``, else ``$TRITON_HOME/.triton/cache`` (``TRITON_HOME`` defaulting to the home folder)."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        home = os.environ.get("TRITON_HOME") or Path.home()
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path(home) / ".triton" / "cache")


def versions() -> tuple[str | None, str | None]:
    """The installed Triton and fla-core versions (None where one is missing)."""

    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    return version("triton"), version("fla-core")


def shipped_archive(device_name: str, triton_version: str | None, fla_version: str | None) -> Path | None:
    """The tarball shipped for this card and these versions, or None."""
    name = SHIPPED.get((device_name, triton_version or "", fla_version or ""))
    return SHIPPED_DIR / name if name else None


def _members(archive: tarfile.TarFile, source: str) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """The archive's choice files with their relative paths; anything else in it is an error."""
    members = []
    for member in archive.getmembers():
        path = PurePosixPath(member.name)
        if member.isdir() and ".." not in path.parts and not path.is_absolute():
            continue
        if not member.isfile() or path.is_absolute() or ".." in path.parts or not path.name.endswith(SUFFIX):
            raise ValueError(
                f"{source}: {member.name!r} is not a <hash>/<kernel>{SUFFIX} file; not an autotune archive"
            )
        members.append((member, PurePosixPath(*[p for p in path.parts if p != "."])))
    return members


def import_choices(archive_path: Path, cache_dir: Path) -> tuple[int, int]:
    """Copy the choices of ``archive_path`` (a .tar.gz of ``<hash>/<kernel>.autotune.json``) that ``cache_dir``
    lacks into it: (files added, files already there and kept)."""
    added = kept = 0
    with tarfile.open(archive_path, "r:gz") as archive:
        for member, relative in _members(archive, str(archive_path)):
            target = cache_dir.joinpath(*relative.parts)
            if target.exists():
                kept += 1
                continue
            data = archive.extractfile(member).read()
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".oryx-", suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, target)
            added += 1
    return added, kept


def cached_choices(cache_dir: Path) -> list[Path]:
    """The choice files in ``cache_dir``, sorted."""
    return sorted(cache_dir.glob(f"*/*{SUFFIX}")) if cache_dir.is_dir() else []


def export_choices(cache_dir: Path, archive_path: Path) -> int:
    """Write every choice of ``cache_dir`` into a new .tar.gz at ``archive_path`` (written to a temporary name and
    renamed); the number of files."""
    files = cached_choices(cache_dir)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=archive_path.parent, prefix=".oryx-", suffix=".tmp")
    with os.fdopen(handle, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as archive:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{path.parent.name}/{path.name}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))
    os.replace(temporary, archive_path)
    return len(files)


def restore_shipped_choices(device: torch.device) -> int:
    """Once per CUDA device and process: copy the shipped choices for this card and versions into Triton's cache
    (files it lacks only). The number of files added; 0 on another card or version, or with ORYX_AUTOTUNE_CHOICES=0."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _restored:
        return 0
    _restored.add(index)
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return 0
    archive = shipped_archive(torch.cuda.get_device_name(index), *versions())
    if archive is None or not archive.is_file():
        return 0
    try:
        added, _ = import_choices(archive, triton_cache_dir())
    except OSError:  # a read-only or full cache only costs the autotuning this would have saved
        return 0
    return added
