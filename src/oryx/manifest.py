"""Checksum manifests: `checksums.json` lists the sha256 of every file a checkpoint folder's loader may read.

    {"config.json": "9f2c…", "model.safetensors": "51ab…", "tokenizer.json": "07de…", …}

`OryxForCausalLM.save_pretrained` and every training checkpoint write one. Loading verifies it first and then
reads only the files it lists (`verified_view`): a file added to the folder later, such as a stray
`zz.safetensors`, is refused and can never be merged into the weights, and a truncated or changed file is refused
by its checksum before any parser sees it. A folder without a manifest is refused unless its caller explicitly
loads it unverified (`--no-verify` on the command line).

>>> write_manifest("my-model")           # after saving more files into a folder by hand
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from oryx.cli_common import UsageError

MANIFEST = "checksums.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # an unlisted one is refused, not ignored


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint or model folder that is missing, incomplete, damaged or unverifiable."""


def sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> Path:
    """Write `folder/checksums.json` over `names` (default: every file directly in the folder but hidden ones and
    the manifest itself), atomically; returns its path."""
    folder = Path(folder)
    if names is None:
        names = (p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST)
    sums = {name: sha256(folder / name) for name in sorted(names)}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{MANIFEST}-")
    try:
        os.fchmod(fd, 0o644)  # readable like the files it lists (mkstemp makes 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(sums, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return folder / MANIFEST


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The manifest of `folder`, checked for form (not yet against the files).

    Raises:
        CheckpointError: the folder or its manifest is missing, or the manifest is malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}, so its files cannot be verified; refusing to load it. If you trust its "
            f"files, pass --no-verify (Python: verify=False) or record them with oryx.write_manifest('{folder}')"
        )
    try:
        sums = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is damaged: not valid JSON; refusing to use {folder}") from None
    if not isinstance(sums, dict):
        raise CheckpointError(
            f"{path} is damaged: it must map file names to sha256 checksums, not be a {type(sums).__name__}; "
            f"refusing to use {folder}"
        )
    if not sums:
        raise CheckpointError(f"{path} lists no files, so nothing in {folder} can be verified; refusing to use it")
    for name, digest in sums.items():
        if not name or name != Path(name).name or name.startswith(".") or name == MANIFEST:
            raise CheckpointError(f"{path} is damaged: {name!r} is not a file name of the folder")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CheckpointError(f"{path} is damaged: the checksum of {name} is not a sha256 hex digest")
    return sums


def verify_manifest(
    folder: str | os.PathLike[str], required: Iterable[str] = (), ignore: Iterable[str] = ()
) -> dict[str, str]:
    """Check every file the manifest lists against its checksum, that it lists `required`, and that the folder
    holds no weight file it does not list, except the files named in `ignore` (about to be replaced); returns the
    manifest.

    Raises:
        CheckpointError: naming the folder and the first missing, damaged or unlisted file.
    """
    folder = Path(folder)
    sums = read_manifest(folder)
    for name in required:
        if name not in sums:
            raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST} does not list {name}")
    ignore = set(ignore)
    for name, expected in sums.items():
        if name in ignore:
            continue
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing; refusing to use it")
        if sha256(file) != expected:
            raise CheckpointError(
                f"checkpoint {folder} is damaged: {name} does not match its checksum (changed or truncated after "
                "it was saved); refusing to use it"
            )
    unlisted = sorted(
        p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name not in sums and p.name not in ignore
    )
    if unlisted:
        raise CheckpointError(
            f"{folder} holds {', '.join(unlisted)}, which {MANIFEST} does not list; refusing to load weights that "
            "cannot be verified (remove the file, or record it with oryx.write_manifest if it belongs there)"
        )
    return sums


def unlisted_files(folder: str | os.PathLike[str]) -> list[str]:
    """Files directly in `folder` that its manifest does not list (hidden files excepted)."""
    folder = Path(folder)
    try:
        listed = set(json.loads((folder / MANIFEST).read_bytes()))
    except (OSError, ValueError, TypeError):
        listed = set()
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in listed
    )


@contextlib.contextmanager
def verified_view(folder: str | os.PathLike[str], required: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder holding links to exactly the verified files of `folder`, for a loader to read."""
    folder = Path(folder).absolute()
    sums = verify_manifest(folder, required)
    with tempfile.TemporaryDirectory(prefix="oryx-verified-") as view:
        for name in sums:
            os.symlink(folder / name, Path(view) / name)
        yield Path(view)
