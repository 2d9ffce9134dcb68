"""Our evaluation tasks as local lm-evaluation-harness tasks: JSONL data from the task generators plus one YAML per
task (``dataset_path: json`` with absolute ``data_files``), so lm-eval runs them with no hub.

    oryx eval export-lm-eval-tasks lm_eval_tasks --tokenizer CHECKPOINT --niah-lengths 512 1024
    python -m oryx.eval.harness --model oryx --model_args pretrained=CHECKPOINT,schedule=tail:attn=0 \\
        --include_path lm_eval_tasks --tasks oryx_zeroshot oryx_retrieval --device cpu

=====================  ====================  =========================================  ====================
task                   tag                   request                                    metrics
=====================  ====================  =========================================  ====================
oryx_lambada           oryx_zeroshot         loglikelihood of ``" " + target``          acc, perplexity
oryx_next_sentence     oryx_zeroshot         multiple choice, ``" " + choice``          acc, acc_norm
oryx_niah_{1,2,3}_<L>  oryx_retrieval        generate until "\\n", ≤ 48 tokens, greedy   contains
oryx_records_{kv,html} oryx_retrieval        as NIAH                                    contains
=====================  ====================  =========================================  ====================

The samples are the ones ``oryx eval zeroshot`` / ``retrieval`` score with the same seed and count (NIAH's
haystacks are sized with the tokenizer given here), so lm-eval reproduces their numbers. ``contains`` is
``oryx.eval.scoring.contains``, imported by the exported ``oryx_utils.py`` (oryx must be importable).
Regenerate after moving the folder: the YAMLs hold absolute paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from oryx.eval.scoring import MAX_GEN_TOKENS, STOP
from oryx.eval.tasks import NIAH_TASKS, make_lambada, make_next_sentence, make_niah, make_records, write_jsonl

__all__ = ["export_lm_eval_tasks"]

UTILS = '''"""Scoring of the exported Oryx generation tasks (written by oryx.eval.lm_eval_tasks)."""

from oryx.eval.scoring import contains


def process_results(doc, results):
    """lm-eval swde/fda's metric: the gold answer occurs in the generation, case-insensitively."""
    return {"contains": float(contains(results[0], doc["answer"]))}
'''


def _task(name: str, tag: str, data: Path, **fields: Any) -> dict[str, Any]:
    return {
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }


_GENERATION = {
    "output_type": "generate_until",
    "generation_kwargs": {"until": [STOP], "max_gen_toks": MAX_GEN_TOKENS, "do_sample": False},
    "process_results": "!function oryx_utils.process_results",
    "metric_list": [{"metric": "contains", "aggregation": "mean", "higher_is_better": True}],
}


class _Dumper(yaml.SafeDumper):
    """Dumps ``"!function x"`` strings as lm-eval's ``!function`` tag."""


_Dumper.add_representer(
    str,
    lambda dumper, text: (
        dumper.represent_scalar("!function", text.removeprefix("!function "))
        if text.startswith("!function ")
        else dumper.represent_str(text)
    ),
)


def export_lm_eval_tasks(
    out_dir: str | Path,
    tokenizer,
    niah_lengths: Sequence[int] = (512, 1024, 2000),
    niah_n: int = 50,
    records_n: int = 50,
    lambada_n: int | None = 500,
    next_sentence_n: int | None = 500,
    seed: int = 0,
) -> list[str]:
    """Write the tasks (YAML per task, JSONL data, ``oryx_utils.py``) into ``out_dir``; returns the task names.

    Args:
        tokenizer: sizes the NIAH haystacks (use the tokenizer of the models to be evaluated).
        niah_lengths: NIAH prompt lengths in tokens (one task per NIAH variant and length).
        niah_n, records_n, lambada_n, next_sentence_n: samples per task (None = every LAMBADA / next-sentence
            sample of the held-out split).
    """
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "oryx_utils.py").write_text(UTILS)
    tasks: dict[str, dict[str, Any]] = {}

    data = out / "data" / "oryx_lambada.jsonl"
    write_jsonl((s.to_json() for s in make_lambada(n=lambada_n, seed=seed)), data)
    tasks["oryx_lambada"] = _task(
        "oryx_lambada", "oryx_zeroshot", data,
        output_type="loglikelihood",
        doc_to_text="{{context}}",
        doc_to_target="{{' ' + target}}",
        metric_list=[
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    )  # fmt: skip
    data = out / "data" / "oryx_next_sentence.jsonl"
    write_jsonl((s.to_json() for s in make_next_sentence(n=next_sentence_n, seed=seed)), data)
    tasks["oryx_next_sentence"] = _task(
        "oryx_next_sentence", "oryx_zeroshot", data,
        output_type="multiple_choice",
        doc_to_text="context",
        doc_to_choice="choices",
        doc_to_target="gold",
        metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    )  # fmt: skip
    for task in NIAH_TASKS:
        for length in niah_lengths:
            name = f"oryx_{task}_{length}"
            data = out / "data" / f"{name}.jsonl"
            write_jsonl((s.to_json() for s in make_niah(task, niah_n, length, tokenizer, seed=seed)), data)
            tasks[name] = _task(
                name, "oryx_retrieval", data, doc_to_text="{{context}}{{question}}", doc_to_target="{{answer}}",
                **_GENERATION,
            )  # fmt: skip
    for fmt in ("kv", "html"):
        name = f"oryx_records_{fmt}"
        data = out / "data" / f"{name}.jsonl"
        rows = ({"text": r.context + r.prompt, "answer": r.answer} for r in make_records(records_n, fmt=fmt, seed=seed))
        write_jsonl(rows, data)
        tasks[name] = _task(
            name, "oryx_retrieval", data, doc_to_text="{{text}}", doc_to_target="{{answer}}", **_GENERATION
        )
    for name, config in tasks.items():
        (out / f"{name}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    return list(tasks)
