"""`oryx bench`: forward+backward throughput of an Oryx preset per mode, with the same-size Transformer baseline
measured in the same run, reported as ratios (never a timed test; results go to benchmarks/RESULTS.md).

Modes: all-attention, all-linear, and the training mix (`chunks:size=128,p_attn=0.25`). One sequence per step, so
the time per step is the time per sequence; linear cost shows as t(T)/t(1024) ≈ T/1024.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from oryx.configuration import OryxConfig
from oryx.modeling import OryxForCausalLM
from oryx.schedule import parse

MODES = {"attn": "attn", "linear": "linear", "mix": "chunks:size=128,p_attn=0.25"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="oryx-tg-small", help="Oryx preset to time (default: oryx-tg-small)")
    parser.add_argument(
        "--baseline", default="transformer", help="baseline family of the same size (default: transformer)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")


def time_step(model: OryxForCausalLM, ids: torch.Tensor, modes: torch.Tensor | None, repeats: int) -> float:
    """Median seconds of one forward+backward (after one warm-up step)."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, modes=modes, labels=ids).loss.backward()

    step()
    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    size = args.preset.rpartition("-")[2]
    max_len = max(args.lengths)
    models = {
        "oryx": OryxConfig.from_preset(args.preset, vocab_size=args.vocab_size, max_position_embeddings=max_len),
        "baseline": OryxConfig.from_preset(
            f"{args.baseline}-{size}", vocab_size=args.vocab_size, max_position_embeddings=max_len
        ),
    }
    generator = torch.Generator().manual_seed(0)
    results: list[dict] = []
    print(
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} preset={args.preset} "
        f"baseline={args.baseline}-{size} batch={args.batch}"
    )
    print(f"{'model':<12}{'mode':<8}{'T':>6}{'ms/step':>11}{'tok/s':>10}")
    for name, config in models.items():
        model = OryxForCausalLM(config).to(device=args.device, dtype=dtype).train()
        modes_to_run = MODES if name == "oryx" else {"attn" if config.variant == "transformer" else "linear": None}
        for mode, spec in modes_to_run.items():
            for T in args.lengths:
                ids = torch.randint(0, args.vocab_size, (args.batch, T), generator=generator).to(args.device)
                modes = None if spec is None else parse(spec).modes(args.batch, T, generator=generator).to(args.device)
                seconds = time_step(model, ids, modes, args.repeats)
                row = {
                    "model": name,
                    "mode": mode,
                    "T": T,
                    "seconds": seconds,
                    "tokens_per_s": args.batch * T / seconds,
                }
                results.append(row)
                print(f"{name:<12}{mode:<8}{T:>6}{seconds * 1e3:>11.1f}{row['tokens_per_s']:>10.0f}", flush=True)
    print_ratios(results, args.lengths)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


def print_ratios(results: list[dict], lengths: list[int]) -> None:
    time_of = {(r["model"], r["mode"], r["T"]): r["seconds"] for r in results}
    base_mode = next(r["mode"] for r in results if r["model"] == "baseline")
    print("\nratios")
    if 1024 in lengths:
        for T in lengths:
            print(f"  all-linear t({T})/t(1024) = {time_of['oryx', 'linear', T] / time_of['oryx', 'linear', 1024]:.2f}")
    for T in lengths:
        base = time_of["baseline", base_mode, T]
        print(
            f"  T={T}: mix/baseline = {time_of['oryx', 'mix', T] / base:.2f}   "
            f"attn/baseline = {time_of['oryx', 'attn', T] / base:.2f}   "
            f"linear/baseline = {time_of['oryx', 'linear', T] / base:.2f}"
        )
