"""What every evaluation task shares: the cross-mode protocols, piecewise tokenisation, sentence splitting,
held-out text and JSONL export.

Cross-mode protocols (docs/paper.md §6.4, Table 3 in §7.3) split each sample into a *context* and a *prompt*
(+ generation), each processed in one mode:

===================  ==============  ==================
protocol             context         prompt + gen
===================  ==============  ==================
``"attn"``           attention       attention
``"linear"``         linear          linear
``"cross"``          linear          attention
``"cross_reverse"``  attention       linear
===================  ==============  ==================
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from oryx.configuration import ATTN, LINEAR  # not `from oryx`: keeps eval importable early
from oryx.schedule import attention_fraction

__all__ = [
    "PROTOCOLS",
    "TextTokenizer",
    "attention_fraction",
    "encode_pieces",
    "held_out_documents",
    "protocol_modes",
    "protocol_schedule",
    "split_sentences",
    "write_jsonl",
]

# protocol -> (mode of the context, mode of the prompt and of every generated token)
PROTOCOLS: dict[str, tuple[int, int]] = {
    "attn": (ATTN, ATTN),
    "linear": (LINEAR, LINEAR),
    "cross": (LINEAR, ATTN),
    "cross_reverse": (ATTN, LINEAR),
}


def _protocol(protocol: str) -> tuple[int, int]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def protocol_modes(context_lens: Sequence[int], seq_len: int, protocol: str) -> torch.Tensor:
    """Modes of a batch under a cross-mode protocol.

    Args:
        context_lens: per row, the number of leading positions that form the context (for left-padded
            batches, add the padding to it: positions are absolute within the row).
        seq_len: T, the row length.
        protocol: a key of ``PROTOCOLS``.

    Returns:
        LongTensor [len(context_lens), T]: positions ``< context_lens[b]`` get the context mode, the rest the
        prompt mode (``oryx.ATTN`` = 0, ``oryx.LINEAR`` = 1).
    """
    ctx_mode, prompt_mode = _protocol(protocol)
    in_context = torch.arange(seq_len)[None, :] < torch.as_tensor(list(context_lens), dtype=torch.long)[:, None]
    return torch.where(in_context, ctx_mode, prompt_mode).long()


def protocol_schedule(context_len: int, protocol: str) -> str:
    """The ``oryx.schedule`` spec of a protocol for one prompt whose context is ``context_len`` tokens long.

    Generated tokens lie past the context, so they take the prompt's mode, as the protocol requires.
    """
    ctx_mode, prompt_mode = _protocol(protocol)
    if ctx_mode == prompt_mode:
        return protocol
    name = {ATTN: "attn", LINEAR: "linear"}
    return f"spans:{name[ctx_mode]}@0,{name[prompt_mode]}@{context_len}"


class TextTokenizer(Protocol):
    """What the text tasks need of a tokenizer; every Hugging Face tokenizer has it."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


def encode_pieces(tokenizer: TextTokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """Token ids of each piece, encoded on its own (no special tokens).

    Encoding pieces separately makes every boundary (context/prompt, needle span) an exact token index and the
    lengths additive. With byte-level BPE (GPT-2 style), whose pre-tokeniser already splits before a space,
    the concatenation is the ordinary encoding of the joined text wherever a piece starts with a space or a
    newline; pieces here are built that way.
    """
    return [tokenizer.encode(p, add_special_tokens=False) for p in pieces]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'’”)\]])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, whitespace collapsed to single spaces.

    Blank lines end a sentence as well (a speaker tag, a heading or a paragraph never runs into the next one);
    single newlines (verse lines, wrapped prose) are spaces.
    """
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        sentences.extend(s for s in _SENTENCE_END.split(flat) if s)
    return sentences


def held_out_documents(split: str = "test") -> tuple[list[str], list[str]]:
    """Texts and sources of the embedded corpus' held-out ``split``: the tasks' default prose."""
    from oryx.data import load_documents  # lazy: callers that pass their own text never need the corpus

    docs = load_documents(split)
    return [d.text for d in docs], [d.source for d in docs]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); returns the number of rows.

    The task samples' ``to_json()`` give lm-eval-friendly fields, e.g.
    ``write_jsonl((s.to_json() for s in make_records(500)), "swde_synth.jsonl")``.
    """
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
