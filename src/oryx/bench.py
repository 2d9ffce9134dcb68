"""`oryx bench`: training throughput (forward+backward) of Oryx presets per mode, with baselines measured in the same
run and reported as ratios. Benchmarks are never timed tests; results go to benchmarks/RESULTS.md.

Default (the CPU benchmark): oryx-tg-small in all-attention, all-linear and the training mix
(`chunks:size=128,p_attn=0.25`) against transformer-small, one sequence per step at T = 512 … 4096, so the time per
step is the time per sequence (linear cost shows as t(T)/t(1024) ≈ T/1024).

GPU training throughput (issue 3):
    oryx bench --presets oryx-tg-130m oryx-tm-130m transformer-130m gdn-130m mamba2-130m --modes mix \
        --lengths 2048 8192 --tokens 32768 --device cuda --dtype bfloat16
MFU counts 6·N (N = active parameters incl. the tied LM head) plus 6·L·D·T·f per token for the attention rows
(f = fraction of tokens in attention; causal, so half of PaLM's 12·L·D·T), against the card's dense bf16 peak.
The recurrences' own FLOPs are not counted (small next to the projections at these widths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from oryx.cli_common import UsageError, nonnegative_int, output_file, positive_int, resolve_device
from oryx.configuration import OryxConfig, preset_names
from oryx.modeling import OryxForCausalLM
from oryx.params import param_report
from oryx.schedule import attention_fraction, parse

MODES = {"attn": "attn", "linear": "linear", "mix": "chunks:size=128,p_attn=0.25"}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["oryx-tg-small", "transformer-small"],
        help="presets to time; a baseline runs its one mode (default: oryx-tg-small transformer-small)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        help="modes to time for Oryx presets (default: attn linear mix)",
    )
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument(
        "--tokens",
        type=nonnegative_int,
        default=0,
        help="tokens per step (batch = tokens // T); 0 = one sequence per step",
    )
    parser.add_argument(
        "--vocab-size", type=positive_int, default=None, help="override the vocabulary (CPU default 8192)"
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps per point (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16 = autocast with float32 weights, as training does",
    )
    parser.add_argument("--checkpointing", action="store_true", help="enable gradient checkpointing")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model: the Transformer whole, as a user would; Oryx and the recurrent baselines by "
        "block (compile_blocks, what oryx train runs on CUDA), on CUDA replayed from CUDA graphs as oryx train does "
        "(see --no-cuda-graphs). The first step, compile included, is printed apart",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="with --compile on CUDA: launch the compiled kernels from the host instead of replaying CUDA graphs",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu = this process's CPU time (CPU device only): steadier than wall time on a shared machine",
    )
    parser.add_argument("--json", type=output_file, default=None, help="also write the raw numbers to this JSON file")


def time_step(
    model: nn.Module,
    ids: torch.Tensor,
    modes: torch.Tensor | None,
    repeats: int,
    dtype,
    clock=time.perf_counter,
    cuda_graphs: bool = False,
) -> tuple[float, float]:
    """(seconds of the first forward+backward, compiling included; median seconds of `repeats` later ones), by
    `clock`. `cuda_graphs`: the model replays CUDA graphs, so each step marks its start (the last step's graph
    outputs are dead)."""
    autocast = torch.autocast(ids.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> float:
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = clock()
        model.zero_grad(set_to_none=True)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = model(ids, modes=modes, labels=ids).loss
        loss.backward()
        if ids.is_cuda:
            torch.cuda.synchronize()
        return clock() - start

    first = step()
    return first, statistics.median(step() for _ in range(repeats))


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    unknown = [p for p in args.presets if p not in preset_names()]
    if unknown:
        raise UsageError(f"--presets: unknown preset {unknown[0]!r}; `oryx info` lists them")
    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        raise UsageError("--clock cpu measures host CPU time; use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    vocab = args.vocab_size or (8192 if args.device == "cpu" else None)
    generator = torch.Generator().manual_seed(0)
    peak = peak_tflops(args.device)
    results: list[dict] = []
    graphs = args.compile and args.cuda_graphs and args.device.startswith("cuda")
    print(
        f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}) "
        f"dtype={args.dtype} threads={torch.get_num_threads()} clock={args.clock} "
        f"tokens/step={args.tokens or 'one sequence'} compile={args.compile} cuda_graphs={graphs}"
    )
    print(f"{'preset':<18}{'mode':<8}{'T':>6}{'batch':>6}{'ms/step':>11}{'tok/s':>10}{'MFU':>7}{'first step s':>14}")
    for preset in args.presets:
        overrides = {"max_position_embeddings": max(args.lengths)}
        if vocab:
            overrides["vocab_size"] = vocab
        config = OryxConfig.from_preset(preset, **overrides)
        model = OryxForCausalLM(config).to(args.device).train()
        if args.checkpointing:
            model.gradient_checkpointing_enable()
        active = param_report(model, verbose=False)["active_attention_with_embedding"]
        timed: nn.Module = model
        if args.compile and config.variant == "transformer":
            timed = torch.compile(model, mode="reduce-overhead" if graphs else "default")
        elif args.compile:
            model.compile_blocks(cuda_graphs=graphs)
        modes_to_run = (
            {m: MODES[m] for m in args.modes}
            if config.is_oryx
            else {"attn" if config.variant == "transformer" else "linear": None}
        )
        for mode, spec in modes_to_run.items():
            for T in args.lengths:
                batch = max(1, args.tokens // T) if args.tokens else 1
                ids = torch.randint(0, config.vocab_size, (batch, T), generator=generator).to(args.device)
                modes = None if spec is None else parse(spec).modes(batch, T, generator=generator).to(args.device)
                only_attn = 1.0 if config.variant == "transformer" else 0.0
                f_attn = only_attn if modes is None else attention_fraction(modes)
                first, seconds = time_step(timed, ids, modes, args.repeats, dtype, clock, graphs)
                tokens_per_s = batch * T / seconds
                flops_per_token = 6 * active + 6 * config.num_hidden_layers * config.hidden_size * T * f_attn
                mfu = None if peak is None else flops_per_token * tokens_per_s / (peak * 1e12)
                row = {
                    "preset": preset,
                    "mode": mode,
                    "T": T,
                    "batch": batch,
                    "seconds": seconds,
                    "first_step_seconds": first,
                    "tokens_per_s": tokens_per_s,
                    "attention_fraction": f_attn,
                    "mfu": mfu,
                }
                results.append(row)
                mfu_text = "" if mfu is None else f"{mfu:.1%}"
                print(
                    f"{preset:<18}{mode:<8}{T:>6}{batch:>6}{seconds * 1e3:>11.1f}{tokens_per_s:>10.0f}{mfu_text:>7}"
                    f"{first:>14.1f}",
                    flush=True,
                )
        del model
    print_ratios(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"args": vars(args), "results": results, "compiled": args.compile, "cuda_graphs": graphs}, fh, indent=1
            )
    return 0


def print_ratios(results: list[dict]) -> None:
    """Time ratios against the baseline rows of the same T (and all-linear scaling against T = 1024)."""
    time_of = {(r["preset"], r["mode"], r["T"]): r["seconds"] for r in results}
    baselines = [r for r in results if r["preset"].startswith("transformer")]
    print("\nratios (time; < 1 means faster than the Transformer baseline)")
    for r in results:
        reference = time_of.get((r["preset"], "linear", 1024))
        if r["mode"] == "linear" and reference and r["preset"].startswith("oryx"):
            print(f"  {r['preset']} all-linear t({r['T']})/t(1024) = {r['seconds'] / reference:.2f}")
    for base in baselines:
        for r in results:
            if r["T"] == base["T"] and r is not base:
                ratio = r["seconds"] / base["seconds"]
                print(f"  T={r['T']}: {r['preset']} {r['mode']} / {base['preset']} = {ratio:.2f}")
