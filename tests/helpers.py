"""Helpers of the issue-11 reliability tests: a tiny text corpus, a tiny training config, and the one-line error
convention of the CLI (`oryx <command>: error: ...`, exit 2, no traceback)."""

from __future__ import annotations

import os
from pathlib import Path

from oryx.cli import main
from oryx.data import load_documents
from oryx.training import TrainConfig


def make_corpus(folder: Path) -> Path:
    """train.txt / val.txt from the embedded validation split, and a private token cache (byte tokenizer)."""
    text = "\n\n".join(doc.text for doc in load_documents("validation"))
    (folder / "train.txt").write_text(text[:1200])  # 18 batches of 2 × 33 tokens per epoch
    (folder / "val.txt").write_text(text[-4000:])
    os.environ["ORYX_CACHE_DIR"] = str(folder / "cache")  # read by the data layer at call time
    return folder


def tiny(corpus: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, width-64 Oryx-TG on byte tokens, in chunks of 8 so that modes switch inside every sequence."""
    values = dict(
        preset="oryx-tg-tiny", hidden_size=64, head_dim=32, train_data=str(corpus / "train.txt"),
        val_data=str(corpus / "val.txt"), tokenizer="byte", seq_len=32, batch_size=4, grad_accum=2,
        schedule="chunks:size=8,p_attn=0.5", steps=12, eval_every=6, save_every=4, eval_tokens=128, report=False,
        progress=False, tensorboard=False, threads=1, out_dir=str(out_dir),
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig.from_dict(values)


def cli_args(config: TrainConfig) -> list[str]:
    """The flags that reproduce `config` on the command line."""
    args = []
    for key, value in config.to_dict().items():
        if value is None or value == getattr(TrainConfig(), key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def subprocess_env(corpus: Path) -> dict[str, str]:
    return {**os.environ, "ORYX_CACHE_DIR": str(corpus / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(argv: list[str]) -> int:
    """`oryx ARGV` in process: its exit status, whether returned or raised by argparse (SystemExit); a Ctrl-C that
    escapes the command counts as a process killed by SIGINT (-2)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code
    except KeyboardInterrupt:
        return -2


def error_line(capsys, argv: list[str], *needles: str, command: str | None = None) -> str:
    """Run `oryx ARGV`, expecting the user-error convention: exit 2, and exactly one stderr line, reading
    `oryx <command>: error: ...` and holding every needle; returns that line."""
    code = run_cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    prefix = f"oryx {command or argv[0]}: error: "
    assert lines[0].startswith(prefix), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
