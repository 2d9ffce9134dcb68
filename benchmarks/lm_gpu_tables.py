"""The tables of `benchmarks/lm_gpu.sh`'s runs (Table 1 at the GPU scale, issue 15), from its results.

    tar -xzf results.tar.gz -C results/         # one or more calls' archives (seeds, LR points) into one folder
    python benchmarks/lm_gpu_tables.py results/  # Markdown on stdout

Per run (`<family>-<tag>`) and single mode: the final validation perplexity (prose:validation, what chooses an LR),
perplexity and bits per byte on prose:test (in domain) and brown:test (another domain), the zero-shot accuracies, and
NIAH / record recall per protocol (mean over tasks and lengths); then each Oryx mode against its baselines as
perplexity ratios (< 1: Oryx better), run against run of the same tag; then each family and mode over its seeds
(mean ± half the range), with the lowest validation perplexity any of the run's evaluations saw. Where LR points of
seed 0 exist (`<family>-lr<LR>-s0`, `TAG=lr<LR>-s0 LRS=...`), the LR sweep: each point's lowest validation perplexity
(a run that failed, e.g. diverged, says at which step), each family's best LR by it, and the Oryx / baseline ratios
at the best checkpoints, at the paper's LRs and at each family's own best.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_cpu import BASELINES, FAMILIES, PAPER_LR  # the CPU scale's families and recipe: one definition

MODE_OF = {"transformer": "attn", "gdn": "linear", "mamba2": "linear"}
SEED_COLUMNS = ("val ppl", "test ppl", "ood ppl", "best val ppl", "best test ppl", "best ood ppl")
LR_TAG = re.compile(r"lr(\d+(?:\.\d+)?(?:e-?\d+)?)-s0")


def _rows(folder: Path, name: str) -> list[dict[str, Any]]:
    """The result rows of every `<name>.json` under `folder` (one per checkpoint evaluated)."""
    return [row for path in sorted(folder.glob(f"*/{name}.json")) for row in json.loads(path.read_text())["rows"]]


def read_run(run: Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One run folder of lm_gpu.sh: mode -> metric -> value, and protocol -> mean NIAH / record recall."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    final = next((r for r in records if r["kind"] == "final"), {})  # absent: the run was cut (lm_gpu.sh said FAILED)
    modes: dict[str, dict[str, float]] = {}
    for stem, split in (("ppl-test", "test"), ("ppl-ood", "ood"), ("ppl-best-test", "best test"),
                        ("ppl-best-ood", "best ood")):  # fmt: skip
        path = run / "eval" / f"{stem}.json"
        for result in json.loads(path.read_text())["results"] if path.is_file() else []:
            cell = modes.setdefault(result["schedule"], {})
            cell[f"{split} ppl"], cell[f"{split} bpb"] = result["perplexity"], result["bits_per_byte"]
    best = best_record(records)
    for mode, cell in modes.items():
        if f"val_ppl_{mode}" in final:
            cell["val ppl"] = final[f"val_ppl_{mode}"]
        if f"val_ppl_{mode}" in best:
            cell["best val ppl"], cell["best step"] = best[f"val_ppl_{mode}"], best["step"]
    for row in _rows(run / "eval" / "zeroshot", "zeroshot"):
        modes[row["protocol"]][f"{row['task']} acc"] = row["metrics"]["acc"]
    recalls: dict[str, list[float]] = {}
    for row in _rows(run / "eval" / "retrieval", "retrieval"):
        recalls.setdefault(row["protocol"], []).append(row["metrics"]["recall"])
    return modes, {protocol: mean(values) for protocol, values in recalls.items()}


def best_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's validation record of the lowest perplexity (mean over its modes; {} if it has none): the checkpoint
    lm_gpu.sh evaluates as the run's best. On a small corpus seen many times over, the last step measures how fast a
    family overfits as much as how well it models."""
    checks = [r for r in records if any(k.startswith("val_ppl_") for k in r)]
    return min(checks, key=lambda r: mean(v for k, v in r.items() if k.startswith("val_ppl_")), default={})


def split_name(name: str) -> tuple[str, str]:
    """(family, tag) of a run folder `<family>-<tag>`: families hold hyphens (oryx-tg), tags may too (lr2x-s0)."""
    family = next((f for f in sorted(FAMILIES, key=len, reverse=True) if name.startswith(f"{f}-")), None)
    return (family, name[len(family) + 1 :]) if family else tuple(name.rsplit("-", 1))


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def tables(root: Path) -> str:
    """The three tables, in Markdown."""
    runs = {p.name: read_run(p) for p in sorted(root.glob("*-*")) if (p / "eval" / "ppl-test.json").is_file()}
    columns = {"val ppl": 2, "test ppl": 2, "test bpb": 3, "ood ppl": 2, "ood bpb": 3, "lambada acc": 3,
               "next_sentence acc": 3}  # fmt: skip
    lines = ["| run | mode | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for name, (modes, _) in runs.items():
        for mode, cell in modes.items():
            lines.append(f"| {name} | {mode} | " + " | ".join(_cell(cell.get(c), d) for c, d in columns.items()) + " |")
    protocols = ("attn", "linear", "cross")
    lines += ["", "| run | NIAH / records recall: " + " | ".join(protocols) + " |", "|---|" + "---:|" * 3]
    for name, (_, recall) in runs.items():
        lines.append(f"| {name} | " + " | ".join(_cell(recall.get(p), 3) for p in protocols) + " |")
    lines += ["", "| Oryx mode / baseline (perplexity) | val | test | ood |", "|---|---:|---:|---:|"]
    for name, (modes, _) in runs.items():
        family, tag = split_name(name)
        for baseline in BASELINES.get(family, ()):
            if f"{baseline}-{tag}" not in runs:
                continue
            base = runs[f"{baseline}-{tag}"][0][MODE_OF[baseline]]
            for mode, cell in modes.items():
                ratios = " | ".join(
                    _cell(cell[f"{s} ppl"] / base[f"{s} ppl"] if f"{s} ppl" in cell and f"{s} ppl" in base else None, 3)
                    for s in ("val", "test", "ood")
                )
                lines.append(f"| {name} {mode} / {baseline}-{tag} | {ratios} |")
    return "\n".join([*lines, "", *seed_table(runs), *lr_sweep_tables(root)]) + "\n"


def seed_table(runs: dict[str, tuple[dict[str, dict[str, float]], dict[str, float]]]) -> list[str]:
    """Per family and mode over its seed runs (`<family>-s<N>`): mean perplexity ± half the range between seeds."""
    by_family: dict[tuple[str, str], dict[str, list[float]]] = {}
    for name, (modes, _) in runs.items():
        family, tag = split_name(name)
        if not (tag.startswith("s") and tag[1:].isdigit()):
            continue  # an LR point, not a seed
        for mode, cell in modes.items():
            for metric in (*SEED_COLUMNS, "best step"):
                if metric in cell:
                    by_family.setdefault((family, mode), {}).setdefault(metric, []).append(cell[metric])
    lines = ["| family | mode | seeds | " + " | ".join(SEED_COLUMNS) + " | best steps |",
             "|---|---|---:|" + "---:|" * (len(SEED_COLUMNS) + 1)]  # fmt: skip
    for (family, mode), metrics in sorted(by_family.items()):
        cells = [f"{mean(v):.2f} ± {(max(v) - min(v)) / 2:.2f}" if (v := metrics.get(m)) else "–" for m in SEED_COLUMNS]
        steps = "/".join(str(int(step)) for step in metrics.get("best step", []))
        lines.append(f"| {family} | {mode} | {len(metrics['test ppl'])} | " + " | ".join(cells) + f" | {steps} |")
    return lines


def modes_of(family: str) -> tuple[str, ...]:
    return ("attn", "linear") if family in BASELINES else (MODE_OF[family],)


def lr_points(root: Path) -> dict[str, dict[float, dict[str, dict[str, float]] | int]]:
    """family -> LR -> (mode -> the run's cells, `read_run`'s) of the seed-0 LR points under `root`, or the last
    step a run that did not finish reached."""
    points: dict[str, dict[float, dict[str, dict[str, float]] | int]] = {}
    for run in sorted(root.glob("*-lr*-s0")):
        family, tag = split_name(run.name)
        match = LR_TAG.fullmatch(tag)
        if family not in FAMILIES or match is None or not (run / "metrics.jsonl").is_file():
            continue
        records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        finished = any(r["kind"] == "final" for r in records)
        last = max((r["step"] for r in records if r["kind"] == "train"), default=0)
        points.setdefault(family, {})[float(match.group(1))] = read_run(run)[0] if finished else last
    return points


def best_lrs(points: dict[str, dict[float, Any]]) -> dict[str, float]:
    """Each family's LR of the lowest best-checkpoint validation perplexity (mean over its modes), finished runs."""
    best = {}
    for family, by_lr in points.items():
        scores = {
            lr: mean(cells[m]["best val ppl"] for m in modes_of(family))
            for lr, cells in by_lr.items()
            if isinstance(cells, dict) and all("best val ppl" in cells.get(m, {}) for m in modes_of(family))
        }
        if scores:
            best[family] = min(scores, key=scores.get)
    return best


def lr_sweep_tables(root: Path) -> list[str]:
    """The LR sweep's tables (see the module docstring); none without LR points."""
    points = lr_points(root)
    if not points:
        return []
    grid = sorted({lr for by_lr in points.values() for lr in by_lr})
    best = best_lrs(points)
    lines = ["", "LR sweep, seed 0: each run's lowest validation perplexity (at step); (paper): the recipe's LR",
             "", "| family | mode | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best lr |",
             "|---|---|" + "---:|" * len(grid) + "---:|"]  # fmt: skip
    for family in FAMILIES:
        for mode in modes_of(family) if family in points else ():
            cells = []
            for lr in grid:
                found = points[family].get(lr)
                if isinstance(found, int):
                    cells.append(f"failed at step {found}")
                    continue
                cell = (found or {}).get(mode, {})
                text = f"{cell['best val ppl']:.2f} ({int(cell['best step'])})" if "best val ppl" in cell else "–"
                cells.append(text + (" (paper)" if lr == PAPER_LR[family] and cell else ""))
            chosen = f"{best[family]:g}" if family in best else "–"
            lines.append(f"| {family} | {mode} | " + " | ".join(cells) + f" | {chosen} |")
    lines += ["", "Oryx mode / baseline at the best checkpoints (perplexity; < 1: Oryx better), seed 0",
              "", "| Oryx mode / baseline | LRs | val | test | ood |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for family, baselines in BASELINES.items():
        for baseline in baselines:
            for rule, lr_of in (("paper", PAPER_LR), ("each its best", best)):
                ours, theirs = (
                    points.get(family, {}).get(lr_of.get(family)),
                    points.get(baseline, {}).get(lr_of.get(baseline)),
                )
                if not (isinstance(ours, dict) and isinstance(theirs, dict)):
                    continue
                base = theirs.get(MODE_OF[baseline], {})
                for mode in modes_of(family):
                    cell = ours.get(mode, {})
                    ratios = " | ".join(
                        _cell(cell[k] / base[k] if k in cell and k in base else None, 3)
                        for k in ("best val ppl", "best test ppl", "best ood ppl")
                    )
                    lrs = f"{rule}: {lr_of[family]:g} / {lr_of[baseline]:g}"
                    lines.append(f"| {family} {mode} / {baseline} | {lrs} | {ratios} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder holding the extracted <family>-<tag> run folders")
    root = parser.parse_args().results
    if not any((p / "eval" / "ppl-test.json").is_file() for p in root.glob("*-*")):
        parser.error(f"{root} holds no lm_gpu.sh run with evaluations; extract its results.tar.gz there")
    print(tables(root), end="")


if __name__ == "__main__":
    main()
