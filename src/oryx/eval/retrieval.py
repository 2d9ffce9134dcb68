"""Retrieval runner (paper Tables 2–3): needle in a haystack (RULER S-NIAH-1/2/3) at given lengths and
SWDE/FDA-style record recall, each in single modes and under the cross-mode protocols.

Scoring is lm-eval's swde/fda protocol: greedy generation, stop at the first newline, at most 48 new tokens,
``contains`` (case-insensitive substring match of the gold answer). Under ``cross`` the context (NIAH: preamble
and haystack; records: the record) is read in linear mode and the question, the prompt line and every generated
token in attention; every row reports the fraction of processed tokens (prompt and generation up to the stop)
that used attention.

>>> rows = run_retrieval(model, tokenizer, "oryx-tg", tasks=["niah_1"], lengths=[512], n=20,
...                      rules=[ModeRule("attn"), ModeRule("cross")])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from oryx.eval.inference import ModeRule, greedy_generate
from oryx.eval.report import ResultRow
from oryx.eval.scoring import MAX_GEN_TOKENS, contains
from oryx.eval.tasks import NIAH_TASKS, make_niah, make_records
from oryx.variants import variant

RECORD_TASKS = {"records_kv": "kv", "records_html": "html"}
RETRIEVAL_TASKS = (*NIAH_TASKS, *RECORD_TASKS)

__all__ = ["RETRIEVAL_TASKS", "family_of", "run_retrieval"]


def family_of(model: torch.nn.Module) -> str:
    """The preset family of a model's variant (oryx-tg, gdn, ...; the variant table)."""
    return variant(model.config.variant).family


def task_samples(task: str, length: int, n: int, tokenizer, seed: int) -> tuple[list[list[int]], list[int], list[str]]:
    """(prompts, context lengths, gold answers) of one task setting."""
    if task in NIAH_TASKS:
        samples = make_niah(task, n, length, tokenizer, seed=seed)
        return [s.input_ids for s in samples], [s.context_len for s in samples], [s.answer for s in samples]
    records = make_records(n, fmt=RECORD_TASKS[task], seed=seed)
    encoded = [r.encode(tokenizer) for r in records]
    return [ids for ids, _ in encoded], [c for _, c in encoded], [r.answer for r in records]


def run_retrieval(
    model: torch.nn.Module,
    tokenizer,
    label: str,
    tasks: Sequence[str] = RETRIEVAL_TASKS,
    lengths: Sequence[int] = (512, 1024, 2000),
    n: int = 50,
    rules: Sequence[ModeRule] = (ModeRule("attn"), ModeRule("linear"), ModeRule("cross")),
    max_new_tokens: int = MAX_GEN_TOKENS,
    batch_size: int = 8,
    precision: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[ResultRow]:
    """Recall of ``model`` on each task setting under each mode rule it supports.

    Args:
        label: the model's row label in reports.
        tasks: names from ``RETRIEVAL_TASKS``; records tasks have one setting (10–50 fields), NIAH one per length.
        lengths: NIAH prompt lengths in tokens (the default's 2000 + 48 generated tokens fit a 2K context).
        n: samples per setting.
        rules: mode rules; those the model cannot run (a baseline's other mode) are skipped.

    Raises:
        ValueError: an unknown task, no rule the model supports, or a NIAH length whose prompt and generation
            would not fit the model's positions.
    """
    unknown = [t for t in tasks if t not in RETRIEVAL_TASKS]
    if unknown:
        raise ValueError(f"unknown retrieval tasks {unknown}; choose from {', '.join(RETRIEVAL_TASKS)}")
    room = model.config.max_position_embeddings - max_new_tokens
    if any(task in NIAH_TASKS for task in tasks) and max(lengths) > room:
        raise ValueError(
            f"NIAH length {max(lengths)} + {max_new_tokens} generated tokens exceeds the model's "
            f"{model.config.max_position_embeddings} positions; use lengths <= {room}"
        )
    runnable = [r for r in rules if r.supported_by(model.config.supported_modes)]
    if not runnable:
        raise ValueError(f"none of the modes {[str(r) for r in rules]} runs on a {family_of(model)} model")
    rows = []
    for task in tasks:
        for length in lengths if task in NIAH_TASKS else [None]:
            prompts, context_lens, golds = task_samples(task, length or 0, n, tokenizer, seed)
            for rule in runnable:
                generations = greedy_generate(
                    model,
                    tokenizer,
                    prompts,
                    rule,
                    context_lens,
                    max_new_tokens,
                    batch_size=batch_size,
                    precision=precision,
                    seed=seed,
                )
                recall = float(np.mean([contains(g.text, gold) for g, gold in zip(generations, golds, strict=True)]))
                row = ResultRow(
                    model=label,
                    family=family_of(model),
                    protocol=str(rule),
                    task=task,
                    setting="" if length is None else str(length),
                    seq_len=float(np.mean([len(p) for p in prompts])),
                    metrics={"recall": recall},
                    attention_tokens=sum(g.attention_tokens for g in generations),
                    tokens=sum(g.tokens for g in generations),
                    n=len(prompts),
                )
                log(
                    f"{label} {task} {row.setting or '-'} {rule}: recall {recall:.3f}, "
                    f"attention {row.attention_fraction:.1%}"
                )
                rows.append(row)
    return rows
