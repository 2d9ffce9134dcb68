"""Evaluation: perplexity and bits per byte under any schedule (``oryx.eval.perplexity``), the switching curve
(``oryx.eval.switching``), task generators (``oryx.eval.tasks``), model-independent scoring (``oryx.eval.scoring``),
the benchmark runners (``oryx.eval.cli``) and the ``oryx eval`` command (``oryx.eval.command``).

Every task yields text (or, for MQAR, token ids) plus the context/prompt boundary that the paper's cross-mode
protocol needs (docs/paper.md §6.4): ``protocol_modes`` turns boundaries into a ``[B, T]`` modes tensor and
``protocol_schedule`` into an ``oryx.schedule`` spec for generation.
"""

from oryx.eval import scoring, tasks
from oryx.eval.perplexity import PerplexityResult, evaluate, unigram_nll
from oryx.eval.scoring import (
    MAX_GEN_TOKENS,
    contains,
    cut_at_stop,
    exact_word_match,
    mc_accuracy,
    mc_predictions,
    target_perplexity,
)
from oryx.eval.switching import SwitchingCurves, switching_curves
from oryx.eval.tasks import (
    MQAR_TEST_GRID,
    MQAR_TRAIN_MIX,
    NIAH_TASKS,
    PROTOCOLS,
    attention_fraction,
    make_lambada,
    make_mqar,
    make_mqar_suite,
    make_next_sentence,
    make_niah,
    make_records,
    mqar_accuracy,
    mqar_modes,
    protocol_modes,
    protocol_schedule,
    write_jsonl,
)

__all__ = [
    "MAX_GEN_TOKENS",
    "MQAR_TEST_GRID",
    "MQAR_TRAIN_MIX",
    "NIAH_TASKS",
    "PROTOCOLS",
    "PerplexityResult",
    "SwitchingCurves",
    "attention_fraction",
    "contains",
    "cut_at_stop",
    "evaluate",
    "exact_word_match",
    "make_lambada",
    "make_mqar",
    "make_mqar_suite",
    "make_next_sentence",
    "make_niah",
    "make_records",
    "mc_accuracy",
    "mc_predictions",
    "mqar_accuracy",
    "mqar_modes",
    "protocol_modes",
    "protocol_schedule",
    "scoring",
    "switching_curves",
    "target_perplexity",
    "tasks",
    "unigram_nll",
    "write_jsonl",
]
