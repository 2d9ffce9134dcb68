"""The benchmark runners of ``oryx eval`` (their rows are in ``oryx.cli.EVAL_COMMANDS``):

    oryx eval mqar --out runs/mqar [--scale 0.05 --epochs 4] [--device cuda --jobs 5]
    oryx eval retrieval CHECKPOINT [CHECKPOINT ...] --lengths 512 1024 --modes attn linear cross
    oryx eval zeroshot CHECKPOINT [CHECKPOINT ...] --modes attn linear
    oryx eval budget RUN_DIR [--tasks ppl niah_1 records_kv] [--budgets 0 0.025 0.05 0.1 0.25 1] [--cost]
    oryx eval budget MQAR_MODEL_DIR --tasks mqar           # a model of oryx eval mqar --save-models
    oryx eval report RUN_DIR
    oryx eval export-lm-eval-tasks DIR --tokenizer CHECKPOINT

Modes (``--modes``) are cross-mode protocols (``attn``, ``linear``, ``cross``: context linear, prompt and
generation in attention; ``cross_reverse``) or ``oryx.schedule`` specs (``tail:attn=64``, ``router:budget=0.1``,
...). Results go next to
each checkpoint (``<checkpoint>/eval/``) or under ``--out``; every runner also writes the report (Markdown table and
PNG plot) of its output folder. lm-eval itself: ``python -m oryx.eval.harness`` (see ``oryx.eval.harness``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from oryx.cli_common import (
    UsageError,
    add_device_argument,
    add_no_verify_argument,
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
    add_device_argument(parser)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on GPU")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the samples (default: 0)")
    add_no_verify_argument(parser)


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
    add_device_argument(parser)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on GPU")
    parser.add_argument("--jobs", type=positive_int, default=1, help="training runs at once, in separate processes")
    parser.add_argument("--seed", type=seed, default=default.seed)
    parser.add_argument(
        "--save-models",
        action="store_true",
        help="save every trained model into OUT/models/ (for oryx train-router and oryx eval budget)",
    )


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
        save_models=args.save_models,
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


def _fraction(text: str) -> float:
    value = positive_float(text) if text not in ("0", "0.0") else 0.0
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the tokens in [0, 1], got {text}")
    return value


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    from oryx.eval.budget import BUDGETS, POLICIES

    parser.add_argument("checkpoint", help="run folder or checkpoint folder (ppl, niah_*, records_*), or an MQAR model "
                        "folder saved by oryx eval mqar --save-models (mqar)")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=["ppl"], help="ppl, mqar, niah_1/2/3, records_kv/html")
    parser.add_argument("--budgets", nargs="+", type=_fraction, default=list(BUDGETS), help="fractions of the tokens")
    parser.add_argument(
        "--policies", nargs="+", default=None, choices=POLICIES, help="default: all (the router's if it has one)"
    )
    parser.add_argument("--chunk", type=positive_int, default=32, help="chunk units and even spans (default: 32)")
    parser.add_argument("--data", default="prose:validation", help="held-out text of ppl (default: prose:validation)")
    parser.add_argument("--calibration-data", default=None, help="text of the entropy thresholds (default: the run's "
                        "train_data)")  # fmt: skip
    parser.add_argument("--calibration-windows", type=positive_int, default=32, help="windows of the thresholds")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: the run's)")
    parser.add_argument("--max-tokens", type=positive_int, default=65536, help="ppl targets per cell (default: 65536)")
    parser.add_argument("--settings", nargs="+", type=_mqar_setting, default=None,
                        help="mqar: L:K settings of the model's test grid (default: all of it)")  # fmt: skip
    parser.add_argument("--niah-length", type=positive_int, default=512, help="NIAH prompt length (default: 512)")
    parser.add_argument("--n", type=positive_int, default=20, help="retrieval samples per task (default: 20)")
    parser.add_argument("--cost", action="store_true", help="also measure what routing adds to a forward (ppl)")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    parser.add_argument("--label", default=None, help="the model's name in tables and plots (default: folder name)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="windows or samples per forward (default: 8; mqar rows: 64)")  # fmt: skip
    add_device_argument(parser)
    add_no_verify_argument(parser)


def run_budget(args: argparse.Namespace) -> int:
    """Every policy at every budget on each task; writes budget-<task>.json/.md/.png (see `oryx.eval.budget`)."""
    from transformers.utils import logging as hf_logging

    from oryx.eval import budget
    from oryx.eval.retrieval import RETRIEVAL_TASKS

    hf_logging.disable_progress_bar()
    unknown = [t for t in args.tasks if t not in ("ppl", "mqar", *RETRIEVAL_TASKS)]
    if unknown:
        raise UsageError(f"--tasks: unknown {unknown}; choose from ppl, mqar, {', '.join(RETRIEVAL_TASKS)}")
    if "mqar" in args.tasks and len(args.tasks) > 1:
        raise UsageError("--tasks mqar runs on an MQAR model folder: evaluate it on its own")
    if args.settings and "mqar" not in args.tasks:
        raise UsageError("--settings picks MQAR settings: it needs --tasks mqar")
    device = _device(args.device)
    args.batch_size = args.batch_size or (64 if "mqar" in args.tasks else 8)
    try:
        if "mqar" in args.tasks:
            return _budget_mqar(args, device, budget)
        return _budget_text(args, device, budget)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _budget_policies(args: argparse.Namespace, model: Any, folder: Path, available: Sequence[str]) -> list[str]:
    """The policies to compare: `--policies`, else every one of `available`; refuses a model with one mode, and
    router policies asked for by name on a model without a router (by default they are left out, with a note)."""
    if not model.config.is_oryx:
        raise UsageError(
            f"{folder} holds a {model.config.variant!r} baseline, which has one mode: there is no attention budget "
            "to place; evaluate an Oryx model"
        )
    policies = [p for p in args.policies or available if p in available]
    if model.router is None:
        asked = [p for p in args.policies or () if p.startswith("router")]
        if asked:
            raise UsageError(
                f"--policies {' '.join(asked)} needs a trained router, and {folder} has none: train one with "
                f"`oryx train-router {args.checkpoint}`"
            )
        if any(p.startswith("router") for p in policies):
            print(f"note: {folder} has no router (oryx train-router): the router policies are left out")
        policies = [p for p in policies if not p.startswith("router")]
    if not policies:
        raise UsageError(f"--policies: none of {' '.join(args.policies)} applies to this task; choose from "
                         f"{' '.join(available)}")  # fmt: skip
    return policies


def _budget_mqar(args: argparse.Namespace, device: str, budget: Any) -> int:
    from oryx.eval.mqar_run import load_mqar_model

    model, config = load_mqar_model(args.checkpoint, verify=args.verify)
    model = model.to(device)
    folder = Path(args.checkpoint)
    label = args.label or folder.name
    policies = _budget_policies(args, model, folder, budget.MQAR_POLICIES)
    settings = [tuple(s[:2]) for s in args.settings] if args.settings else None
    rows = budget.budget_mqar(
        model,
        config,
        budgets=args.budgets,
        policies=policies,
        settings=settings,
        batch_size=args.batch_size,
        label=label,
    )
    meta = {"checkpoint": str(folder), "label": label, "budgets": args.budgets, "policies": policies}
    for path in budget.write_budget_report(rows, args.out or folder / "eval", "budget-mqar", "accuracy", meta):
        print(f"wrote {path}")
    return 0


def _budget_text(args: argparse.Namespace, device: str, budget: Any) -> int:
    from oryx.checkpoint import load_pretrained
    from oryx.data import DataError, check_token_ids, load_tokens
    from oryx.eval.command import _training_length, training_setting
    from oryx.eval.perplexity import window_batches

    model, tokenizer, folder = load_pretrained(args.checkpoint, device, verify=args.verify)
    policies = _budget_policies(args, model, folder, budget.POLICIES)
    label = args.label or (folder.parent.parent.name if folder.parent.name == "checkpoints" else folder.name)
    seq_len = args.seq_len or _training_length(folder) or 512
    calibration_data = args.calibration_data or training_setting(folder, "train_data")
    if calibration_data is None:
        raise UsageError(f"{folder} is no training checkpoint: pass --calibration-data (text for the thresholds)")

    def tokens_of(source: str, flag: str) -> Any:
        try:
            tokens = load_tokens(source, tokenizer)
        except (ValueError, FileNotFoundError) as err:
            raise DataError(f"{flag} {source}: {err}") from None
        check_token_ids(tokens, model.config.vocab_size, f"{flag} {source}")
        return tokens

    # The oracle reads the measured gain of the tokens it scores: perplexity has it, NIAH and records do not.
    retrieval = [t for t in args.tasks if t != "ppl"]
    retrieval_policies = [p for p in policies if p in budget.SCHEDULE_POLICIES]
    if retrieval and not retrieval_policies:
        raise UsageError(f"--policies oracle applies to ppl only, not to {' '.join(retrieval)}; add a schedule policy "
                         f"({' '.join(budget.SCHEDULE_POLICIES)})")  # fmt: skip
    if retrieval and len(retrieval_policies) < len(policies) and args.policies:
        print(f"note: the oracle applies to ppl only; {' '.join(retrieval)} run without it")
    calibration = window_batches(
        tokens_of(calibration_data, "--calibration-data"), seq_len, args.calibration_windows, args.batch_size
    )
    out = Path(args.out) if args.out else folder / "eval"
    meta = {"checkpoint": str(folder), "label": label, "budgets": args.budgets, "policies": policies,
            "chunk": args.chunk, "calibration_data": calibration_data}  # fmt: skip
    if "ppl" in args.tasks:
        tokens = tokens_of(args.data, "--data")
        rows = budget.budget_perplexity(
            model, tokens, seq_len, calibration, budgets=args.budgets, policies=policies, chunk=args.chunk,
            max_tokens=args.max_tokens, batch_size=args.batch_size, label=label,
        )  # fmt: skip
        notes = _routing_costs(model, tokens, seq_len, args.batch_size) if args.cost else ""
        paths = budget.write_budget_report(
            rows, out, "budget-ppl", "ppl", {**meta, "data": args.data, "seq_len": seq_len, "notes": notes}
        )
        for path in paths:
            print(f"wrote {path}")
    if retrieval:
        rows = budget.budget_retrieval(
            model, tokenizer, calibration, tasks=retrieval, length=args.niah_length, n=args.n, budgets=args.budgets,
            policies=retrieval_policies, chunk=args.chunk, batch_size=args.batch_size, label=label,
        )  # fmt: skip
        for path in budget.write_budget_report(rows, out, "budget-retrieval", "recall", {**meta, "n": args.n}):
            print(f"wrote {path}")
    return 0


def _routing_costs(model: Any, tokens: Any, seq_len: int, batch_size: int) -> str:
    """Markdown: what routing adds to a forward of one batch of windows, per adaptive schedule (CPU time of one thread
    on a CPU; wall time after synchronising on CUDA)."""
    import torch

    from oryx.eval.budget import routing_cost
    from oryx.eval.perplexity import window_batches

    ids = window_batches(tokens, seq_len, batch_size, batch_size)[0][0].to(model.device)
    specs = ["random:budget=0.1", "entropy:threshold=4.0,budget=0.1"]
    if model.router is not None:
        specs = ["router:budget=0.1", "router:budget=0.1,chunk=32", *specs]
    unit = "s" if model.device.type == "cuda" else "CPU s"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: steady beside other work on the machine
    try:
        lines = [
            f"| schedule | routed forward ({unit}) | same modes given ({unit}) | routing's share | attention work: "
            "ideal | computed by the reference kernel |",
            "|---|---|---|---|---|---|",
        ]
        for spec in specs:
            cost = routing_cost(model, ids, spec)
            lines.append(
                f"| `{spec}` | {cost['routed_s']:.3f} | {cost['explicit_s']:.3f} | {cost['share']:.1%} | "
                f"{cost['ideal_work']:.1%} | "
                + ("– (a fast backend ran)" if math.isnan(cost["computed_work"]) else f"{cost['computed_work']:.1%}")
                + " |"
            )
    finally:
        torch.set_num_threads(threads)
    timing = "wall time after synchronising the card" if unit == "s" else "one thread's CPU time"
    return f"Routing cost, one forward of {tuple(ids.shape)} tokens, {timing}, median of 7:\n\n" + "\n".join(lines)
