"""The benchmark runners of ``oryx eval`` (their rows are in ``oryx.cli.EVAL_COMMANDS``):

    oryx eval mqar --out runs/mqar [--scale 0.05 --epochs 4] [--device cuda --jobs 5]
    oryx eval retrieval CHECKPOINT [CHECKPOINT ...] --lengths 512 1024 --modes attn linear cross
    oryx eval zeroshot CHECKPOINT [CHECKPOINT ...] --modes attn linear
    oryx eval report RUN_DIR
    oryx eval export-lm-eval-tasks DIR --tokenizer CHECKPOINT

Modes (``--modes``) are cross-mode protocols (``attn``, ``linear``, ``cross``: context linear, prompt and
generation in attention; ``cross_reverse``) or ``oryx.schedule`` specs (``tail:attn=64``, ...). Results go next to
each checkpoint (``<checkpoint>/eval/``) or under ``--out``; every runner also writes the report (Markdown table and
PNG plot) of its output folder. lm-eval itself: ``python -m oryx.eval.harness`` (see ``oryx.eval.harness``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oryx.cli_common import (
    nonnegative_int,
    positive_float,
    positive_int,
    resolve_device,
    seed,
)


def _common_checkpoint_arguments(parser: argparse.ArgumentParser, default_modes: list[str]) -> None:
    parser.add_argument("checkpoints", nargs="+", help="run folders, checkpoint folders or save_pretrained folders")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=default_modes,
        help=f"protocols or schedule specs (default: {' '.join(default_modes)}); a baseline runs only its own mode",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    parser.add_argument("--label", nargs="+", default=None, help="row label per checkpoint (default: folder name)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda (default: auto)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on GPU")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the samples (default: 0)")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="load model folders without checking their checksums.json (they are then not verified)",
    )


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    from oryx.eval.retrieval import RETRIEVAL_TASKS

    _common_checkpoint_arguments(parser, ["attn", "linear", "cross"])
    parser.add_argument("--tasks", nargs="+", default=list(RETRIEVAL_TASKS), choices=RETRIEVAL_TASKS)
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", default=[512, 1024, 2000], help="NIAH prompt lengths"
    )
    parser.add_argument("--n", type=positive_int, default=50, help="samples per task setting (default: 50)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48, help="generation limit (default: 48)")


def add_zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    from oryx.eval.zeroshot import ZEROSHOT_TASKS

    _common_checkpoint_arguments(parser, ["attn", "linear"])
    parser.add_argument("--tasks", nargs="+", default=list(ZEROSHOT_TASKS), choices=ZEROSHOT_TASKS)
    parser.add_argument("--n", type=nonnegative_int, default=500, help="samples per task, 0 = all (default: 500)")


def _mqar_setting(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected L:K or L:K:N, got {text!r}")
    return values


def add_mqar_arguments(parser: argparse.ArgumentParser) -> None:
    from oryx.eval.mqar_run import FAMILIES, MQAR_PROTOCOLS, MQARSweepConfig

    default = MQARSweepConfig()
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--hidden-size", type=positive_int, default=default.hidden_size)
    parser.add_argument("--layers", type=positive_int, default=default.num_layers)
    parser.add_argument("--head-dim", type=positive_int, default=default.head_dim)
    parser.add_argument("--vocab", type=positive_int, default=default.vocab, help="MQAR vocabulary V (default: 8192)")
    parser.add_argument(
        "--train-mix", nargs="+", type=_mqar_setting, default=None, help="L:K:N settings (default: Zoology's mix)"
    )
    parser.add_argument(
        "--test-grid", nargs="+", type=_mqar_setting, default=None, help="L:K[:N] settings (default: Zoology's grid)"
    )
    parser.add_argument("--scale", type=positive_float, default=default.scale, help="multiplies the training rows")
    parser.add_argument(
        "--test-scale", type=positive_float, default=default.test_scale, help="multiplies the test rows"
    )
    parser.add_argument("--epochs", type=positive_float, default=default.epochs)
    parser.add_argument("--batch-size", type=positive_int, default=default.batch_size)
    parser.add_argument("--eval-batch-size", type=positive_int, default=default.eval_batch_size)
    parser.add_argument(
        "--lrs", type=positive_float, nargs="+", default=list(default.lrs), help="learning rates to sweep"
    )
    parser.add_argument("--oryx-schedule", default=default.oryx_schedule, help="training schedule of Oryx models")
    parser.add_argument("--protocols", nargs="+", default=list(default.protocols), choices=MQAR_PROTOCOLS)
    parser.add_argument(
        "--train-minutes",
        type=positive_float,
        default=None,
        help="cap on the training runs' minutes: every run trains the steps the slowest family fits",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda (default: auto)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on GPU")
    parser.add_argument("--jobs", type=positive_int, default=1, help="training runs at once, in separate processes")
    parser.add_argument("--seed", type=seed, default=default.seed)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="folder searched (recursively) for result files")
    parser.add_argument("--out", default=None, help="where to write the tables and plots (default: RUN_DIR)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder for the task YAMLs and data (pass it to lm-eval's --include_path)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer spec or checkpoint folder (sizes NIAH)")
    parser.add_argument("--niah-lengths", type=positive_int, nargs="+", default=[512, 1024, 2000])
    parser.add_argument("--niah-n", type=positive_int, default=50, help="samples per NIAH task (default: 50)")
    parser.add_argument("--records-n", type=positive_int, default=50, help="samples per records task (default: 50)")
    parser.add_argument("--zeroshot-n", type=nonnegative_int, default=500, help="samples per zero-shot task, 0 = all")
    parser.add_argument("--seed", type=seed, default=0)


def _device(name: str) -> str:
    return resolve_device(name)


def _fail(command: str, err: Exception) -> int:
    print(f"oryx eval {command}: error: {err}", file=sys.stderr)
    return 2


def run_mqar(args: argparse.Namespace) -> int:
    from oryx.eval.mqar_run import MQARSweepConfig, run_sweep
    from oryx.eval.tasks.mqar import MQARConfig

    fields: dict[str, Any] = dict(
        families=tuple(args.families),
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        head_dim=args.head_dim,
        vocab=args.vocab,
        scale=args.scale,
        test_scale=args.test_scale,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        lrs=tuple(args.lrs),
        oryx_schedule=args.oryx_schedule,
        protocols=tuple(args.protocols),
        train_minutes=args.train_minutes,
        device=_device(args.device),
        precision=args.precision,
        seed=args.seed,
    )
    if args.train_mix:
        if any(len(s) != 3 for s in args.train_mix):
            return _fail("mqar", ValueError("--train-mix settings need L:K:N"))
        fields["train_mix"] = tuple(MQARConfig(*s) for s in args.train_mix)
    if args.test_grid:
        fields["test_grid"] = tuple(MQARConfig(*s) if len(s) == 3 else MQARConfig(*s, 1000) for s in args.test_grid)
    try:
        config = MQARSweepConfig(**fields)
    except ValueError as err:
        return _fail("mqar", err)
    for path in run_sweep(config, args.out, jobs=args.jobs):
        print(f"wrote {path}")
    print((Path(args.out) / "mqar.md").read_text())
    return 0


def _run_on_checkpoints(
    args: argparse.Namespace, command: str, runner: Callable[..., list], benchmark: str, metrics: list[str], **kw: Any
) -> int:
    """Load each checkpoint, run ``runner``, write ``<benchmark>.json`` and the report of the output folder."""
    from transformers.utils import logging as hf_logging

    from oryx.checkpoint import load_pretrained
    from oryx.eval.inference import ModeRule
    from oryx.eval.report import write_report, write_results

    hf_logging.disable_progress_bar()
    if args.label and len(args.label) != len(args.checkpoints):
        return _fail(command, ValueError(f"got {len(args.label)} labels for {len(args.checkpoints)} checkpoints"))
    try:
        rules = [ModeRule(m) for m in args.modes]
    except ValueError as err:
        return _fail(command, err)
    out_dirs = []
    for i, checkpoint in enumerate(args.checkpoints):
        try:
            model, tokenizer, folder = load_pretrained(checkpoint, _device(args.device), verify=args.verify)
            label = args.label[i] if args.label else folder.name
            rows = runner(
                model, tokenizer, label, rules=rules, batch_size=args.batch_size, precision=args.precision,
                seed=args.seed, **kw,
            )  # fmt: skip
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            return _fail(command, err)
        out = Path(args.out) / label if args.out else folder / "eval"
        meta = {"checkpoint": str(folder), "modes": args.modes, "seed": args.seed, **kw}
        print(f"wrote {write_results(out / f'{benchmark}.json', benchmark, metrics, rows, meta)}")
        out_dirs.append(out)
    for report_dir in [Path(args.out)] if args.out else out_dirs:
        for path in write_report(report_dir):
            print(f"wrote {path}")
    return 0


def run_retrieval_command(args: argparse.Namespace) -> int:
    from oryx.eval.retrieval import run_retrieval

    return _run_on_checkpoints(
        args, "retrieval", run_retrieval, "retrieval", ["recall"],
        tasks=args.tasks, lengths=args.lengths, n=args.n, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip


def run_zeroshot_command(args: argparse.Namespace) -> int:
    from oryx.eval.zeroshot import run_zeroshot

    return _run_on_checkpoints(
        args, "zeroshot", run_zeroshot, "zeroshot", ["acc", "acc_norm", "ppl"], tasks=args.tasks, n=args.n or None
    )


def run_report(args: argparse.Namespace) -> int:
    from oryx.eval.report import write_report

    try:
        paths = write_report(args.run_dir, args.out)
    except FileNotFoundError as err:
        return _fail("report", err)
    for path in paths:
        print(f"wrote {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from oryx.checkpoint import resolve
    from oryx.data import load_tokenizer
    from oryx.eval.lm_eval_tasks import export_lm_eval_tasks

    spec = args.tokenizer
    if Path(spec).is_dir():
        spec = resolve(spec)  # a run folder's tokenizer is in its latest checkpoint
    try:
        names = export_lm_eval_tasks(
            args.out, load_tokenizer(spec), niah_lengths=args.niah_lengths, niah_n=args.niah_n,
            records_n=args.records_n, lambada_n=args.zeroshot_n or None, next_sentence_n=args.zeroshot_n or None,
            seed=args.seed,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        return _fail("export-lm-eval-tasks", err)
    print(f"wrote {len(names)} tasks to {args.out}: {' '.join(names)}")
    print(f"run them with: python -m oryx.eval.harness --include_path {args.out} --tasks oryx_zeroshot ...")
    return 0
