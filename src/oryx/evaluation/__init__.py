"""Evaluation of trained checkpoints: perplexity / bits per byte under any schedule, and the switching curve.

>>> from oryx.evaluation import evaluate, switching_curves
>>> evaluate(model, tokens, seq_len=512, schedule="linear", tokenizer=tok).perplexity
"""

from oryx.evaluation.perplexity import PerplexityResult, evaluate, unigram_nll
from oryx.evaluation.switching import SwitchingCurves, switching_curves

__all__ = ["PerplexityResult", "SwitchingCurves", "evaluate", "switching_curves", "unigram_nll"]
