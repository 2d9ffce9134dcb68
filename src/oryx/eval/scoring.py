"""Model-independent scoring, with lm-eval's conventions (docs/data.md §7.7).

* Generation tasks (records/SWDE/FDA, NIAH): greedy, stop at ``"\\n"``, at most ``MAX_GEN_TOKENS`` new tokens,
  ``contains``: case-insensitive search of ``re.escape(gold)`` in the generation.
* Multiple choice: acc = argmax of summed continuation log-likelihoods; acc_norm = argmax of the sum
  divided by the choice's character length (tokenizer-independent).
* LAMBADA: greedy exact-word accuracy and perplexity = exp(−mean target log-likelihood).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

MAX_GEN_TOKENS = 48
STOP = "\n"
_EDGE_PUNCT = "\"'“”‘’()[]{}.,;:!?-—_*"


def cut_at_stop(generation: str, stops: Sequence[str] = (STOP,)) -> str:
    """``generation`` before its first stop string (what lm-eval's ``generate_until`` returns)."""
    for stop in stops:
        generation = generation.split(stop, 1)[0]
    return generation


def contains(generation: str, gold: str | Sequence[str]) -> bool:
    """Whether any gold string occurs in ``generation``, case-insensitively and literally (regex-escaped)."""
    golds = [gold] if isinstance(gold, str) else gold
    return any(re.search(re.escape(g), generation, re.IGNORECASE) for g in golds)


def exact_word_match(generation: str, target: str) -> bool:
    """Whether the first word of ``generation``, stripped of surrounding punctuation, is exactly ``target``.

    Case-sensitive, like LAMBADA's greedy accuracy (the greedy tokens must equal the target's).
    """
    words = generation.split()
    return bool(words) and words[0].strip(_EDGE_PUNCT) == target


def mc_predictions(loglik: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Index of the best choice per item: argmax of ``loglik[i][c]`` (or of ``loglik[i][c] / lengths[i][c]``).

    Ties go to the first choice, as ``np.argmax`` (and lm-eval) do.
    """
    if lengths is None:
        return [int(np.argmax(ll)) for ll in loglik]
    return [int(np.argmax(np.asarray(ll, float) / np.asarray(n, float))) for ll, n in zip(loglik, lengths, strict=True)]


def mc_accuracy(
    loglik: Sequence[Sequence[float]],
    lengths: Sequence[Sequence[int]],
    gold: Sequence[int],
) -> dict[str, float]:
    """acc and acc_norm of multiple-choice items.

    Args:
        loglik: per item, per choice, the summed log-probability of the continuation (``" " + choice``).
        lengths: per item, per choice, the character length of the choice, ``len(choice)`` as lm-eval uses.
        gold: per item, the index of the right choice.

    Returns:
        ``{"acc": ..., "acc_norm": ...}``, means over items.
    """
    if not len(loglik) == len(lengths) == len(gold):
        raise ValueError(f"got {len(loglik)} loglik rows, {len(lengths)} length rows and {len(gold)} golds")
    acc = np.mean(np.asarray(mc_predictions(loglik)) == np.asarray(gold))
    acc_norm = np.mean(np.asarray(mc_predictions(loglik, lengths)) == np.asarray(gold))
    return {"acc": float(acc), "acc_norm": float(acc_norm)}


def target_perplexity(logliks: Sequence[float]) -> float:
    """exp(−mean) of per-sample target log-likelihoods (natural log): lm-eval's LAMBADA ``perplexity``."""
    return math.exp(-float(np.mean(logliks)))
