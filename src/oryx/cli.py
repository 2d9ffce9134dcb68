"""The `oryx` command line: `oryx {train,train-router,eval,generate,bench,info} --help`, and `oryx eval <evaluation>
--help`.

Every command is one row of `COMMANDS`: its help line, the function that adds its arguments and the function that
runs it (`run(args) -> int`); a group (`eval`) is a table of such rows. A new command is one row here. A user-caused
failure exits 2 with one `oryx <command>: error: ...` line (`oryx.cli_common`), Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from oryx import autotune, bench, generation, info
from oryx.cli_common import ArgumentParser, run_command
from oryx.eval import cli as runners
from oryx.eval import command as evaluations
from oryx.training import cli as training
from oryx.training import router as router_training


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


EVAL_COMMANDS: dict[str, Command] = {
    "ppl": Command(
        "perplexity and bits per byte on a dataset under one or more schedules",
        evaluations.add_ppl_arguments,
        evaluations.run_ppl,
    ),
    "switching": Command(
        "the switching curve: token-level perplexity against position (paper Figure 3)",
        evaluations.add_switching_arguments,
        evaluations.run_switching,
    ),
    "mqar": Command(
        "train every family on Zoology's MQAR mix and test it per mode and cross-mode protocol",
        runners.add_mqar_arguments,
        runners.run_mqar,
    ),
    "retrieval": Command(
        "NIAH-1/2/3 and record recall of checkpoints, single-mode and cross-mode",
        runners.add_retrieval_arguments,
        runners.run_retrieval_command,
    ),
    "zeroshot": Command(
        "LAMBADA-style last word and multiple-choice next sentence of checkpoints, per mode",
        runners.add_zeroshot_arguments,
        runners.run_zeroshot_command,
    ),
    "budget": Command(
        "quality against the attention budget: router, entropy, random and fixed placements at equal fractions",
        runners.add_budget_arguments,
        runners.run_budget,
    ),
    "report": Command(
        "Markdown tables and PNG plots of every result file in a folder",
        runners.add_report_arguments,
        runners.run_report,
    ),
    "export-lm-eval-tasks": Command(
        "write our tasks as local lm-eval task YAMLs with their data",
        runners.add_export_arguments,
        runners.run_export,
    ),
}

COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": Command(
        "train a model (default: a small Oryx-TG on the embedded corpus) and report",
        training.add_arguments,
        training.run,
    ),
    "train-router": Command(
        "train a router for a run's checkpoint (the model decides where to attend, under a budget)",
        router_training.add_arguments,
        router_training.run,
    ),
    "eval": EVAL_COMMANDS,
    "generate": Command(
        "generate text from a checkpoint under a mode schedule", generation.add_arguments, generation.run
    ),
    "bench": Command(
        "CPU/GPU throughput benchmark with the Transformer baseline side by side", bench.add_arguments, bench.run
    ),
    "info": Command("list presets and print a preset's parameter report", info.add_arguments, info.run),
    "autotune": Command(
        "fla's Triton autotune choices: status, export and import of this machine's cache",
        autotune.add_arguments,
        autotune.run,
    ),
}
_COMMAND, _PROG = "_oryx_command", "_oryx_prog"
GROUP_HELP = {"eval": "evaluate a checkpoint: perplexity, switching curve, retrieval benchmarks"}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: a subparser per row of `COMMANDS`, each setting its row and its program name for error
    lines (under private names that `main` takes out before the command sees its arguments)."""
    parser = ArgumentParser(prog="oryx", description="Oryx multi-mixer language models")

    def add(sub: argparse._SubParsersAction, name: str, entry: Command | dict[str, Command], prog: str) -> None:
        if isinstance(entry, Command):
            command = sub.add_parser(name, help=entry.help, description=entry.help)
            entry.add_arguments(command)
            command.set_defaults(**{_COMMAND: entry, _PROG: f"{prog} {name}"})
            return
        group = sub.add_parser(name, help=GROUP_HELP[name], description=GROUP_HELP[name])
        inner = group.add_subparsers(metavar="COMMAND", required=True)
        for inner_name, inner_entry in entry.items():
            add(inner, inner_name, inner_entry, f"{prog} {name}")

    sub = parser.add_subparsers(metavar="COMMAND")
    for name, entry in COMMANDS.items():
        add(sub, name, entry, "oryx")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    command, prog = vars(args).pop(_COMMAND), vars(args).pop(_PROG)
    return run_command(prog, command.run, args)


if __name__ == "__main__":
    sys.exit(main())
