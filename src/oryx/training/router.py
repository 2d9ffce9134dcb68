"""`oryx train-router RUN_DIR`: train a router (`oryx.routing`) for a run's latest checkpoint on the run's own data,
and store it in that checkpoint folder, beside weights it leaves untouched.

    oryx train-router runs/oryx-tg-default                        # regression on measured gains (the default)
    oryx train-router runs/oryx-tg-default --method straight-through --budget 0.1 --steps 300
    oryx train-router CHECKPOINT --train-data my_texts/ --tokenizer gpt2 --seq-len 1024
    oryx train-router runs/mqar/models/oryx-tm-lr0.003            # a model saved by oryx eval mqar --save-models
    oryx eval ppl runs/oryx-tg-default --schedule router:budget=0.1

The data are the run's (`train_data`, `tokenizer`, `text_field`, `seq_len` of its train_config.yaml) unless the flags
say otherwise; `--windows` windows spread evenly over them. An MQAR model's are `--windows` rows of every setting of
its sweep (training mix and test grid), from the training seed. The router is written as `router.safetensors` and added
to the folder's checksum manifest, so `oryx eval`, `oryx generate` and `from_pretrained` load it with the model. With
`--joint` (straight-through only) the language model trains too, so the result goes to a new folder (`--out`), never
over the checkpoint's weights.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from oryx import checkpoint as ckpt
from oryx.cli_common import (
    UsageError,
    add_device_argument,
    add_no_verify_argument,
    positive_float,
    positive_int,
    resolve_device,
    seed,
)
from oryx.eval.mqar_run import MQAR_SETTINGS, load_mqar_model, router_batches, save_mqar_model
from oryx.eval.perplexity import window_batches
from oryx.routing.budget import OWN, calibration_rows, realised_fraction
from oryx.routing.router import Router, store_router
from oryx.routing.training import RouterTraining, train_router, train_router_straight_through
from oryx.training import runfolder
from oryx.training.config import TrainConfig

METHODS = ("regression", "straight-through")
REPORT_BUDGETS = (0.025, 0.05, 0.1, 0.25)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("checkpoint", help="run folder (its latest checkpoint), or a checkpoint or model folder")
    parser.add_argument("--method", choices=METHODS, default="regression", help="how to train (default: regression)")
    parser.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: 500; ST 200)")
    parser.add_argument(
        "--windows", type=positive_int, default=256, help="training windows (MQAR: rows per setting; default: 256)"
    )
    parser.add_argument("--train-data", default=None, help="training text (default: the run's train_data)")
    parser.add_argument("--text-field", default=None, help="JSONL key / dataset column (default: the run's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer of --train-data (default: the checkpoint's)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per window (default: the run's)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default: 8)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="the router's learning rate (default: 3e-3)")
    parser.add_argument(
        "--budget", type=positive_float, default=0.1, help="straight-through: the training budget (default: 0.1)"
    )
    parser.add_argument(
        "--joint", action="store_true", help="straight-through: train the language model too (needs --out)"
    )
    parser.add_argument("--out", default=None, help="with --joint: the folder to save the model and router to")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the router's init and minibatches")
    parser.add_argument(
        "--no-seen-before",
        dest="seen_before",
        action="store_false",
        help="leave out the feature 'this token id occurred earlier in the row' (the routers before it; an ablation)",
    )
    add_device_argument(parser)
    add_no_verify_argument(parser, "the checkpoint")


def _run_dir(folder: Path) -> Path | None:
    """The run folder of a training checkpoint (RUN/checkpoints/step-N), or None."""
    run = folder.absolute().parent.parent
    return run if folder.absolute().parent.name == ckpt.CHECKPOINTS and (run / runfolder.MARKER).is_file() else None


def _data_settings(folder: Path, args: argparse.Namespace) -> tuple[str, str, int]:
    """(train_data, text_field, seq_len): the flags', else the run's (train_config.yaml of the checkpoint)."""
    saved = TrainConfig.from_yaml(folder / ckpt.TRAIN_CONFIG) if (folder / ckpt.TRAIN_CONFIG).is_file() else None
    if args.train_data is None and saved is None:
        raise UsageError(f"{folder} is no training checkpoint (no {ckpt.TRAIN_CONFIG}); pass --train-data")
    train_data = args.train_data or saved.train_data
    text_field = args.text_field or (saved.text_field if saved else "text")
    seq_len = args.seq_len or (saved.seq_len if saved else 512)
    return train_data, text_field, seq_len


def train_checkpoint_router(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[Router, Path]:
    """Train the router `args` describe (see `add_arguments`) and store it; returns it and the folder it went to."""
    from transformers.utils import logging as hf_logging

    from oryx.data import DataError, check_token_ids, load_tokenizer, load_tokens

    if args.joint and (args.method != "straight-through" or args.out is None):
        raise UsageError("--joint trains the language model too: it needs --method straight-through and --out DIR")
    if not 0 < args.budget < 1:
        raise UsageError(f"--budget must be a fraction of the tokens in (0, 1), got {args.budget}")
    hf_logging.disable_progress_bar()
    device = resolve_device(args.device)
    if (Path(args.checkpoint) / MQAR_SETTINGS).is_file():  # an MQAR model: rows of its sweep's settings
        model, mqar_settings = load_mqar_model(args.checkpoint, verify=args.verify)
        model, folder, tokenizer, run_dir = model.to(device), Path(args.checkpoint), None, None
        batches = router_batches(mqar_settings, args.windows, args.batch_size)
        train_data, seq_len = "mqar", max(c.seq_len for c in mqar_settings.test_grid)
    else:
        mqar_settings = None
        folder = ckpt.resolve(args.checkpoint)
        run_dir = _run_dir(folder)
        if run_dir is not None:
            runfolder.check_unlocked(run_dir)  # another process writing the run: say so before reading it
        model, tokenizer, folder = ckpt.load_pretrained(folder, device, verify=args.verify)
        train_data, text_field, seq_len = _data_settings(folder, args)
        try:
            if args.tokenizer is not None:
                tokenizer = load_tokenizer(args.tokenizer)
            tokens = load_tokens(train_data, tokenizer, text_field=text_field)
        except (ValueError, FileNotFoundError) as err:
            raise DataError(f"--train-data {train_data}: {err}") from None
        check_token_ids(tokens, model.config.vocab_size, f"--train-data {train_data}")
        if len(tokens) <= seq_len:
            raise DataError(f"--train-data {train_data} has {len(tokens)} tokens, too few for one window of {seq_len}")
        batches = window_batches(tokens, seq_len, args.windows, args.batch_size)
    if not model.config.is_oryx:
        raise UsageError(f"{folder} holds a {model.config.variant!r} baseline, which has one mode: nothing to route")
    straight = args.method == "straight-through"
    steps = args.steps or (200 if straight else 500)
    settings = RouterTraining(steps=steps, lr=args.lr, budget=args.budget, joint=args.joint, seed=args.seed,
                              seen_before=args.seen_before)  # fmt: skip
    log(f"{folder}: training a {args.method} router on {sum(len(b[0]) for b in batches)} windows of up to {seq_len} "
        f"tokens of {train_data}")  # fmt: skip
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer = train_router_straight_through if straight else train_router
    router = trainer(model, batches, settings, log=log)
    router.config.trained.update(data=train_data, seq_len=seq_len, windows=sum(len(b[0]) for b in batches))
    if args.joint:
        target = Path(args.out)
        target.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        model.attach_router(router)
        if mqar_settings is not None:  # an MQAR model stays one: `oryx eval budget --tasks mqar` reads its settings
            save_mqar_model(model, mqar_settings, target)
        else:
            model.save_pretrained(target)
        return router, target
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])]
    if changed:  # the frozen model must come out as it went in: its checkpoint is not rewritten
        raise RuntimeError(f"router training changed the language model's weights {changed[:3]}")
    if run_dir is None:
        store_router(router, folder)
    else:
        with runfolder.RunLock(run_dir):
            store_router(router, folder)
    return router, folder


def run(args: argparse.Namespace) -> int:
    try:
        router, folder = train_checkpoint_router(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    parameters = sum(p.numel() for p in router.net.parameters())
    rows = calibration_rows(router.calibration)
    chunk = 1
    fractions = ", ".join(
        f"{b:.1%} -> {realised_fraction(rows, router.threshold(b), b, chunk, OWN):.1%}" for b in REPORT_BUDGETS
    )
    print(f"router ({parameters:,} parameters, {router.config.method}) saved into {folder}")
    print(f"budget -> realised attention fraction on its calibration windows: {fractions}")
    if (folder / MQAR_SETTINGS).is_file():
        print(f"evaluate it with: oryx eval budget {folder} --tasks mqar")
    else:
        print(f"use it with: oryx eval ppl {folder} --schedule router:budget=0.1")
    return 0
