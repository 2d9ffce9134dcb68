"""LAMBADA-style last-word prediction from held-out prose (docs/data.md §7.5).

A sample is a window of at least ``min_words`` consecutive words of one document whose final word is not a
stopword and already occurs earlier in the window (case-insensitively), so predicting it needs the long-range
context. The target is that final word without trailing punctuation; the context is every word before it.
Metrics: greedy exact-word accuracy (``oryx.eval.scoring.exact_word_match``) and target perplexity
(``oryx.eval.scoring.target_perplexity`` of the targets' log-likelihoods after ``context + " "``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oryx.eval.tasks.common import held_out_documents

# NLTK's English stopwords plus the archaic function words of the embedded corpus (Shakespeare, KJV).
STOPWORDS = frozenset(
    """
    a about above after again against ain all am an and any are aren aren't as at be because been before
    being below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don
    don't down during each few for from further had hadn hadn't has hasn hasn't have haven haven't having he
    her here hers herself him himself his how i if in into is isn isn't it it's its itself just ll m ma me
    mightn mightn't more most mustn mustn't my myself needn needn't no nor not now o of off on once only or
    other our ours ourselves out over own re s same shan shan't she she's should should've shouldn shouldn't
    so some such t than that that'll the their theirs them themselves then there these they this those
    through to too under until up ve very was wasn wasn't we were weren weren't what when where which while
    who whom why will with won won't wouldn wouldn't y you you'd you'll you're you've your yours yourself
    yourselves
    also may might must shall would could upon unto thee thou thy thine ye hath doth art dost hast shalt wilt
    thereof therefore whereof wherefore nay yea oh lo
    """.split()  # noqa: SIM905 (a word list reads best as text)
)
_TARGET = re.compile(r"([A-Za-z]+)[^\w\s]*")  # a plain word, maybe followed by punctuation
_EDGE_PUNCT = "\"'“”‘’()[]{}.,;:!?-—_*"


@dataclass(frozen=True)
class LambadaSample:
    """One last-word sample: the model reads ``context`` and should continue with ``" " + target``."""

    context: str
    target: str

    def to_json(self) -> dict[str, Any]:
        """lm-eval fields: doc_to_text ``context``, doc_to_target ``" " + target``; ``text`` is the passage."""
        return {"text": f"{self.context} {self.target}", "context": self.context, "target": self.target}


def _windows(words: list[str], min_words: int, max_words: int) -> list[LambadaSample]:
    bare = [w.strip(_EDGE_PUNCT).lower() for w in words]
    out = []
    start = 0
    while start + min_words <= len(words):
        for end in range(start + min_words - 1, min(start + max_words, len(words))):
            match = _TARGET.fullmatch(words[end])
            if match and bare[end] not in STOPWORDS and bare[end] in bare[start:end]:
                out.append(LambadaSample(" ".join(words[start:end]), match.group(1)))
                start = end + 1
                break
        else:
            start += max_words - min_words + 1
    return out


def make_lambada(
    documents: Sequence[str] | None = None,
    n: int | None = None,
    min_words: int = 50,
    max_words: int = 120,
    seed: int = 0,
) -> list[LambadaSample]:
    """Non-overlapping last-word windows of ``documents``, in document order.

    Args:
        documents: held-out texts (default: the embedded corpus' test split).
        n: keep a seeded random subset of this size (default: every window found).
        min_words: fewest words per window, target included.
        max_words: most words per window; a window grows from ``min_words`` until its last word qualifies.
        seed: seed of the subset.
    """
    if documents is None:
        documents = held_out_documents("test")[0]
    samples = [s for doc in documents for s in _windows(doc.split(), min_words, max_words)]
    if n is not None and n < len(samples):
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False))
        samples = [samples[i] for i in keep]
    return samples
