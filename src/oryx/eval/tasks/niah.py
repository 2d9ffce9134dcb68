"""Needle in a haystack, RULER's single-needle tasks S-NIAH-1/2/3.

=========  ===================================================  ======================
task       haystack                                             needle value
=========  ===================================================  ======================
niah_1     repeated noise ("The grass is green. The sky ...")   7-digit number
niah_2     held-out prose                                       7-digit number
niah_3     held-out prose                                       UUID
=========  ===================================================  ======================

A sample is ``PREAMBLE + haystack (needle inserted at a depth) + QUESTION``; the answer is the needle's value,
scored with ``oryx.eval.scoring.contains`` on a greedy generation. The *context* (preamble and haystack) ends
where the question starts, which is the switch point of the cross-mode protocol (haystack linear, question and
answer in attention).

The haystack is built from sentences (the last one cut at a word) until the prompt (context + question)
reaches ``target_len`` tokens; the needle goes in at the sentence boundary nearest ``depth`` × haystack tokens.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oryx.eval.tasks._words import ADJECTIVES, NOUNS
from oryx.eval.tasks.common import TextTokenizer, encode_pieces, held_out_documents, split_sentences

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
# task -> (haystack kind, value kind)
NIAH_TASKS: dict[str, tuple[str, str]] = {
    "niah_1": ("noise", "number"),
    "niah_2": ("prose", "number"),
    "niah_3": ("prose", "uuid"),
}
_PLURAL = {"number": "numbers", "uuid": "uuids"}
PREAMBLE = (
    "Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kinds} afterwards.\n"
)
NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
QUESTION = (
    "\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
    "The special magic {kind} for {key} mentioned in the provided text is"
)
# Prose "sentences" longer than this (verse without full stops) are cut, so the depth stays precise.
MAX_UNIT_WORDS = 40


@dataclass(frozen=True)
class NiahSample:
    """One needle-in-a-haystack prompt.

    Attributes:
        task: "niah_1", "niah_2" or "niah_3".
        context: preamble + haystack with the needle (ends before the question's newline).
        question: the query; the prompt is ``context + question``.
        answer: the needle's value (expected right after the question, after a space).
        key: the needle's key, e.g. "fluffy-otter".
        depth: requested depth fraction in [0, 1].
        input_ids: token ids of ``context + question``.
        context_len: number of tokens of ``context``; ``input_ids[context_len:]`` is the question.
        needle_span: [start, end) token indices of the needle sentence in ``input_ids``.
        answer_ids: token ids of ``" " + answer`` (teacher-forced scoring).
    """

    task: str
    context: str
    question: str
    answer: str
    key: str
    depth: float
    input_ids: list[int]
    context_len: int
    needle_span: tuple[int, int]
    answer_ids: list[int]

    def to_json(self) -> dict[str, Any]:
        """lm-eval local-task fields: text ``{{context}}{{question}}``, target ``{{answer}}``."""
        return {
            "context": self.context,
            "question": self.question,
            "answer": self.answer,
            "key": self.key,
            "depth": self.depth,
        }


class _Units:
    """An endless stream of haystack sentences starting at some index, with their token counts cached."""

    def __init__(self, sentences: Sequence[str], tokenizer: TextTokenizer) -> None:
        self.sentences, self.tokenizer = sentences, tokenizer
        self._count: dict[int, int] = {}

    def _len(self, text: str) -> int:  # counted with the leading space text gets inside the haystack
        return len(self.tokenizer.encode(" " + text, add_special_tokens=False))

    def tokens(self, i: int) -> int:
        i %= len(self.sentences)
        if i not in self._count:
            self._count[i] = self._len(self.sentences[i])
        return self._count[i]

    def take(self, start: int, budget: int) -> list[str]:
        """At most ``budget`` tokens: whole sentences from ``start`` (wrapping around), then the longest word
        prefix of the next sentence that still fits, so that the haystack fills the budget to a token or two."""
        out: list[str] = []
        i = start
        while budget >= self.tokens(i):
            budget -= self.tokens(i)
            out.append(self.sentences[i % len(self.sentences)])
            i += 1
        words = self.sentences[i % len(self.sentences)].split()
        low, high = 0, len(words) - 1  # binary search: token counts of word prefixes only grow
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self._len(" ".join(words[:mid])) <= budget else (low, mid - 1)
        if low:
            out.append(" ".join(words[:low]))
        return out


def _prose_units(documents: Sequence[str]) -> list[str]:
    units = []
    for doc in documents:
        for sentence in split_sentences(doc):
            words = sentence.split()
            units.extend(" ".join(words[i : i + MAX_UNIT_WORDS]) for i in range(0, len(words), MAX_UNIT_WORDS))
    return units


def _value(kind: str, rng: np.random.Generator) -> str:
    if kind == "number":
        return str(rng.integers(1_000_000, 10_000_000))
    return str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))


def _assemble(
    task: str,
    units: list[str],
    depth: float,
    key: str,
    value: str,
    tokenizer: TextTokenizer,
) -> NiahSample:
    kind = NIAH_TASKS[task][1]
    kinds = _PLURAL[kind]
    counts = [len(ids) for ids in encode_pieces(tokenizer, [" " + u for u in units])]
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    at = int(np.abs(cumulative - depth * cumulative[-1]).argmin())  # sentence boundary nearest the depth
    needle = NEEDLE.format(kinds=kinds, key=key, value=value)
    items = [*units[:at], needle, *units[at:]]
    pieces = [PREAMBLE.format(kinds=kinds), items[0], *(" " + s for s in items[1:])]
    question = QUESTION.format(kind=kind, key=key)
    encoded = encode_pieces(tokenizer, [*pieces, question, " " + value])
    lengths = [len(ids) for ids in encoded[:-2]]
    needle_start = sum(lengths[: at + 1])  # +1: the preamble piece
    context_ids = [t for ids in encoded[:-2] for t in ids]
    return NiahSample(
        task=task,
        context="".join(pieces),
        question=question,
        answer=value,
        key=key,
        depth=depth,
        input_ids=context_ids + encoded[-2],
        context_len=len(context_ids),
        needle_span=(needle_start, needle_start + lengths[at + 1]),
        answer_ids=encoded[-1],
    )


def make_niah(
    task: str,
    n: int,
    target_len: int,
    tokenizer: TextTokenizer,
    documents: Sequence[str] | None = None,
    depths: Sequence[float] | None = None,
    seed: int = 0,
) -> list[NiahSample]:
    """``n`` needle-in-a-haystack prompts of about ``target_len`` tokens (context + question).

    Args:
        task: a key of ``NIAH_TASKS``.
        n: number of samples.
        target_len: prompt length in tokens; a prompt is never longer and falls short by a few tokens at most
            (the haystack may end inside a sentence to get there).
        tokenizer: any Hugging Face tokenizer (``encode``/``decode``).
        documents: held-out prose for niah_2/3 (default: the embedded corpus' test split); unused by niah_1.
        depths: needle depth per sample, fractions in [0, 1] (default: ``n`` evenly spaced from 0 to 1).
        seed: seed of keys, values and haystack start positions.

    Raises:
        ValueError: unknown task, or ``target_len`` too short to hold the preamble, needle and question.
    """
    if task not in NIAH_TASKS:
        raise ValueError(f"unknown NIAH task {task!r}; choose one of {', '.join(NIAH_TASKS)}")
    haystack, kind = NIAH_TASKS[task]
    if depths is None:
        depths = np.linspace(0.0, 1.0, n).tolist() if n > 1 else [0.5] * n
    if len(depths) != n:
        raise ValueError(f"got {len(depths)} depths for {n} samples")
    if haystack == "noise":
        sentences: Sequence[str] = NOISE_SENTENCES
    else:
        sentences = _prose_units(held_out_documents("test")[0] if documents is None else documents)
    units = _Units(sentences, tokenizer)
    rng = np.random.default_rng(seed)
    samples = []
    for depth in depths:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        # A noise haystack starts at its first sentence, as RULER's; prose starts anywhere.
        start = 0 if haystack == "noise" else int(rng.integers(len(sentences)))
        value = _value(kind, rng)
        fixed = len(_assemble(task, [], depth, key, value, tokenizer).input_ids)
        if fixed > target_len:
            raise ValueError(f"target_len={target_len} is shorter than the {fixed} tokens without a haystack")
        budget = target_len - fixed
        while True:
            chosen = units.take(start, budget)
            while value in " ".join(chosen):  # the answer must occur in the haystack only as the needle
                value = _value(kind, rng)
            sample = _assemble(task, chosen, float(depth), key, value, tokenizer)
            excess = len(sample.input_ids) - target_len
            if excess <= 0 or not chosen:
                break
            # Sentences next to each other, the first without its space, or a redrawn value can encode longer.
            budget -= excess
        samples.append(sample)
    return samples
