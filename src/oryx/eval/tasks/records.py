"""Record recall: a synthetic stand-in for SWDE/FDA (semi-structured documents, cloze-style extraction).

A document is one record of 10–50 ``attribute: value`` lines (or HTML-ish table rows); the prompt is a final
line ``"<attribute>:"`` and the gold answer is that attribute's value. Scoring is lm-eval's swde/fda protocol:
greedy generation until ``"\\n"``, at most 48 tokens, ``oryx.eval.scoring.contains`` (case-insensitive
substring match of the gold). For the cross-mode protocol the context is the record and the prompt its
final line.

Values are drawn from built-in word lists and random numbers, deterministic by seed. Within a record no value
contains another (case-insensitively), so copying a wrong field can never pass ``contains``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from oryx.eval.tasks._words import (
    ADJECTIVES,
    CITIES,
    COLORS,
    COMPANY_SUFFIXES,
    FIRST_NAMES,
    GENRES,
    LANGUAGES,
    LAST_NAMES,
    MONTHS,
    NOUNS,
    STREET_SUFFIXES,
)
from oryx.eval.tasks.common import TextTokenizer, encode_pieces

_Gen = Callable[[np.random.Generator], str]


def _pick(words: tuple[str, ...]) -> _Gen:
    return lambda rng: str(rng.choice(words))


def _person(rng: np.random.Generator) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _digits(n: int) -> _Gen:
    return lambda rng: "".join(str(d) for d in rng.integers(0, 10, n))


def _number(low: int, high: int, unit: str = "") -> _Gen:
    return lambda rng: f"{rng.integers(low, high)}{unit}"


def _date(rng: np.random.Generator) -> str:
    return f"{rng.choice(MONTHS)} {rng.integers(1, 29)}, {rng.integers(1900, 2025)}"


def _title(rng: np.random.Generator) -> str:
    return f"The {rng.choice(ADJECTIVES).title()} {rng.choice(NOUNS).title()}"


def _company(rng: np.random.Generator) -> str:
    return f"{rng.choice(LAST_NAMES)} {rng.choice(COMPANY_SUFFIXES)}"


def _address(rng: np.random.Generator) -> str:
    return f"{rng.integers(1, 2000)} {rng.choice(NOUNS).title()} {rng.choice(STREET_SUFFIXES)}"


def _email(rng: np.random.Generator) -> str:
    return f"{rng.choice(FIRST_NAMES).lower()}.{rng.choice(NOUNS)}{rng.integers(10, 100)}@example.org"


# attribute -> value generator; a record never repeats an attribute.
ATTRIBUTES: dict[str, _Gen] = {
    "name": _person,
    "title": _title,
    "author": _person,
    "director": _person,
    "editor": _person,
    "manager": _person,
    "contact person": _person,
    "year": _number(1900, 2025),
    "founded": _number(1800, 2025),
    "release date": _date,
    "birth date": _date,
    "last updated": _date,
    "city": _pick(CITIES),
    "birthplace": _pick(CITIES),
    "headquarters": _pick(CITIES),
    "address": _address,
    "zip code": _digits(5),
    "phone": lambda rng: f"{_digits(3)(rng)}-{_digits(3)(rng)}-{_digits(4)(rng)}",
    "fax": lambda rng: f"+1 {_digits(3)(rng)} {_digits(7)(rng)}",
    "email": _email,
    "website": lambda rng: f"www.{rng.choice(ADJECTIVES)}{rng.choice(NOUNS)}.com",
    "company": _company,
    "publisher": _company,
    "studio": _company,
    "color": _pick(COLORS),
    "genre": _pick(GENRES),
    "language": _pick(LANGUAGES),
    "category": _pick(NOUNS),
    "material": lambda rng: f"{rng.choice(ADJECTIVES)} {rng.choice(('oak', 'steel', 'glass', 'clay'))}",
    "price": lambda rng: f"${rng.integers(1, 1000)}.{rng.integers(0, 100):02d}",
    "budget": lambda rng: f"${rng.integers(1, 500)} million",
    "revenue": lambda rng: f"${rng.integers(1, 90)}.{rng.integers(0, 10)} billion",
    "employees": _number(10, 100_000),
    "rating": lambda rng: f"{rng.integers(1, 10)}.{rng.integers(0, 10)}/10",
    "votes": _number(100, 1_000_000),
    "runtime": _number(60, 240, " min"),
    "pages": _number(50, 1500),
    "weight": _number(1, 500, " kg"),
    "height": lambda rng: f"{rng.integers(1, 3)}.{rng.integers(0, 100):02d} m",
    "isbn": lambda rng: (
        f"97{rng.integers(8, 10)}-{_digits(1)(rng)}-{_digits(4)(rng)}-{_digits(4)(rng)}-{_digits(1)(rng)}"
    ),
    "serial number": lambda rng: f"SN-{_digits(8)(rng)}",
    "license": lambda rng: f"{rng.choice(LAST_NAMES).upper()}-{_digits(4)(rng)}",
    "case number": lambda rng: f"{rng.integers(1990, 2025)}-CV-{_digits(5)(rng)}",
    "account": _digits(10),
    "model": lambda rng: f"{rng.choice(NOUNS).title()} {rng.integers(100, 1000)}",
    "nickname": lambda rng: f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
    "motto": lambda rng: f"{rng.choice(ADJECTIVES).title()} and {rng.choice(ADJECTIVES)}",
    "mascot": _pick(NOUNS),
    "award": lambda rng: f"{rng.choice(CITIES)} {rng.choice(NOUNS).title()} Prize",
    "country of origin": lambda rng: f"Republic of {rng.choice(CITIES)}",
    "population": _number(1_000, 10_000_000),
    "area": _number(10, 100_000, " km2"),
    "elevation": _number(0, 4000, " m"),
    "latitude": lambda rng: f"{rng.integers(0, 90)}.{_digits(4)(rng)} N",
    "longitude": lambda rng: f"{rng.integers(0, 180)}.{_digits(4)(rng)} W",
    "status": _pick(("active", "retired", "pending", "archived", "suspended", "draft")),
}
FORMATS = ("kv", "html")


@dataclass(frozen=True)
class RecordSample:
    """One record-recall prompt.

    Attributes:
        context: the record, one field per line, ending with a newline.
        prompt: the final line, ``"<attribute>:"``; the model continues it.
        answer: the gold value of ``attribute`` in the record.
        attribute: the queried attribute.
        fields: the record's (attribute, value) pairs in document order.
        fmt: "kv" (``attr: value``) or "html" (``<tr><td>attr</td><td>value</td></tr>``).
    """

    context: str
    prompt: str
    answer: str
    attribute: str
    fields: tuple[tuple[str, str], ...]
    fmt: str

    def encode(self, tokenizer: TextTokenizer) -> tuple[list[int], int]:
        """(token ids of ``context + prompt``, number of context tokens: the cross-mode switch point)."""
        context_ids, prompt_ids = encode_pieces(tokenizer, [self.context, self.prompt])
        return context_ids + prompt_ids, len(context_ids)

    def to_json(self) -> dict[str, Any]:
        """lm-eval swde/fda fields: ``text`` (the prompt), ``value`` (the gold), plus the split."""
        return {
            "text": self.context + self.prompt,
            "value": self.answer,
            "context": self.context,
            "prompt": self.prompt,
        }


def _draw_fields(rng: np.random.Generator, num_fields: int) -> list[tuple[str, str]] | None:
    fields: list[tuple[str, str]] = []
    for name in rng.permutation(list(ATTRIBUTES)):
        # No value may contain another, so that copying a wrong field never matches the gold; an attribute whose
        # values keep colliding (e.g. pages "978" against any ISBN prefix) gives way to the next one.
        for _ in range(20):
            value = ATTRIBUTES[name](rng)
            low = value.lower()
            if all(low not in v.lower() and v.lower() not in low for _, v in fields):
                fields.append((str(name), value))
                break
        if len(fields) == num_fields:
            return fields
    return None  # too many attributes gave way (only near len(ATTRIBUTES) fields): the caller draws again


def _render(fields: list[tuple[str, str]], fmt: str) -> str:
    if fmt == "kv":
        return "".join(f"{a}: {v}\n" for a, v in fields)
    rows = "".join(f"<tr><td>{a}</td><td>{v}</td></tr>\n" for a, v in fields)
    return f"<table>\n{rows}</table>\n"


def make_records(
    n: int,
    num_fields: tuple[int, int] = (10, 50),
    fmt: str = "kv",
    seed: int = 0,
) -> list[RecordSample]:
    """``n`` record-recall prompts.

    Args:
        n: number of samples.
        num_fields: inclusive range of fields per record, drawn uniformly per sample; raise it to lengthen the
            documents (at most ``len(ATTRIBUTES)``).
        fmt: a name in ``FORMATS``.
        seed: seed of the records and of the queried attribute.

    Raises:
        ValueError: unknown format or a field range outside [1, len(ATTRIBUTES)].
        RuntimeError: values that cannot be kept apart in 10 tries (about 1 in 5,000 records of
            ``len(ATTRIBUTES)`` fields needs a second try).
    """
    low, high = num_fields
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not 1 <= low <= high <= len(ATTRIBUTES):
        raise ValueError(f"num_fields must satisfy 1 <= low <= high <= {len(ATTRIBUTES)}, got {num_fields}")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        size = int(rng.integers(low, high + 1))
        for _ in range(10):
            fields = _draw_fields(rng, size)
            if fields is not None:
                break
        else:
            raise RuntimeError(f"could not draw {size} fields with mutually distinct values; ask for fewer")
        attribute, answer = fields[int(rng.integers(len(fields)))]
        samples.append(RecordSample(_render(fields, fmt), f"{attribute}:", answer, attribute, tuple(fields), fmt))
    return samples
