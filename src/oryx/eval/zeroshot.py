"""Zero-shot runner (paper Table 1 stand-ins): LAMBADA-style last word and multiple-choice next sentence, from the
embedded corpus' held-out split, under any mode rule.

* ``lambada``: acc = every token of ``" " + target`` is the argmax given the context and the earlier target
  tokens (greedy decoding would produce the word: lm-eval's LAMBADA acc), ppl = exp(−mean target log-likelihood).
* ``next_sentence``: acc / acc_norm = argmax of the summed log-likelihood of ``" " + choice`` (divided by
  ``len(choice)`` for acc_norm), as lm-eval's multiple_choice.

The prompt of a rule is the context, so ``cross`` (= ``tail:attn=0``) reads the context in linear mode and the
continuation in attention. The exported lm-eval tasks (``oryx.eval.lm_eval_tasks``) score the same samples the
same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from oryx.eval.inference import ModeRule, continuation_logliks
from oryx.eval.report import ResultRow
from oryx.eval.retrieval import family_of
from oryx.eval.scoring import mc_accuracy, target_perplexity
from oryx.eval.tasks import make_lambada, make_next_sentence

ZEROSHOT_TASKS = ("lambada", "next_sentence")

__all__ = ["ZEROSHOT_TASKS", "run_zeroshot"]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def run_zeroshot(
    model: torch.nn.Module,
    tokenizer,
    label: str,
    tasks: Sequence[str] = ZEROSHOT_TASKS,
    n: int | None = 500,
    rules: Sequence[ModeRule] = (ModeRule("attn"), ModeRule("linear")),
    batch_size: int = 16,
    precision: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """Zero-shot metrics of ``model`` per task and per mode rule it supports (``n`` samples per task, None = all).

    Raises:
        ValueError: an unknown task, or no rule the model supports.
    """
    unknown = [t for t in tasks if t not in ZEROSHOT_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot tasks {unknown}; choose from {', '.join(ZEROSHOT_TASKS)}")
    runnable = [r for r in rules if r.supported_by(model.config.supported_modes)]
    if not runnable:
        raise ValueError(f"none of the modes {[str(r) for r in rules]} runs on a {family_of(model)} model")
    rows = []
    for task in tasks:
        if task == "lambada":
            samples = make_lambada(n=n, seed=seed)
            requests = [(_encode(tokenizer, s.context), _encode(tokenizer, " " + s.target)) for s in samples]
        else:
            items = make_next_sentence(n=n, seed=seed)
            requests = [(_encode(tokenizer, s.context), _encode(tokenizer, " " + c)) for s in items for c in s.choices]
        for rule in runnable:
            result = continuation_logliks(model, requests, rule, batch_size, precision, seed)
            if task == "lambada":
                metrics = {"acc": float(np.mean(result.greedy)), "ppl": target_perplexity(result.logliks)}
                count = len(samples)
            else:
                k = len(items[0].choices)
                logliks = [result.logliks[i : i + k] for i in range(0, len(result.logliks), k)]
                lengths = [[len(c) for c in s.choices] for s in items]
                metrics = mc_accuracy(logliks, lengths, [s.gold for s in items])
                count = len(items)
            row = ResultRow(
                model=label,
                family=family_of(model),
                protocol=str(rule),
                task=task,
                setting="",
                seq_len=float(np.mean([len(c) + len(t) for c, t in requests])),
                metrics=metrics,
                attention_tokens=result.attention_tokens,
                tokens=result.tokens,
                n=count,
            )
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            log(f"{label} {task} {rule}: {shown}, attention {row.attention_fraction:.1%}")
            rows.append(row)
    return rows
