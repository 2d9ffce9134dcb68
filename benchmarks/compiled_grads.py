"""Compiled against eager gradients of a small Oryx model: the reproduction of the GPU failure of
`test_compiled_model_equals_eager_on_the_fast_backends` (benchmarks/RESULTS.md, issue 13) and the tool to localise
it. Not a test: it prints, for one configuration per call,

1. the loss and the relative L2 error of each block's mixer and MLP gradients, the embedding's and the final norm's,
   for the model eager on the fast ops (twice: a first call that autotunes, then a tuned one) and compiled with each
   `--backends` (dynamo only, AOTAutograd, inductor), all against the same model in float64 on the torch reference;
2. `--trace`: where a compiled run first departs from the tuned eager one, in the order the work happens: each
   block's output and the gradient reaching it, and each call of an fla kernel (its inputs, their strides, storage
   offsets and 16-byte alignment, its outputs and, for the backward's recomputation, the output gradient it gets).

    python benchmarks/compiled_grads.py --variant tg --seed 2 --trace                  # fails on an H200
    python benchmarks/compiled_grads.py --variant tg --seed 2 --reference recurrence   # the recurrence on torch
    python benchmarks/compiled_grads.py --variant tk --reference attention --modes linear --layers 3

    python benchmarks/compiled_grads.py --flex --seed 2   # the attention branch alone, per batch row

`--reference` puts one half of the mixer on the torch reference op (recurrence: every linear op; attention: causal
attention), `--contiguous` hands fla fresh contiguous copies of its inputs, `--bf16` runs under autocast.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oryx import OryxConfig, OryxForCausalLM
from oryx.ops import dispatch
from oryx.ops.backends import fla, flex
from oryx.schedule import parse

RECURRENCE_OPS = ("gated_delta_rule", "scalar_decay_rule", "kimi_delta_rule")
Record = dict[str, Any]


def on_reference(half: str | None) -> None:
    """Drop the fast backends of one half of the mixer from the registry (this process only)."""
    ops = {"recurrence": RECURRENCE_OPS, "attention": ("causal_attention",)}.get(half, ())
    for op in ops:
        for name in [n for n in dispatch.available(op) if n != "torch"]:
            dispatch._REGISTRY[op].pop(name)


def describe(x: torch.Tensor) -> Record:
    """What a kernel sees of a tensor: layout and a float64 copy of the values."""
    return {
        "shape": tuple(x.shape),
        "stride": x.stride(),
        "offset": x.storage_offset(),
        "aligned": x.data_ptr() % 16 == 0,
        "dtype": str(x.dtype).removeprefix("torch."),
        "values": x.detach().double().cpu(),
    }


class KernelLog:
    """Wraps fla's kernels (`fla.KERNELS`) to record every call: `calls` is a list of {name: description}."""

    def __init__(self, contiguous: bool) -> None:
        self.calls: list[Record] = []
        self.contiguous = contiguous
        self.original = dict(fla.KERNELS)
        fla.KERNELS.update(
            {
                op: tuple(self.wrap(op, form, k) for form, k in zip(("chunk", "recurrent"), ks, strict=True))
                for op, ks in self.original.items()
            }
        )

    def wrap(self, op: str, form: str, kernel: Callable) -> Callable:
        def logged(q, k, v, g, beta, scale, h0):
            record: Record = {"call": f"{op}.{form}" + (".recompute" if torch.is_grad_enabled() else "")}
            inputs = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "h0": h0}
            record.update({name: describe(x) for name, x in inputs.items() if x is not None})
            if self.contiguous:
                q, k, v, g, beta, h0 = (
                    None if x is None else x.clone(memory_format=torch.contiguous_format) for x in inputs.values()
                )
            o, final = kernel(q, k, v, g, beta, scale, h0)
            record.update(o=describe(o), final=describe(final))
            if o.requires_grad:
                o.register_hook(lambda grad: record.update(grad_o=describe(grad)))
            self.calls.append(record)
            return o, final

        return logged


class BlockTap(nn.Module):
    """A block, eager or compiled, whose output and output gradient are recorded in `log` (a shared list)."""

    def __init__(self, block: nn.Module, index: int, log: list[Record]) -> None:
        super().__init__()
        self.tapped, self.index, self.log = block, index, log

    def forward(self, *args: Any) -> torch.Tensor:
        out = self.tapped(*args)
        record: Record = {"call": f"block {self.index}", "out": describe(out)}
        if out.requires_grad:
            out.register_hook(lambda grad: record.update(grad_out=describe(grad)))
        self.log.append(record)
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def build(args: argparse.Namespace, device: str) -> tuple[OryxForCausalLM, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = OryxConfig(variant=args.variant, vocab_size=512, hidden_size=256, num_hidden_layers=args.layers)
    model = OryxForCausalLM(config).to(device)
    B, T = 2, 384
    ids = torch.randint(0, 512, (B, T), generator=gen).to(device)
    modes = parse("chunks:size=128,p_attn=0.5").modes(B, T, generator=gen)
    modes[:, 200:203] = 1 - modes[:, 200:203]  # token-level switches inside a chunk, as the GPU test has them
    modes = {"attn": torch.zeros_like(modes), "linear": torch.ones_like(modes)}.get(args.modes, modes).to(device)
    return model, ids, modes


def loss_and_grads(model, ids, modes, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, modes=modes, labels=ids).loss
    loss.backward()
    grads = {n.replace(".tapped.", "."): p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def group_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """{group: relative L2 error of its gradients against the reference's}."""
    groups: dict[str, list[str]] = {}
    for name in reference:
        block = re.search(r"layers\.(\d+)\.(mixer|mlp)", name)
        groups.setdefault(f"L{block[1]}.{block[2]}" if block else name.rsplit(".", 2)[-2], []).append(name)
    return {
        group: rel(torch.cat([grads[n].flatten() for n in names]), torch.cat([reference[n].flatten() for n in names]))
        for group, names in sorted(groups.items())
    }


def first_departures(run: list[Record], tuned: list[Record], limit: float, shown: int = 12) -> list[str]:
    """Lines for the recorded calls, in order, whose tensors differ from the tuned eager run's by more than `limit`
    (relative L2) or whose layouts differ; the first `shown` of them."""
    lines = []
    for i, (a, b) in enumerate(zip(run, tuned, strict=False)):
        if a["call"] != b["call"]:
            lines.append(f"#{i} call order differs: {a['call']} vs {b['call']}")
            continue
        for name in [n for n in a if n != "call"]:
            if name not in b:
                lines.append(f"#{i} {a['call']} {name}: only in the compiled run")
                continue
            x, y = a[name], b[name]
            layout = {
                key: (x[key], y[key]) for key in ("shape", "stride", "offset", "aligned", "dtype") if x[key] != y[key]
            }
            err = rel(x["values"], y["values"]) if x["shape"] == y["shape"] else float("inf")
            bad = (~torch.isfinite(x["values"])).sum().item()
            if err > limit or layout or bad:
                where = (x["values"] - y["values"]).abs().flatten(1).amax(-1) if x["shape"] == y["shape"] else None
                worst = (
                    "" if where is None or where.dim() == 0 else f", worst at index {where.argmax().item()} of dim 0"
                )
                lines.append(
                    f"#{i} {a['call']} {name}: rel {err:.1e}, non-finite {bad}, layout {layout or 'same'}{worst}"
                )
    if len(run) != len(tuned):
        lines.append(f"{len(run)} calls recorded against {len(tuned)} eager")
    return lines[:shown]


def flex_check(args: argparse.Namespace, device: str) -> None:
    """The flex backend alone on the model's attention rows (bf16, H = 2 × 128), compiled against eager: relative
    error of o per batch row, with the block mask built in the compiled graph (as a compiled model builds it) and
    outside it."""
    _, _, modes = build(args, device)
    rows = modes == 0
    gen = torch.Generator().manual_seed(args.seed)
    cuda = device == "cuda"
    B, T, H, D = *rows.shape, 2, 128 if cuda else 32  # a CPU: float32 and small heads (inductor fails even so)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(device, dtype) for _ in range(3))

    def attend(q, k, v, rows):
        return flex._flex_backend(q, k, v, rows, None, D**-0.5)

    def attend_with(mask, q, k, v):
        padded = (x.transpose(1, 2) for x in (q, k, v))
        return flex._flex(*padded, mask, D**-0.5).transpose(1, 2)

    for name, inputs in (("rows", rows), ("rows, batch swapped", rows.flip(0)), ("row 1 alone", rows[1:])):
        torch._dynamo.reset()
        n = inputs.shape[0]
        eager = attend(q[:n], k[:n], v[:n], inputs)
        compiled = torch.compile(attend, fullgraph=True)(q[:n], k[:n], v[:n], inputs)
        errors = " ".join(f"{rel(compiled[b].double(), eager[b].double()):.1e}" for b in range(n))
        print(f"flex, mask in the graph, {name:20s}: o per batch row {errors}", flush=True)
    torch._dynamo.reset()
    mask = flex.block_mask(rows, None, B, H, T, T, rows.device)
    eager = attend(q, k, v, rows)
    outside = torch.compile(attend_with, fullgraph=True)(mask, q, k, v)
    outside = torch.where(rows[:, :, None, None], outside, 0)
    errors = " ".join(f"{rel(outside[b].double(), eager[b].double()):.1e}" for b in range(B))
    print(f"flex, mask built outside the graph: o per batch row {errors}", flush=True)


def compile_model(model: OryxForCausalLM, backend: str) -> None:
    """`compile_blocks()` with the given dynamo backend, under the taps (each tap wraps a compiled block)."""
    torch._dynamo.reset()
    model.__dict__.pop("lm_loss", None)  # a compiled lm_loss of an earlier round
    for tap in model.model.layers:
        tap.tapped.compile(fullgraph=True, backend=backend)
    model.lm_loss = torch.compile(model.lm_loss, fullgraph=True, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tg", choices=["tg", "tm", "tk"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--modes", default="mix", choices=["mix", "attn", "linear"])
    parser.add_argument("--reference", choices=["recurrence", "attention"], default=None)
    parser.add_argument("--backends", nargs="+", default=["inductor"], help="dynamo backends to compile with")
    parser.add_argument("--contiguous", action="store_true", help="give fla contiguous copies of its inputs")
    parser.add_argument("--trace", action="store_true", help="print where each compiled run departs from eager")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast")
    parser.add_argument("--flex", action="store_true", help="only check the flex backend, compiled against eager")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.flex:
        flex_check(args, device)
        return
    os.environ.setdefault(fla.HOPPER_BACKWARD_ENV, "1")  # every dtype on fla, as the GPU test runs it
    on_reference(args.reference)
    model, ids, modes = build(args, device)

    os.environ[dispatch.ENV_VAR] = "torch"
    loss64, grads64 = loss_and_grads(copy.deepcopy(model).double(), ids, modes, bf16=False)
    del os.environ[dispatch.ENV_VAR]

    log: list[Record] = []
    kernels = KernelLog(args.contiguous)
    model.model.layers = nn.ModuleList(BlockTap(block, i, log) for i, block in enumerate(model.model.layers))
    runs: dict[str, tuple[float, dict[str, torch.Tensor], list[Record]]] = {}

    def run(name: str) -> None:
        log.clear()
        kernels.calls.clear()
        loss, grads = loss_and_grads(model, ids, modes, args.bf16)
        runs[name] = (loss, grads, log + kernels.calls)  # blocks in forward order, then kernels (forward, backward)

    run("eager 1")
    run("eager 2")
    for backend in args.backends:
        compile_model(model, backend)
        run(f"compiled {backend}")
    print(f"{vars(args)} on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}", flush=True)
    print(f"float64 reference loss {loss64:.8f}")
    for name, (loss, grads, _) in runs.items():
        errors = group_errors(grads, grads64)
        print(f"{name:22s} loss {loss:.8f} | " + " ".join(f"{g}:{e:.0e}" for g, e in errors.items()), flush=True)
    if args.trace:
        tuned = runs["eager 2"][2]
        limit = 1e-2 if args.bf16 else 1e-3
        for name, (_, _, calls) in runs.items():
            if name != "eager 2":
                print(
                    f"--- {name} against eager 2, {len(calls)} records (relative L2 > {limit:.0e} or another layout):"
                )
                print("\n".join(first_departures(calls, tuned, limit)) or "    none")


if __name__ == "__main__":
    main()
