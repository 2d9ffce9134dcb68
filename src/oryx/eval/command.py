"""`oryx eval`: evaluate a checkpoint. Subcommands:

    oryx eval ppl RUN_OR_CHECKPOINT [--data prose:validation] [--schedule attn linear ...]
    oryx eval switching RUN_OR_CHECKPOINT [--switch-at 128 256 384] [--out DIR]

A checkpoint is a run folder (its latest checkpoint is used), a checkpoint folder, or any `save_pretrained` folder
of an Oryx model with its tokenizer. The rows of `oryx eval` are in `oryx.cli.EVAL_COMMANDS`; the benchmark runners
(mqar, retrieval, zeroshot, report, export-lm-eval-tasks) are in `oryx.eval.cli`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from oryx.cli_common import (
    UsageError,
    add_device_argument,
    add_no_verify_argument,
    output_file,
    positive_int,
    resolve_device,
    seed,
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run folder, checkpoint folder or save_pretrained folder")
    parser.add_argument("--data", default="prose:validation", help="prose:<split>, a .txt/.jsonl/.bin file or folder")
    parser.add_argument("--text-field", default="text", help="JSONL key / dataset column of the text (default: text)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec or path (default: the checkpoint's)")
    parser.add_argument(
        "--seq-len", type=positive_int, default=None, help="tokens per window (default: the training length)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default: 8)")
    add_device_argument(parser)
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on GPU, fp32 on CPU"
    )
    add_no_verify_argument(parser)


def add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument(
        "--schedule",
        nargs="+",
        default=None,
        help="one or more schedules, e.g. attn linear 'chunks:size=128,p_attn=0.25' 'tail:attn=64', or adaptive: "
        "'router:budget=0.1' (after oryx train-router), 'entropy:threshold=4', 'random:budget=0.1' (default: every "
        "mode the model has); the realised attention fraction is printed",
    )
    parser.add_argument(
        "--max-tokens", type=positive_int, default=None, help="score at most this many targets (default: all)"
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of random schedules (chunks) (default: 0)")
    parser.add_argument(
        "--json", type=output_file, default=None, metavar="FILE", help="also write the results to this JSON file"
    )


def add_switching_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument(
        "--switch-at", type=positive_int, nargs="+", default=None, help="switch positions (default: L/4, L/2, 3L/4)"
    )
    parser.add_argument("--windows", type=positive_int, default=128, help="sequences averaged (default: 128)")
    parser.add_argument(
        "--smooth", type=positive_int, default=32, help="trailing moving average, in positions (default: 32)"
    )
    parser.add_argument(
        "--schedule",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="further curves, any schedule: e.g. several switches in one sequence 'spans:attn@0,linear@100,attn@300', "
        "each also measured against the no-switch runs of the modes its tokens are in (schedules.png)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of random schedules (chunks) (default: 0)")
    parser.add_argument("--out", default=None, help="output folder (default: <checkpoint>/switching)")


def _load(args: argparse.Namespace):
    """(model, tokenizer, folder, token stream, seq_len) for both subcommands, after checking that the data fits
    the model (every token id inside its vocabulary).

    Raises:
        UsageError: naming the flag or file that is wrong.
    """
    from transformers.utils import logging as hf_logging

    from oryx.checkpoint import load_pretrained
    from oryx.data import DataError, check_token_ids, load_tokenizer, load_tokens

    hf_logging.disable_progress_bar()
    device = resolve_device(args.device)
    model, tokenizer, folder = load_pretrained(args.checkpoint, device, verify=args.verify)
    try:
        if args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer)
        tokens = load_tokens(args.data, tokenizer, text_field=args.text_field)
    except (ValueError, FileNotFoundError) as err:
        raise DataError(str(err)) from None
    what = f"--data {args.data}" + (f" (tokenised with --tokenizer {args.tokenizer})" if args.tokenizer else "")
    check_token_ids(tokens, model.config.vocab_size, what)
    seq_len = args.seq_len or _training_length(folder) or 512
    return model, tokenizer, folder, tokens, seq_len


def training_setting(folder: Path, key: str) -> Any:
    """The value of `key` (e.g. seq_len, train_data) in the checkpoint's train_config.yaml, None when the folder is no
    training checkpoint or has no such key."""
    import yaml

    path = folder / "train_config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text()).get(key)
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        raise UsageError(f"{path} is damaged (not a YAML mapping); pass --{key.replace('_', '-')} to go on") from None


def _training_length(folder: Path) -> int | None:
    """The seq_len the checkpoint was trained with, when it is one of our training checkpoints."""
    seq_len = training_setting(folder, "seq_len")
    return seq_len if isinstance(seq_len, int) and seq_len > 0 else None


def run_ppl(args: argparse.Namespace) -> int:
    from oryx.eval.perplexity import evaluate

    model, tokenizer, folder, tokens, seq_len = _load(args)
    schedules = args.schedule or ["attn" if m == 0 else "linear" for m in model.config.supported_modes]
    print(f"{folder}: {len(tokens):,} tokens of {args.data}, windows of {seq_len}")
    print(f"{'schedule':<32}{'tokens':>10}{'loss':>9}{'ppl':>10}{'bits/tok':>10}{'bits/byte':>11}{'attn %':>8}")
    results = []
    for spec in schedules:
        try:
            result = evaluate(
                model,
                tokens,
                seq_len,
                spec,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                seed=args.seed,
                tokenizer=tokenizer,
                precision=args.precision,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        results.append(result.to_dict())
        bpb = "" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"
        print(
            f"{result.schedule:<32}{result.tokens:>10,}{result.nll:>9.4f}{result.perplexity:>10.3f}"
            f"{result.bits_per_token:>10.4f}{bpb:>11}{100 * result.attention_fraction:>8.1f}"
        )
    if args.json:
        payload = {"checkpoint": str(folder), "data": args.data, "seq_len": seq_len, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


def run_switching(args: argparse.Namespace) -> int:
    from oryx.eval.switching import switching_curves

    model, _, folder, tokens, seq_len = _load(args)
    switch_at = args.switch_at or [seq_len // 4, seq_len // 2, 3 * seq_len // 4]
    try:
        curves = switching_curves(
            model,
            tokens,
            seq_len,
            switch_at,
            windows=args.windows,
            batch_size=args.batch_size,
            precision=args.precision,
            schedules=args.schedule,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.out) if args.out else folder / "switching"
    json_path, png_path = curves.save(out, args.smooth, title=f"{folder.name}: switching curve on {args.data}")
    print(
        f"{curves.windows} sequences of {seq_len} tokens; "
        f"perplexity over the {args.smooth} positions after each switch:"
    )
    for name, values in curves.summary(args.smooth).items():
        others = ", ".join(f"{k} {v:.2f}" for k, v in values.items() if k != "switch")
        print(f"  {name:<24} {values['switch']:.2f}   (no switch: {others})")
    for spec, values in curves.schedule_summary(args.smooth).items():
        print(
            f"  {spec}: perplexity {values['perplexity']:.2f}, no-switch runs in the same modes "
            f"{values['no_switch']:.2f} ({values['excess_percent']:+.2f} %)"
        )
    print(f"wrote {png_path} and {json_path}")
    return 0
