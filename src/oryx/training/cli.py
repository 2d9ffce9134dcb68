"""`oryx train`: train a model and write a report. With no arguments: a small Oryx-TG on the embedded corpus.

    oryx train                                   # the default run, report in runs/oryx-tg-default/report/
    oryx train --config configs/tiny.yaml --lr 1e-3 --steps 2000
    oryx train --resume                          # continue runs/oryx-tg-default exactly where it stopped
    torchrun --nproc_per_node 2 -m oryx.cli train --parallel ddp ...

Settings come from the defaults, then `--config FILE` (YAML, keys as below), then flags. A bad setting (unknown key,
wrong type, missing data path) stops the command before any work, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path

from oryx import checkpoint as ckpt
from oryx.cli_common import add_no_verify_argument
from oryx.training import runfolder
from oryx.training.config import (
    BEFORE_THEY_EXISTED,
    SCHEDULE_KEYS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
)

# Keys a resumed run may change: they do not touch the training trajectory.
RESUMABLE_CHANGES = {
    "eval_every", "eval_tokens", "report", "switch_at", "switch_windows", "save_every",
    "keep_checkpoints", "progress", "tensorboard", "threads", "device", "compile", "cuda_graphs",
    "gradient_checkpointing", "out_dir", "loss_chunk_tokens",
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (keys as the flags, with underscores)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the run in --out-dir from its latest checkpoint (or from CHECKPOINT); the saved settings are "
        "used, and only evaluation/checkpoint/system settings may be changed (see --change-schedule)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out-dir: what oryx train wrote there is moved aside and deleted once the new "
        "run's first checkpoint is saved (restored if it stops before); your own files stay",
    )
    parser.add_argument(
        "--change-schedule",
        action="store_true",
        help=f"with --resume: let {', '.join('--' + k.replace('_', '-') for k in SCHEDULE_KEYS)} take new values "
        "from here on (e.g. a lower --lr after a divergence); recorded in the run's history",
    )
    parser.add_argument(
        "--accept-data-change",
        action="store_true",
        help="with --resume: continue although the data's content fingerprint differs from the checkpoint's",
    )
    add_no_verify_argument(parser, "the checkpoint given to --resume")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_arguments(parser)


OWN_FLAGS = ("config", "resume", "overwrite", "print_config", "change_schedule", "accept_data_change", "verify")


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """(config, checkpoint to resume from or None): the defaults (or, when resuming, the saved run's config), then
    --config, then the flags given.

    Raises:
        ConfigError: naming the bad key.
        CheckpointError: the checkpoint to resume from is damaged.
    """
    flags = {k: v for k, v in vars(args).items() if k not in OWN_FLAGS}

    def overridden(base: TrainConfig) -> TrainConfig:
        return TrainConfig.from_dict(flags, TrainConfig.from_yaml(args.config, base) if args.config else base)

    config = overridden(TrainConfig())
    if args.resume is None:
        for flag in ("change_schedule", "accept_data_change"):
            if getattr(args, flag, False):
                raise ConfigError(f"--{flag.replace('_', '-')} applies only with --resume")
        return config, None
    if args.resume == "latest":
        runfolder.check_unlocked(config.out_dir)  # another process writing the run: say so before reading it
        found = ckpt.latest(config.out_dir)
        if found is None:
            raise ConfigError(f"--resume: {config.out_dir} has no checkpoint (set --out-dir to the run's folder)")
        resume = found
    else:  # a checkpoint folder names its run: RUN/checkpoints/step-N
        resume = Path(args.resume)
        if not resume.exists():
            raise ConfigError(f"--resume: {resume} does not exist (give a checkpoint folder, or --resume alone)")
        flags.setdefault("out_dir", str(resume.resolve().parent.parent))
        runfolder.check_unlocked(resume.resolve().parent.parent)
    if getattr(args, "verify", True):
        ckpt.verify(resume)
    saved = TrainConfig.from_yaml(resume / ckpt.TRAIN_CONFIG, dataclasses.replace(TrainConfig(), **BEFORE_THEY_EXISTED))
    config = overridden(saved)
    changeable = RESUMABLE_CHANGES | (set(SCHEDULE_KEYS) if getattr(args, "change_schedule", False) else set())
    for key, value in config.to_dict().items():
        if key not in changeable and value != getattr(saved, key):
            hint = (
                " add --change-schedule to continue with the new value (recorded in the run's history), or"
                if key in SCHEDULE_KEYS
                else ""
            )
            raise ConfigError(
                f"--resume continues the saved run, but {key} differs (saved {getattr(saved, key)!r}, given "
                f"{value!r});{hint} start a new run in another --out-dir to change it"
            )
    return config, str(resume)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config, resume = resolve_config(args)  # ConfigError, CheckpointError: one error line (oryx.cli_common)
    config.check()
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from oryx.training.trainer import TrainingDiverged, TrainingInterrupted, train  # heavy imports: config is good

    resume_hint = f"oryx train --resume --out-dir {config.out_dir}"
    try:
        result = train(
            config,
            resume=resume,
            overwrite=args.overwrite,
            verify=args.verify,
            accept_data_change=args.accept_data_change,
        )
    except TrainingDiverged as err:
        print(f"oryx train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C: one line, never a traceback
        checkpoint = err.checkpoint if isinstance(err, TrainingInterrupted) else resume
        if checkpoint is None:
            print("oryx train: interrupted before the first checkpoint; nothing to resume", file=sys.stderr)
        else:
            print(f"oryx train: interrupted; resume with --resume ({resume_hint})", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(
            f"oryx train: error: no space left on the device ({err.filename or config.out_dir}); free some space, "
            f"then continue from the last checkpoint with {resume_hint}",
            file=sys.stderr,
        )
        return 2
    if not _is_main_rank():
        return 0
    print(f"checkpoint: {result.checkpoint}")
    if result.report is not None:
        summary = result.report
        print(_final_lines(summary.parent))
        print(
            f"report: {summary.parent}/ (summary.md, val_ppl.png"
            + (", switching.png)" if (summary.parent / "switching.png").is_file() else ")")
        )
    print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _final_lines(report_dir: Path) -> str:
    final = json.loads((report_dir / "final.json").read_text())
    modes = [k.removeprefix("val_ppl_") for k in final if k.startswith("val_ppl_")]
    parts = [f"{m}-only {final[f'val_ppl_{m}']:.2f}" for m in modes]
    return f"validation perplexity: {', '.join(parts)}; unigram {final['unigram_ppl']:.2f}"
