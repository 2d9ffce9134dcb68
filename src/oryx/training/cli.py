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
import json
import os
import sys
import time
from pathlib import Path

from oryx.training import checkpoint as ckpt
from oryx.training.config import ConfigError, TrainConfig, add_config_arguments

# Keys a resumed run may change: they do not touch the training trajectory.
RESUMABLE_CHANGES = {
    "eval_every", "eval_tokens", "report", "switch_at", "switch_windows", "save_every",
    "keep_checkpoints", "progress", "tensorboard", "threads", "device", "compile", "gradient_checkpointing", "out_dir",
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
        "used, and only evaluation/checkpoint/system settings may be changed",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_arguments(parser)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """(config, checkpoint to resume from or None): the defaults (or, when resuming, the saved run's config), then
    --config, then the flags given.

    Raises:
        ConfigError: naming the bad key.
        CheckpointError: the checkpoint to resume from is damaged.
    """
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "overwrite", "print_config")}

    def overridden(base: TrainConfig) -> TrainConfig:
        return TrainConfig.from_dict(flags, TrainConfig.from_yaml(args.config, base) if args.config else base)

    config = overridden(TrainConfig())
    if args.resume is None:
        return config, None
    if args.resume == "latest":
        found = ckpt.latest(config.out_dir)
        if found is None:
            raise ConfigError(f"--resume: {config.out_dir} has no checkpoint (set --out-dir to the run's folder)")
        resume = found
    else:  # a checkpoint folder names its run: RUN/checkpoints/step-N
        resume = Path(args.resume)
        flags.setdefault("out_dir", str(resume.resolve().parent.parent))
    ckpt.verify(resume)
    saved = TrainConfig.from_yaml(resume / ckpt.TRAIN_CONFIG)
    config = overridden(saved)
    for key, value in config.to_dict().items():
        if key not in RESUMABLE_CHANGES and value != getattr(saved, key):
            raise ConfigError(
                f"--resume continues the saved run, but {key} differs (saved {getattr(saved, key)!r}, given "
                f"{value!r}); start a new run in another --out-dir to change it"
            )
    return config, str(resume)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        config, resume = resolve_config(args)
        config.check()
    except (ConfigError, ckpt.CheckpointError) as err:
        print(f"oryx train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from oryx.training.trainer import TrainingDiverged, train  # heavy imports only once the config is good

    try:
        result = train(config, resume=resume, overwrite=args.overwrite)
    except (ConfigError, ckpt.CheckpointError) as err:
        print(f"oryx train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"oryx train: {err}", file=sys.stderr)
        return 1
    if not _is_main_rank():
        return 0
    print(f"checkpoint: {result.checkpoint}")
    if config.report:
        from oryx.training.report import write_report

        summary = write_report(result.run_dir, config, started)
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
