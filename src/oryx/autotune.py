"""`oryx autotune`: fla's Triton autotune choices in this machine's Triton cache (`oryx.ops.backends.autotune_choices`).

oryx autotune status                   # the cache, its choices, and whether the package ships some for this card
oryx autotune export choices.tar.gz    # this cache's choices, to carry to a fresh machine with the same card
oryx autotune import choices.tar.gz    # add those the cache lacks (a file already there is kept)
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import torch

from oryx.cli_common import UsageError
from oryx.ops.backends import autotune_choices as choices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["status", "export", "import"])
    parser.add_argument("archive", nargs="?", help="export/import: the .tar.gz of choices")
    parser.add_argument("--force", action="store_true", help="export: replace an existing archive")
    parser.add_argument("--cache-dir", default=None, help="Triton's cache (default: TRITON_CACHE_DIR, ~/.triton/cache)")


def _status(cache: Path) -> None:
    print(f"Triton cache: {cache} ({len(choices.cached_choices(cache))} autotune choices)")
    triton_version, fla_version = choices.versions()
    print(f"triton {triton_version or 'not installed'}, fla-core {fla_version or 'not installed'}")
    shipped = ", ".join(f"{card} (triton {t}, fla-core {f})" for card, t, f in choices.SHIPPED)
    print(f"shipped with the package for: {shipped}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to restore here")
        return
    card = torch.cuda.get_device_name()
    archive = choices.shipped_archive(card, triton_version, fla_version)
    state = "restored into the cache by the first fla kernel of a run" if archive else "none shipped for it"
    print(f"this card: {card}: {state}")


def run(args: argparse.Namespace) -> int:
    cache = Path(args.cache_dir) if args.cache_dir else choices.triton_cache_dir()
    if args.action == "status":
        _status(cache)
        return 0
    if args.archive is None:
        raise UsageError(f"autotune {args.action} needs the archive's path, e.g. `oryx autotune {args.action} "
                         "choices.tar.gz`")  # fmt: skip
    archive = Path(args.archive)
    if args.action == "export":
        if archive.exists() and not args.force:
            raise UsageError(f"{archive} exists; choose another path or pass --force to replace it")
        count = choices.export_choices(cache, archive)
        print(f"wrote {count} autotune choices of {cache} to {archive}")
        return 0
    if not archive.is_file():
        raise UsageError(f"{archive}: no such file (an archive written by `oryx autotune export`)")
    try:
        added, kept = choices.import_choices(archive, cache)
    except (tarfile.TarError, EOFError) as err:
        raise UsageError(f"{archive} is not a .tar.gz archive ({err})") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"added {added} autotune choices to {cache}; kept {kept} already there")
    return 0
