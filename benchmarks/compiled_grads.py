"""Compiled against eager gradients of a small Oryx model, per parameter group: the reproduction of the GPU failure
of `test_compiled_model_equals_eager_on_the_fast_backends` (benchmarks/RESULTS.md, issue 13) and the tool to localise
it. Not a test: it prints, for one configuration per call, the relative L2 error of each block's mixer and MLP
gradients, the embedding's and the final norm's.

    python benchmarks/compiled_grads.py --variant tg --seed 2                   # fails on an H200 (fla + inductor)
    python benchmarks/compiled_grads.py --variant tg --seed 2 --reference recurrence   # the recurrence on torch
    python benchmarks/compiled_grads.py --variant tk --reference attention --modes linear --layers 3

`--reference` puts one half of the mixer on the torch reference op (recurrence: every linear op; attention: causal
attention), `--whole` compiles the model with torch.compile instead of `compile_blocks()`, `--bf16` runs under
autocast.
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from oryx import OryxConfig, OryxForCausalLM
from oryx.ops import dispatch
from oryx.ops.backends.fla import HOPPER_BACKWARD_ENV
from oryx.schedule import parse

RECURRENCE_OPS = ("gated_delta_rule", "scalar_decay_rule", "kimi_delta_rule")


def on_reference(half: str | None) -> None:
    """Drop the fast backends of one half of the mixer from the registry (this process only)."""
    ops = {"recurrence": RECURRENCE_OPS, "attention": ("causal_attention",)}.get(half, ())
    for op in ops:
        for name in [n for n in dispatch.available(op) if n != "torch"]:
            dispatch._REGISTRY[op].pop(name)


def group_errors(args: argparse.Namespace) -> dict[str, float]:
    """{group: relative L2 error of its gradients, compiled against eager} for one small model and batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = OryxConfig(variant=args.variant, vocab_size=512, hidden_size=256, num_hidden_layers=args.layers)
    model = OryxForCausalLM(config).to(device)
    B, T = 2, 384
    ids = torch.randint(0, 512, (B, T), generator=gen).to(device)
    modes = parse("chunks:size=128,p_attn=0.5").modes(B, T, generator=gen)
    modes[:, 200:203] = 1 - modes[:, 200:203]  # token-level switches inside a chunk, as the GPU test has them
    modes = {"attn": torch.zeros_like(modes), "linear": torch.ones_like(modes)}.get(args.modes, modes).to(device)

    def grads(forward) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
            forward(ids, modes=modes, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = grads(model)
    forward = torch.compile(model, fullgraph=True) if args.whole else model
    if not args.whole:
        model.compile_blocks()
    compiled = grads(forward)
    groups: dict[str, list[str]] = {}
    for name in eager:
        block = re.search(r"layers\.(\d+)\.(mixer|mlp)", name)
        groups.setdefault(f"L{block[1]}.{block[2]}" if block else name.rsplit(".", 2)[-2], []).append(name)

    def error(names: list[str]) -> float:
        a, b = (torch.cat([g[n].flatten() for n in names]) for g in (compiled, eager))
        return ((a - b).norm() / b.norm()).item()

    return {group: error(names) for group, names in sorted(groups.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tg", choices=["tg", "tm", "tk"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--modes", default="mix", choices=["mix", "attn", "linear"])
    parser.add_argument("--reference", choices=["recurrence", "attention"], default=None)
    parser.add_argument("--whole", action="store_true", help="torch.compile(model) instead of compile_blocks()")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    args = parser.parse_args()
    os.environ.setdefault(HOPPER_BACKWARD_ENV, "1")  # every dtype on fla, as the GPU test runs it
    on_reference(args.reference)
    errors = group_errors(args)
    print(f"{vars(args)} | " + " ".join(f"{group}:{err:.0e}" for group, err in errors.items()), flush=True)


if __name__ == "__main__":
    main()
