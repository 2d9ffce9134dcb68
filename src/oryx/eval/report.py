"""Benchmark results as rows, their JSON files, and the report: a Markdown table per benchmark and metric
(one row per model and mode) and a PNG plot per benchmark (metric against sequence length, one panel per mode,
one line per model and task).

A result file is ``{"benchmark": NAME, "metrics": [...], "rows": [...], "meta": {...}}``; each row is a
``ResultRow``; ``meta["notes"]`` (Markdown, optional) is printed under the tables. ``oryx eval report DIR``
(``oryx eval report DIR``) collects every result file under ``DIR``, so the results of several
checkpoints or families, written next to each one, make one table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ResultRow",
    "find_results",
    "markdown_tables",
    "plot_benchmark",
    "read_results",
    "write_report",
    "write_results",
]

# Metrics where lower is better: no "avg" column (a mean of perplexities of different tasks means little).
LOWER_IS_BETTER = {"ppl"}


@dataclass
class ResultRow:
    """One measurement: a model under one mode rule on one task setting.

    Attributes:
        model: the row label of the tables (a family such as "oryx-tg", or a checkpoint name).
        family: the model family (oryx-tg, oryx-tm, transformer, mamba2, gdn).
        protocol: the mode rule (``oryx.eval.inference.ModeRule``), e.g. "attn", "cross", "tail:attn=64".
        task: e.g. "mqar", "niah_1", "lambada".
        setting: the task's setting, e.g. "64x4" (MQAR L×K) or "1024" (NIAH length); "" if none.
        seq_len: the (mean) sequence length of the setting, the plots' x order.
        metrics: metric name -> value (accuracy-like metrics in [0, 1]).
        attention_tokens, tokens: tokens processed in attention, and in all, for the attention fraction.
        n: number of samples.
    """

    model: str
    family: str
    protocol: str
    task: str
    setting: str
    seq_len: float
    metrics: dict[str, float]
    attention_tokens: int
    tokens: int
    n: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_fraction(self) -> float:
        return self.attention_tokens / self.tokens if self.tokens else math.nan

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "attention_fraction": self.attention_fraction}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRow:
        return cls(**{k: v for k, v in data.items() if k != "attention_fraction"})


def write_results(
    path: str | Path, benchmark: str, metrics: Sequence[str], rows: Iterable[ResultRow], meta: dict[str, Any]
) -> Path:
    """Write a result file (see the module docstring); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "metrics": list(metrics), "rows": [r.to_json() for r in rows], "meta": meta}
    path.write_text(json.dumps(payload, indent=1))
    return path


def read_results(path: str | Path) -> tuple[str, list[str], list[ResultRow], str]:
    """(benchmark, metrics, rows, notes) of a result file."""
    data = json.loads(Path(path).read_text())
    rows = [ResultRow.from_json(r) for r in data["rows"]]
    return data["benchmark"], data["metrics"], rows, data.get("meta", {}).get("notes", "")


def find_results(root: str | Path) -> list[Path]:
    """Every result file under ``root`` (JSON files with a top-level "benchmark" and "rows")."""
    found = []
    for path in sorted(Path(root).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "benchmark" in data and "rows" in data:
            found.append(path)
    return found


def _columns(rows: Sequence[ResultRow]) -> list[tuple[str, str]]:
    """(task, setting) columns in the order of first appearance, sorted by sequence length within a task."""
    first: dict[tuple[str, str], tuple[int, float]] = {}
    tasks: dict[str, int] = {}
    for row in rows:
        tasks.setdefault(row.task, len(tasks))
        first.setdefault((row.task, row.setting), (tasks[row.task], row.seq_len))
    return sorted(first, key=lambda c: first[c])


def _column_name(task: str, setting: str, tasks: set[str]) -> str:
    if len(tasks) == 1:
        return setting or task
    return f"{task} {setting}".strip()


def _fmt(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f}" if metric in LOWER_IS_BETTER else f"{100 * value:.1f}"


def markdown_tables(benchmark: str, metrics: Sequence[str], rows: Sequence[ResultRow]) -> str:
    """One Markdown table per metric: rows (model, mode), columns (task, setting), then the mean and the
    fraction of tokens processed in attention. Accuracy-like metrics are shown in percent."""
    columns = _columns(rows)
    tasks = {t for t, _ in columns}
    keys = list(dict.fromkeys((r.model, r.protocol) for r in rows))
    cells = {(r.model, r.protocol, r.task, r.setting): r for r in rows}
    out = []
    for metric in metrics:
        present = [c for c in columns if any(metric in r.metrics for r in rows if (r.task, r.setting) == c)]
        if not present:
            continue
        unit = "" if metric in LOWER_IS_BETTER else " (%)"
        header = ["model", "mode", *(_column_name(t, s, tasks) for t, s in present)]
        if metric not in LOWER_IS_BETTER:
            header.append("avg")
        header.append("attn %")
        lines = [f"### {benchmark}: {metric}{unit}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, protocol in keys:
            found = [cells.get((model, protocol, t, s)) for t, s in present]
            values = [r.metrics.get(metric) if r else None for r in found]
            line = [model, protocol, *(_fmt(v, metric) for v in values)]
            if metric not in LOWER_IS_BETTER:
                known = [v for v in values if v is not None]
                line.append(_fmt(sum(known) / len(known) if known else None, metric))
            used = [r for r in found if r]
            attn = sum(r.attention_tokens for r in used) / max(1, sum(r.tokens for r in used))
            line.append(f"{100 * attn:.1f}")
            lines.append("| " + " | ".join(line) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def plot_benchmark(benchmark: str, metric: str, rows: Sequence[ResultRow], path: str | Path) -> Path | None:
    """``metric`` against the task setting (ordered by sequence length), one panel per mode rule, one line per
    (model, task), one colour per line across panels. Models measured in a single mode (the baselines) are drawn in
    every panel, dashed where the panel's mode is not theirs, as the reference to beat. Returns None (nothing
    written) when no task has two settings to draw a line through."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    rows = [r for r in rows if metric in r.metrics]
    columns = _columns(rows)
    if not any(sum(t == task for t, _ in columns) > 1 for task, _ in columns):
        return None
    protocols = list(dict.fromkeys(r.protocol for r in rows))
    tasks = {t for t, _ in columns}
    lines = list(dict.fromkeys((r.model, r.task) for r in rows))
    colours = {line: f"C{i % 10}" for i, line in enumerate(lines)}
    modes_of = {model: {r.protocol for r in rows if r.model == model} for model, _ in lines}
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.6), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for model, task in lines:
            own = protocol in modes_of[model]
            if not own and len(modes_of[model]) > 1:
                continue
            points = sorted(
                (columns.index((r.task, r.setting)), r.metrics[metric])
                for r in rows
                if (r.model, r.task) == (model, task) and (r.protocol == protocol or not own)
            )
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                marker="o" if own else None,
                linestyle="-" if own else "--",
                alpha=1.0 if own else 0.5,
                color=colours[model, task],
                label=model if len(tasks) == 1 else f"{model} {task}",
            )
        here = [r for r in rows if r.protocol == protocol]
        attn = sum(r.attention_tokens for r in here) / max(1, sum(r.tokens for r in here))
        ax.set_title(f"{protocol} ({100 * attn:.0f}% attention)", fontsize=10)
        ax.set_xticks(
            range(len(columns)), [_column_name(t, s, tasks) for t, s in columns], rotation=45, fontsize=8, ha="right"
        )
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    if metric not in LOWER_IS_BETTER:
        axes[0][0].set_ylim(-0.02, 1.02)
    handles = [plt.Line2D([], [], color=colours[line], marker="o") for line in lines]
    labels = [model if len(tasks) == 1 else f"{model} {task}" for model, task in lines]
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"{benchmark}: {metric} by setting (sequence length), per mode; dashed: single-mode baselines")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Collect every result file under ``run_dir``; write ``<benchmark>.md`` and ``<benchmark>.png`` per
    benchmark to ``out_dir`` (default ``run_dir``). Returns the files written.

    Raises:
        FileNotFoundError: no result file under ``run_dir``.
    """
    paths = find_results(run_dir)
    if not paths:
        raise FileNotFoundError(f"no result files (JSON with 'benchmark' and 'rows') under {run_dir}")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, tuple[list[str], list[ResultRow], list[str]]] = {}
    for path in paths:
        benchmark, metrics, rows, notes = read_results(path)
        known, collected, all_notes = merged.setdefault(benchmark, ([], [], []))
        known.extend(m for m in metrics if m not in known)
        collected.extend(rows)
        all_notes.extend([notes] if notes else [])
    written = []
    for benchmark, (metrics, rows, notes) in merged.items():
        md = out / f"{benchmark}.md"
        md.write_text(
            f"## {benchmark}\n\n" + markdown_tables(benchmark, metrics, rows) + "".join(f"\n{n}" for n in notes)
        )
        written.append(md)
        try:
            png = plot_benchmark(benchmark, metrics[0], rows, out / f"{benchmark}.png")
        except ImportError:  # a bare GPU image may lack matplotlib: keep the tables, plot later with `report`
            print(f"matplotlib is not installed: no {benchmark}.png (run `oryx eval report` elsewhere)")
            png = None
        if png is not None:
            written.append(png)
    return written
