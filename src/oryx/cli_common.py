"""What every `oryx` subcommand shares: the one-line error convention, argument types that refuse bad values, and
the checks of devices and output files made before any work starts.

A failure the user caused ends the command with exit status 2 and one line on stderr, never a traceback:

    oryx generate: error: argument --top-p: must be in (0, 1], got 2

`UsageError` (and its subclasses `ConfigError`, `CheckpointError`, `DataError`) carries such a message; `run_command`
prints it. Ctrl-C prints one line and exits 130; a full disk says so. Imports nothing heavy (torch only inside
`resolve_device`), so `oryx --help` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

SEED_LIMIT = 2**32  # seeds are combined as (seed << 32) + index into 64-bit generator seeds


class UsageError(Exception):
    """A failure caused by the user's input or environment; the message names the file or flag and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error convention (no usage block before the error)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(prog: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """`run(args)` as a command: its exit status, or 2 with one error line for a UsageError, a full disk or another
    OS error on a named file, and 130 with one line for Ctrl-C."""
    try:
        return int(run(args) or 0)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        message = os_error_message(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def os_error_message(err: OSError) -> str | None:
    """A one-line description of an OS error the user can act on (a full disk, a file that cannot be read or
    written), or None for one without a file name (a bug, not the user's input)."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run the command again"
    if err.filename is None:
        return None
    return f"{err.strerror or err}: {err.filename}"


# --- argument types: each refuses a bad value with a message argparse prefixes with the flag -------------------
def _number(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1] (e.g. nucleus sampling's top-p)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^32), got {text}")
    return value


def output_file(text: str) -> str:
    """A file to write at the end of the command: checked now, so that a typo does not waste the work before it."""
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} of {text} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"the folder {folder} of {text} is not writable")
    return text


# --- flags that several commands share ------------------------------------------------------------------------------
def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, resolved later by ``resolve_device``."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda (default: auto)")


def add_no_verify_argument(parser: argparse.ArgumentParser, what: str = "a model folder") -> None:
    """--no-verify (``args.verify`` False): load ``what`` without checking its checksum manifest."""
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help=f"load {what} without checking its checksums.json (it is then not verified)",
    )


# --- devices ------------------------------------------------------------------------------------------------------
def resolve_device(name: str, flag: str = "--device") -> str:
    """ "auto" → "cuda" when a GPU is visible, else "cpu"; "cpu", "cuda" and "cuda:N" are checked against the
    machine. Raises UsageError naming `flag` for a malformed name or a GPU that is not there."""
    if name in ("auto", "cpu"):
        if name == "cpu":
            return name
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise UsageError(f"{flag} must be auto, cpu, cuda or cuda:N, got {name!r}")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is available on this machine; use {flag} cpu (or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return name
