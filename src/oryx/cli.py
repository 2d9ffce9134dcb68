"""The `oryx` command line: `oryx {train,eval,generate,bench,info} --help`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `oryx --help` is instant. A user-caused failure exits 2 with one
`oryx <command>: error: ...` line (`oryx.cli_common`), Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import importlib
import sys

from oryx.cli_common import ArgumentParser, run_command

SUBCOMMANDS = {
    "train": ("oryx.training.cli", "train a model (default: a small Oryx-TG on the embedded corpus) and report"),
    "eval": ("oryx.eval.command", "evaluate a checkpoint: perplexity, switching curve, retrieval benchmarks"),
    "generate": ("oryx.generation", "generate text from a checkpoint under a mode schedule"),
    "bench": ("oryx.bench", "CPU/GPU throughput benchmark with the Transformer baseline side by side"),
    "info": ("oryx.info", "list presets and print a preset's parameter report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(prog="oryx", description="Oryx multi-mixer language models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help or the "invalid choice" error
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    command_parser = ArgumentParser(prog=f"oryx {argv[0]}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[1:])
    prog = " ".join(["oryx", argv[0], *([args.eval_command] if getattr(args, "eval_command", None) else [])])
    return run_command(prog, module.run, args)


if __name__ == "__main__":
    sys.exit(main())
