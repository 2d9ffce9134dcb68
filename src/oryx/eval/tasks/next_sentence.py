"""Multiple-choice next sentence from held-out prose: a HellaSwag/ARC-style substitute (docs/data.md §7.6).

The context is ``context_sentences`` consecutive sentences of a document; the choices are the true next
sentence and ``num_choices − 1`` sentences drawn from other documents of the same source (for a source with a
single document, from the same document at least ``min_distance`` sentences away), in random order. Score each
continuation ``" " + choice`` by its summed log-likelihood after the context and pass the sums, with
``len(choice)``, to ``oryx.eval.scoring.mc_accuracy`` (acc and lm-eval's character-normalised acc_norm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oryx.eval.tasks.common import held_out_documents, split_sentences


@dataclass(frozen=True)
class NextSentenceSample:
    """One multiple-choice item: ``choices[gold]`` is the sentence after ``context`` in its document."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def to_json(self) -> dict[str, Any]:
        """lm-eval local-task fields: doc_to_text ``context``, doc_to_choice ``choices``, target ``gold``."""
        return {"context": self.context, "choices": list(self.choices), "gold": self.gold}


def make_next_sentence(
    documents: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    n: int | None = None,
    context_sentences: int = 3,
    num_choices: int = 4,
    min_words: int = 4,
    max_words: int = 40,
    min_distance: int = 200,
    seed: int = 0,
) -> list[NextSentenceSample]:
    """Next-sentence items from non-overlapping stretches of ``documents``.

    Args:
        documents: held-out texts (default: the embedded corpus' test split, with its sources).
        sources: source name per document; distractors come from the item's source (default: all one source).
        n: keep a seeded random subset of this size (default: every item found).
        context_sentences: k, sentences in the context.
        num_choices: the true sentence plus ``num_choices − 1`` distractors.
        min_words, max_words: word-count band of every choice, true or not (keeps choice lengths comparable).
        min_distance: for a single-document source, how many sentences away a distractor must be.
        seed: seed of the subset, the distractors and the gold position.

    Raises:
        ValueError: ``sources`` of the wrong length, or a source too small to give distinct distractors.
    """
    if documents is None:
        documents, sources = held_out_documents("test")
    if sources is None:
        sources = [""] * len(documents)
    if len(sources) != len(documents):
        raise ValueError(f"got {len(sources)} sources for {len(documents)} documents")
    sentences = [split_sentences(doc) for doc in documents]
    usable = [[min_words <= len(s.split()) <= max_words for s in doc] for doc in sentences]
    # Per source, every usable sentence as (document, index): the distractor pool.
    pools: dict[str, list[tuple[int, int]]] = {}
    for d, flags in enumerate(usable):
        pools.setdefault(sources[d], []).extend((d, i) for i, ok in enumerate(flags) if ok)
    docs_of = {src: {d for d, _ in pool} for src, pool in pools.items()}

    k = context_sentences
    items = [(d, i) for d, doc in enumerate(sentences) for i in range(0, len(doc) - k, k + 1) if usable[d][i + k]]
    rng = np.random.default_rng(seed)
    if n is not None and n < len(items):
        items = [items[j] for j in np.sort(rng.choice(len(items), n, replace=False))]

    samples = []
    for d, i in items:
        true = sentences[d][i + k]
        pool = pools[sources[d]]
        multi_doc = len(docs_of[sources[d]]) > 1
        choices = [true]
        draws = 0
        while len(choices) < num_choices:  # rejection sampling; a healthy pool needs a handful of draws
            if draws == 100 * num_choices:
                raise ValueError(f"source {sources[d]!r} is too small for {num_choices - 1} distinct distractors")
            draws += 1
            e, j = pool[int(rng.integers(len(pool)))]
            allowed = e != d if multi_doc else abs(j - (i + k)) >= min_distance
            if allowed and sentences[e][j] not in choices:
                choices.append(sentences[e][j])
        gold = int(rng.integers(num_choices))
        choices[0], choices[gold] = choices[gold], choices[0]
        samples.append(NextSentenceSample(" ".join(sentences[d][i : i + k]), tuple(choices), gold))
    return samples
