"""The report folder written at the end of `oryx train`: plots, the switching curve and a Markdown summary.

    report/val_ppl.png       validation perplexity in each mode against the step (and the training loss)
    report/switching.png     the switching curve (paper Figure 3), Oryx only; switching.json holds the numbers
    report/summary.md        what was trained, for how long, final perplexities against a unigram model

Everything is computed from the run folder (metrics.jsonl and the last checkpoint), so a finished run's report
can be rebuilt with `oryx train --resume --out-dir RUN`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from oryx import checkpoint as ckpt
from oryx.data import load_tokens
from oryx.eval.perplexity import evaluated_targets, unigram_nll, window_indices
from oryx.eval.switching import SwitchingCurves, switching_curves
from oryx.params import format_param_report, param_report
from oryx.training import runfolder
from oryx.training.config import ConfigError, TrainConfig
from oryx.training.metrics import read_metrics

SMOOTH = 32  # positions averaged in the switching plot


def write_report(run_dir: str | Path, config: TrainConfig, started: float) -> Path:
    """Build the report of a finished run; returns the path of summary.md. `started` is the run's perf_counter
    start, for the wall time in the summary."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, folder = ckpt.load_pretrained(run_dir)
    metrics = read_metrics(run_dir)
    final = next((r for r in reversed(metrics) if r["kind"] == "final"), None)
    if final is None:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'} has no final evaluation; the run did not finish")
    train_tokens = load_tokens(config.train_data, tokenizer, text_field=config.text_field)
    val_tokens = load_tokens(config.val_data, tokenizer, text_field=config.text_field)
    # The unigram floor, on exactly the targets of the final evaluation.
    indices = window_indices(len(val_tokens), config.seq_len, config.eval_tokens)[
        : final["val_tokens"] // config.seq_len
    ]
    targets = evaluated_targets(val_tokens, config.seq_len, indices)
    unigram = math.exp(unigram_nll(train_tokens, targets, model.config.vocab_size))
    plot_training(metrics, out / "val_ppl.png", unigram, config)
    curves = None
    if model.config.is_oryx:
        curves = switching_curves(
            model, val_tokens, config.seq_len, config.switch_positions, windows=config.switch_windows
        )
        curves.save(out, SMOOTH, title=f"{config.preset}: switching curve on {config.val_data}")
    params = param_report(model, verbose=False)
    summary = _summary(config, metrics, final, unigram, curves, params, folder, time.perf_counter() - started)
    path = out / "summary.md"
    path.write_text(summary)
    (out / "final.json").write_text(json.dumps({**final, "unigram_ppl": unigram}, indent=1))
    runfolder.record(
        run_dir, *(name for name in runfolder.WRITES if name.startswith("report/") and (run_dir / name).is_file())
    )
    return path


def plot_training(metrics: list[dict[str, Any]], path: Path, unigram: float, config: TrainConfig) -> None:
    """Left: validation perplexity per mode against the step, with the unigram floor. Right: training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in metrics if r["kind"] in ("eval", "final")]
    train = [r for r in metrics if r["kind"] == "train"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"attn": "tab:red", "linear": "tab:blue"}
    for name in config.eval_modes:
        points = [(r["step"], r[f"val_ppl_{name}"]) for r in evals if f"val_ppl_{name}" in r]
        if points:
            steps, ppl = zip(*points, strict=True)
            left.plot(steps, ppl, "o-", color=colors[name], ms=3, label=f"{name}-only")
    left.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram ({unigram:.0f})")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("validation perplexity")
    left.set_title("validation perplexity in each mode")
    left.grid(alpha=0.3, which="both")
    left.legend()
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        right.plot(steps, loss, color="0.75", lw=0.8, label="per step")
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        right.plot(steps[k - 1 :], smooth, color="k", lw=1.4, label=f"mean of {k}")
        right.set_xlabel("step")
        right.set_ylabel("training loss (nats/token)")
        right.set_title(f"training loss ({config.schedule_spec})")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(
    config: TrainConfig,
    metrics: list[dict[str, Any]],
    final: dict[str, Any],
    unigram: float,
    curves: SwitchingCurves | None,
    params: dict[str, float],
    folder: Path,
    seconds: float,
) -> str:
    train = [r for r in metrics if r["kind"] == "train"]
    speed = np.median([r["tokens_per_s"] for r in train]) if train else float("nan")
    start = next((r for r in reversed(metrics) if r["kind"] == "start"), {})
    threads = sorted({r["threads"] for r in train if r.get("threads")})
    where = f"{start.get('ranks', 1)} × {start.get('device', '?')}" + (
        f", {'/'.join(map(str, threads))} CPU threads" if threads else ""
    )
    lines = [
        f"# {config.preset} on {config.train_data}",
        "",
        f"- {final['step']} steps of {config.batch_size} × {config.seq_len} tokens "
        f"({final['step'] * config.batch_size * config.seq_len:,} tokens), schedule `{config.schedule_spec}`, "
        f"peak LR {config.peak_lr:g}, tokenizer `{config.tokenizer}`",
        f"- wall time of this command: {seconds / 60:.1f} min; median training speed {speed:,.0f} tokens/s ({where})",
        f"- final checkpoint: `{folder}`",
        "",
        f"## Validation perplexity ({final['val_tokens']:,} tokens of {config.val_data})",
        "",
        "| model | perplexity | bits per byte |",
        "|---|---|---|",
    ]
    for name in config.eval_modes:
        bpb = final.get(f"val_bpb_{name}")
        lines.append(f"| {name}-only | {final[f'val_ppl_{name}']:.2f} | {'' if bpb is None else f'{bpb:.3f}'} |")
    lines += [
        f"| unigram (add-one, train counts) | {unigram:.2f} | |",
        "",
        "![validation perplexity](val_ppl.png)",
        "",
    ]
    if curves is not None:
        lines += [
            f"## Switching curve ({curves.windows} sequences of {curves.length} tokens)",
            "",
            f"Perplexity over the {SMOOTH} positions after each switch, against the no-switch curves there.",
            "",
            "| switch | after the switch | no-switch, first mode | no-switch, second mode |",
            "|---|---|---|---|",
        ]
        for name, values in curves.summary(SMOOTH).items():
            first, second = name.split("@")[0].split("->")
            lines.append(
                f"| {name} | {values['switch']:.2f} | {values[f'{first}_only']:.2f} | {values[f'{second}_only']:.2f} |"
            )
        lines += ["", "![switching curve](switching.png)", ""]
    lines += ["## Parameters", "", "```", format_param_report(params), "```", ""]
    lines += ["## Config", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
