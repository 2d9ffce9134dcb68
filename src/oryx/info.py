"""`oryx info`: the presets, and the parameter report of one of them (built on the meta device: no memory)."""

from __future__ import annotations

import argparse

import torch

from oryx.cli_common import UsageError, positive_int
from oryx.configuration import OryxConfig, preset_names
from oryx.modeling import OryxForCausalLM
from oryx.params import param_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", nargs="?", help="a preset name (e.g. oryx-tg-130m); omit to list all presets")
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="override the preset's vocabulary size")


def run(args: argparse.Namespace) -> int:
    if args.preset is None:
        print("\n".join(preset_names()))
        return 0
    if args.preset not in preset_names():
        raise UsageError(f"unknown preset {args.preset!r}; run `oryx info` for the list ({', '.join(preset_names())})")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    config = OryxConfig.from_preset(args.preset, **overrides)
    with torch.device("meta"):
        model = OryxForCausalLM(config)
    print(
        f"{args.preset}: {config.num_hidden_layers} layers × {config.hidden_size}, {config.num_heads} heads of "
        f"{config.head_dim}, MLP {config.intermediate_size}, vocab {config.vocab_size}"
    )
    param_report(model)
    return 0
