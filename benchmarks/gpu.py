"""GPU benchmarks of Oryx's fast paths, each printed beside anchors measured in the same run, with ratios.

    python benchmarks/gpu.py mixer    # mixer core, forward+backward and forward only (prefill), bf16
    python benchmarks/gpu.py decode   # one decoding step, batch 16, contexts 2k..128k
    python benchmarks/gpu.py generate # end-to-end generate tokens/s of the 130m presets, per mode
    python benchmarks/gpu.py train    # training steps of the 130m presets beside the compiled Transformer, fla's models
    python benchmarks/gpu.py train --models oryx-tg-130m --shapes 8x2048 1x32768 --loss-chunk-tokens 0 4096
                                      # peak memory and speed with the plain loss (0) and the chunked one (default)
    python benchmarks/gpu.py flex-options  # flex_attention's kernel options for the attention rows, beside SDPA
    python benchmarks/gpu.py rows     # the attention rows on triton_rows and flex, fwd and fwd+bwd, as × p·SDPA
    python benchmarks/gpu.py all --json out.json

Mixer core = what the Oryx mixer computes between its projections: the linear recurrence over all tokens, attention
over the attention-mode rows (every key before them), and the per-token select. H = 8 heads of 128, 65,536 tokens per
batch (B = 65536 / T), p ∈ {25%, 2.5%} of the 128-token chunks in attention (exactly that share of the batch's chunks,
placed at random). Anchors: SDPA causal attention over all rows, flex_attention restricted to the same query chunks,
and fla's chunked kernels called directly. Times are medians over CUDA-event-timed repeats after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oryx import ops
from oryx.cache import static_kv_buffer
from oryx.ops.backends import flex

H, D, TOKENS, CHUNK = 8, 128, 65536, 128
DEV = "cuda"
DT = torch.bfloat16


def median_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 15, inner: int = 1) -> float:
    """Median milliseconds of ``fn`` per call; ``inner`` calls per timed sample (amortises event overhead and shows
    host-side overhead when the GPU would idle between small launches)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / inner)
    return statistics.median(samples)


def chunk_rows(B: int, T: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """[B, T] bool: exactly round(p · all chunks) of the batch's 128-token chunks, at random, are attention rows."""
    n = B * T // CHUNK
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=gen)[: max(1, round(p * n))]] = True
    return chosen.view(B, T // CHUNK).repeat_interleave(CHUNK, dim=1).to(DEV)


@dataclass(frozen=True)
class MixerOp:
    """How the mixer benchmark drives one Oryx variant's recurrence: our op, fla's chunked kernel called directly
    (the anchor), the log-decay's shape (per head or per key channel) and whether it takes a write strength β."""

    name: str  # the recurrence, as printed
    ours: Callable
    fla: Callable[[], Callable]  # imported when timed, so a card without fla still runs the other benchmarks
    channel_decay: bool
    beta: bool


def _fla_gdn() -> Callable:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)


def _fla_ssd() -> Callable:
    from fla.ops.simple_gla import chunk_simple_gla

    return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)


def _fla_kda() -> Callable:
    from fla.ops.kda import chunk_kda

    return lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta, use_gate_in_kernel=False)


# One row per Oryx variant of the variant table (a test checks that none is missing).
MIXER_OPS: dict[str, MixerOp] = {
    "tg": MixerOp("GDN", ops.gated_delta_rule, _fla_gdn, channel_decay=False, beta=True),
    "tm": MixerOp("SSD/simple_gla", ops.scalar_decay_rule, _fla_ssd, channel_decay=False, beta=False),
    "tk": MixerOp("KDA", ops.kimi_delta_rule, _fla_kda, channel_decay=True, beta=True),
}


def linear_inputs(variant: str, B: int, T: int, gen: torch.Generator, grad: bool) -> list[torch.Tensor]:
    """q, k (L2-normed), v, log-decays g < 0 and, where the op takes one, β ∈ (0, 1), bf16 on the card."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEV)

    spec = MIXER_OPS[variant]
    q, k = (F.normalize(rnd(B, T, H, D), dim=-1).to(DT) for _ in range(2))
    g = (-F.softplus(rnd(B, T, H, *([D] if spec.channel_decay else []))) * 0.3).to(DT)
    tensors = [q, k, rnd(B, T, H, D).to(DT), g]
    if spec.beta:
        tensors.append(torch.rand(B, T, H, generator=gen).to(DEV, DT))
    return [t.requires_grad_(grad) for t in tensors]


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """One forward and backward with a fixed random output gradient (gradients returned, never accumulated)."""
    grad = torch.randn_like(forward())

    def step() -> None:
        torch.autograd.grad(forward(), inputs, grad)

    return step


def mixer_keys(rows: list[float]) -> list[str]:
    """Every key a mixer row can hold (a run cut short prints nan for the missing ones)."""
    keys = ["sdpa_fwd", "sdpa_fwdbwd"]
    for v in MIXER_OPS:
        keys += [f"{v}_lin_fwdbwd", f"{v}_fla_fwd", f"{v}_lin_fwd"]
        keys += [f"{v}_core{p:g}_{s}" for p in rows for s in ("fwd", "fwdbwd")]
    keys += [f"{a}{p:g}_{s}" for p in rows for a in ("attn", "flex") for s in ("fwd", "fwdbwd")]
    keys += [f"mask{p:g}_build" for p in rows]
    return keys


def bench_mixer(
    lengths: list[int],
    rows: list[float],
    variants: list[str],
    gen: torch.Generator,
    results: list[dict],
    save: Callable[[], None],
) -> None:
    """Appends one row per length to ``results`` and calls ``save`` after each (a run cut short keeps what it has)."""
    for T in lengths:
        results.append(mixer_point(T, rows, variants, gen))
        print_mixer_row(results[-1], rows, variants)
        save()
        torch.cuda.empty_cache()


def mixer_point(T: int, rows: list[float], variants: list[str], gen: torch.Generator) -> dict:
    """All mixer timings at one length, most important first, each printed as soon as measured (the tensors are
    freed when this returns)."""
    B = TOKENS // T
    qa, ka, va = (torch.randn(B, T, H, D, generator=gen).to(DEV, DT).requires_grad_() for _ in range(3))
    heads = [x.transpose(1, 2) for x in (qa, ka, va)]  # [B, H, T, D] views for SDPA / flex
    row = {"T": T, "B": B}

    def record(key: str, fn: Callable[[], object]) -> None:
        row[key] = median_ms(fn)
        print(f"    T={T} {key} {row[key]:.3f} ms", flush=True)

    def sdpa():
        return F.scaled_dot_product_attention(*heads, is_causal=True)

    record("sdpa_fwd", sdpa)
    record("sdpa_fwdbwd", fwd_bwd(sdpa, [qa, ka, va]))
    for p in rows:
        attn_rows = chunk_rows(B, T, p, gen)

        def attention(attn_rows=attn_rows):
            return ops.causal_attention(qa, ka, va, query_mask=attn_rows)

        for variant in variants:
            lin = linear_inputs(variant, B, T, gen, grad=True)
            op = MIXER_OPS[variant].ours
            if f"{variant}_lin_fwdbwd" not in row:
                record(f"{variant}_lin_fwdbwd", fwd_bwd(lambda op=op, lin=lin: op(*lin)[0], lin))

            def core(op=op, lin=lin, attention=attention, attn_rows=attn_rows):
                return torch.where(attn_rows[..., None, None], attention(), op(*lin)[0])

            record(f"{variant}_core{p:g}_fwdbwd", fwd_bwd(core, [qa, ka, va, *lin]))
            with torch.no_grad():
                if f"{variant}_fla_fwd" not in row:
                    fla = MIXER_OPS[variant].fla()
                    record(f"{variant}_fla_fwd", lambda fla=fla, lin=lin: fla(*lin))
                    record(f"{variant}_lin_fwd", lambda op=op, lin=lin: op(*lin))
                record(f"{variant}_core{p:g}_fwd", core)

        # Built once per forward and shared by every layer (oryx.ops.backends.flex._shared_block_mask), so the
        # repeated calls above reuse it; its cost is timed here on its own.
        record(
            f"mask{p:g}_build",
            lambda attn_rows=attn_rows: flex.block_mask(attn_rows, None, B, H, T, T, torch.device(DEV)),
        )
        mask = flex.block_mask(attn_rows, None, B, H, T, T, torch.device(DEV))

        def flex_only(mask=mask):
            return flex._flex(*heads, mask, heads[0].shape[-1] ** -0.5)

        record(f"attn{p:g}_fwdbwd", fwd_bwd(attention, [qa, ka, va]))
        record(f"flex{p:g}_fwdbwd", fwd_bwd(flex_only, [qa, ka, va]))
        with torch.no_grad():
            record(f"flex{p:g}_fwd", flex_only)
    return row


def print_mixer_row(r: dict, rows: list[float], variants: list[str]) -> None:
    r = {**dict.fromkeys(mixer_keys(rows), float("nan")), **r}
    T = r["T"]
    print(f"\n== mixer core, T={T}, B={r['B']}, H={H}, D={D}, bf16 (ms) ==")
    print(f"  SDPA causal           fwd {r['sdpa_fwd']:7.3f}   fwd+bwd {r['sdpa_fwdbwd']:7.3f}")
    for p in rows:
        print(
            f"  flex {p:>5.1%} chunks     fwd {r[f'flex{p:g}_fwd']:7.3f}   fwd+bwd {r[f'flex{p:g}_fwdbwd']:7.3f}"
            f"   | oryx causal_attention fwd+bwd {r[f'attn{p:g}_fwdbwd']:7.3f}"
            f"   | block mask build (once per forward) {r[f'mask{p:g}_build']:6.3f}"
        )
    for v in variants:
        name = MIXER_OPS[v].name
        print(
            f"  [{v}] fla chunk {name} fwd {r[f'{v}_fla_fwd']:7.3f} | oryx linear fwd {r[f'{v}_lin_fwd']:7.3f}"
            f"  fwd+bwd {r[f'{v}_lin_fwdbwd']:7.3f}"
        )
        lin, sdpa = r[f"{v}_lin_fwdbwd"], r["sdpa_fwdbwd"]
        for p in rows:
            core = r[f"{v}_core{p:g}_fwdbwd"]
            budget = 1.2 * (lin + p * sdpa)
            print(
                f"  [{v}] core {p:>5.1%} fwd+bwd {core:7.3f}  target ≤ 1.2·(lin + {p:g}·SDPA) = {budget:7.3f}"
                f"  ratio {core / (lin + p * sdpa):5.2f}  vs SDPA {core / sdpa:5.2f}×"
            )
        fla_fwd = r[f"{v}_fla_fwd"]
        for p in rows:
            core = r[f"{v}_core{p:g}_fwd"]
            anchor = fla_fwd + p * r["sdpa_fwd"]
            print(
                f"  [{v}] prefill {p:>5.1%} fwd {core:7.3f}  anchor fla fwd + {p:g}·SDPA fwd = {anchor:7.3f}"
                f"  ratio {core / anchor:5.2f} (target ≤ 1.3 at 2.5%)"
            )


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after a warm-up on a side stream; returns the replay."""
    fn()  # compile / tune outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_decode(contexts: list[int], gen: torch.Generator, batch: int = 16) -> list[dict]:
    """One token for ``batch`` sequences. Attention: SDPA over the KV cache (anchor) and our causal_attention. Linear:
    fla's fused recurrent step (anchor), our op eagerly and replayed from a CUDA graph, plus the KV append that a
    linear-mode token still owes the cache (into a preallocated cache, as OryxCache's geometrically grown buffers
    do, and by torch.cat for contrast)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    def rnd(*shape, dtype=DT):
        return torch.randn(*shape, generator=gen).to(DEV, dtype)

    q, k = (F.normalize(rnd(batch, 1, H, D), dim=-1) for _ in range(2))
    v, g, beta = rnd(batch, 1, H, D), (-F.softplus(rnd(batch, 1, H))), torch.rand(batch, 1, H, generator=gen).to(DEV)
    beta = beta.to(DT)
    state = rnd(batch, H, D, D, dtype=torch.float32)

    def fla_step():
        return fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=state, output_final_state=True)

    def oryx_step():
        return ops.gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)

    def ssd_step():
        return ops.scalar_decay_rule(q, k, v, g, initial_state=state, output_final_state=True)

    linear = {
        "fla_step": median_ms(fla_step, inner=50),
        "oryx_gdn_step": median_ms(oryx_step, inner=50),
        "oryx_gdn_step_graph": median_ms(graphed(oryx_step), inner=50),
        "oryx_ssd_step": median_ms(ssd_step, inner=50),
    }
    results = []
    for L in contexts:
        k_cache, v_cache = rnd(batch, L + 1, H, D), rnd(batch, L + 1, H, D)  # batch-major [B, T, H, D]
        # The layout OryxCache.make_static gives the buffers a CUDA-graph step writes into (position-major storage).
        k_static, v_static = static_kv_buffer(k_cache, L + 1, L + 1), static_kv_buffer(v_cache, L + 1, L + 1)
        qh = q.transpose(1, 2)
        kh, vh = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        row = {"context": L, **linear}
        row["sdpa_decode"] = median_ms(lambda qh=qh, kh=kh, vh=vh: F.scaled_dot_product_attention(qh, kh, vh), inner=20)
        row["oryx_attn_decode"] = median_ms(lambda kc=k_static, vc=v_static: ops.causal_attention(q, kc, vc), inner=20)

        def append_prealloc(kc=k_cache, vc=v_cache, L=L):
            kc[:, L : L + 1] = k
            vc[:, L : L + 1] = v

        def append_cat(kc=k_cache[:, :L], vc=v_cache[:, :L]):
            return torch.cat([kc, k], 1), torch.cat([vc, v], 1)

        index = torch.tensor([L], device=DEV)

        def linear_token(kc=k_static, vc=v_static, index=index):
            """What a linear-mode token costs a layer in oryx.decoding's graph: the step + the KV append."""
            oryx_step()
            kc.index_copy_(1, index, k)
            vc.index_copy_(1, index, v)

        row["append_prealloc"] = median_ms(append_prealloc, inner=20)
        row["append_cat"] = median_ms(append_cat, inner=5, repeats=7)
        row["oryx_linear_decode"] = median_ms(graphed(linear_token), inner=50)
        row["oryx_linear_decode_batch_major"] = median_ms(
            graphed(lambda kc=k_cache, vc=v_cache, index=index: linear_token(kc, vc, index)), inner=50
        )
        results.append(row)
        del k_cache, v_cache, k_static, v_static, kh, vh
        torch.cuda.empty_cache()
    print_decode(results)
    return results


def print_decode(results: list[dict]) -> None:
    print(f"\n== decode one token, batch 16, H={H}, D={D}, bf16 (ms) ==")
    first = results[0]
    print(
        f"  linear step (context-free): fla fused recurrent GDN {first['fla_step']:.4f} | oryx GDN eager "
        f"{first['oryx_gdn_step']:.4f}, CUDA graph {first['oryx_gdn_step_graph']:.4f} | oryx SSD eager "
        f"{first['oryx_ssd_step']:.4f}"
    )
    print(
        f"  {'context':>8} {'SDPA':>8} {'oryx attn':>10} {'KV append':>10} {'cat append':>11} {'oryx linear¹':>12}"
        f" {'batch-major²':>12}"
    )
    for r in results:
        print(
            f"  {r['context']:>8} {r['sdpa_decode']:8.4f} {r['oryx_attn_decode']:10.4f} {r['append_prealloc']:10.4f}"
            f" {r['append_cat']:11.4f} {r['oryx_linear_decode']:12.4f} {r['oryx_linear_decode_batch_major']:12.4f}"
        )
    last = results[-1]
    flat = last["oryx_linear_decode"] / first["oryx_linear_decode"]
    speedup = last["oryx_attn_decode"] / last["oryx_linear_decode"]
    print(
        f"  linear decode t({last['context']})/t({first['context']}) = {flat:.2f} (target ≤ 1.25); attention / linear "
        f"at {last['context']} = {speedup:.1f}× (target ≥ 10×)\n  ¹ the GDN step and the KV append at a device index, "
        "in one CUDA graph (as oryx.decoding replays a layer), into the static cache's position-major buffers; "
        "oryx attn reads the same buffers\n  ² the same with batch-major [B, T, H, D] buffers (the layout before)"
    )


def bench_generate(gen: torch.Generator, prompt: int = 512, new: int = 128) -> list[dict]:
    from oryx import OryxConfig, OryxForCausalLM

    results = []
    for variant in ("tg", "tm"):
        config = OryxConfig.from_preset(f"oryx-{variant}-130m")
        model = OryxForCausalLM(config).to(DEV, DT).eval()
        ids = torch.randint(0, config.vocab_size, (1, prompt), generator=gen).to(DEV)
        for schedule in ("linear", "attn", "tail:attn=64"):
            for graphs in (False, True):

                def run(model=model, ids=ids, schedule=schedule, graphs=graphs):
                    with torch.no_grad():
                        model.generate(
                            ids,
                            schedule=schedule,
                            cuda_graphs=graphs,
                            max_new_tokens=new,
                            min_new_tokens=new,
                            do_sample=False,
                        )

                run()
                torch.cuda.synchronize()
                start = time.perf_counter()
                run()  # prefill, 2 eager warm-up steps per kind of step, one capture, then replays (oryx.decoding)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                row = {"variant": variant, "schedule": schedule, "cuda_graphs": graphs, "prompt": prompt, "new": new}
                row["tok_s"] = new / seconds
                label = "cuda graphs" if graphs else "eager"
                print(f"  generate oryx-{variant}-130m schedule={schedule:<13} {label:<11} {row['tok_s']:8.1f} tok/s")
                results.append(row)
    return results


# --- flex kernel options --------------------------------------------------------------------------------------------
FLEX_OPTIONS = [None] + [
    {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    for m, n in ((128, 64), (64, 64), (128, 128), (64, 128))
    for w in (4, 8)
    for s in (2, 3)
]


def bench_flex_options(lengths: list[int], share: float, gen: torch.Generator) -> list[dict]:
    """`oryx.ops.causal_attention` (flex backend) over `share` of the 128-token chunks, forward and backward, for each
    of flex's kernel options (None: flex's own choice), against SDPA causal over every row scaled by `share`."""
    return [row for T in lengths for row in _flex_options_point(T, share, gen)]


def _flex_options_point(T: int, share: float, gen: torch.Generator) -> list[dict]:
    B = TOKENS // T
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEV, DT).requires_grad_() for _ in range(3))
    rows = chunk_rows(B, T, share, gen)
    heads = [x.transpose(1, 2) for x in (q, k, v)]
    sdpa = median_ms(fwd_bwd(lambda: F.scaled_dot_product_attention(*heads, is_causal=True), [q, k, v]))
    attend = fwd_bwd(lambda: ops.causal_attention(q, k, v, query_mask=rows, backend="flex"), [q, k, v])
    results = []
    for options in FLEX_OPTIONS:
        flex.KERNEL_OPTIONS = options
        try:
            ms = median_ms(attend)
        except Exception as err:  # an option set the card or Triton refuses: reported, not fatal
            print(f"  T={T} {options}: refused ({type(err).__name__}: {str(err)[:120]})", flush=True)
            continue
        finally:
            flex.KERNEL_OPTIONS = None
        results.append({"T": T, "share": share, "options": options, "ms": ms, "sdpa_ms": sdpa})
        print(f"  T={T} flex {options or 'default'}: {ms:.3f} ms fwd+bwd = {ms / (share * sdpa):.2f} x "
              f"{share:g} SDPA ({sdpa:.3f} ms)", flush=True)  # fmt: skip
    return results


# --- attention rows: triton_rows beside flex ------------------------------------------------------------------------
ROWS_BACKENDS = ["flex", "triton_rows"]


def bench_rows(lengths: list[int], shares: list[float], backends: list[str], gen: torch.Generator) -> list[dict]:
    """`oryx.ops.causal_attention` over each share p of the 128-token chunks on each of ``backends``,
    forward and forward+backward, as a ratio to p × SDPA causal over every row (issue 13's target: ≈ 1.2). The first
    call (flex compiles, triton_rows autotunes) is timed apart, as ``first_s``."""
    results = []
    for T in lengths:
        results += _rows_point(T, shares, backends, gen)
        torch.cuda.empty_cache()
    return results


def _rows_point(T: int, shares: list[float], backends: list[str], gen: torch.Generator) -> list[dict]:
    B = TOKENS // T
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEV, DT).requires_grad_() for _ in range(3))
    heads = [x.transpose(1, 2) for x in (q, k, v)]

    def sdpa():
        return F.scaled_dot_product_attention(*heads, is_causal=True)

    with torch.no_grad():
        anchor = {"fwd": median_ms(sdpa)}
    anchor["fwdbwd"] = median_ms(fwd_bwd(sdpa, [q, k, v]))
    print(f"  T={T} B={B} SDPA causal fwd {anchor['fwd']:.3f} ms  fwd+bwd {anchor['fwdbwd']:.3f} ms", flush=True)
    results = []
    for p in shares:
        rows = chunk_rows(B, T, p, gen)
        for backend in backends:

            def attend(backend=backend, rows=rows):
                return ops.causal_attention(q, k, v, query_mask=rows, backend=backend)

            start = time.perf_counter()
            step = fwd_bwd(attend, [q, k, v])  # its forward compiles / autotunes
            step()
            torch.cuda.synchronize()
            row = {"T": T, "B": B, "share": p, "backend": backend, "first_s": time.perf_counter() - start}
            with torch.no_grad():
                row["fwd_ms"] = median_ms(attend)
            row["fwdbwd_ms"] = median_ms(step)
            row |= {f"sdpa_{key}_ms": ms for key, ms in anchor.items()}
            results.append(row)
            print(
                f"  T={T} {p:>5.1%} chunks {backend:<11} fwd {row['fwd_ms']:7.3f} ms = "
                f"{row['fwd_ms'] / (p * anchor['fwd']):5.2f} × p·SDPA   fwd+bwd {row['fwdbwd_ms']:7.3f} ms = "
                f"{row['fwdbwd_ms'] / (p * anchor['fwdbwd']):5.2f} × p·SDPA   (first call {row['first_s']:.1f} s)",
                flush=True,
            )
    return results


# --- training throughput ---------------------------------------------------------------------------------------------
# A point is one model at one shape, measured in a fresh process (so its first step pays every compile and autotune
# that a new run pays, and its peak memory is its own): fla-gdn / fla-mamba2 are fla's own models at the shape of our
# gdn-130m / mamba2-130m (fla's Mamba2 runs its torch path without mamba_ssm, which the image lacks).
# With --concurrent-warmup N, N points of a shape start together (their compiles overlap, on the host's cores), wait
# until all N are warm, then take turns on the card for the timed steps (an exclusive lock), so no timed step shares
# the GPU with another process; their first steps shared the card and the cores (an upper bound on a lone one).
# fla-core refuses its gated backward on Hopper with Triton < 3.7.1 (fla#640), fla's own GDN model included: it is
# measured with the guard lifted as Oryx's backend lifts it (head dim 128, where the kernel computes right).
TRAIN_MIX = "chunks:size=128,p_attn=0.25"
TRAIN_MODELS = ["transformer-130m", "oryx-tg-130m", "oryx-tm-130m", "oryx-tk-130m", "gdn-130m", "fla-gdn",
                "mamba2-130m", "fla-mamba2"]  # fmt: skip


def _fla_model(name: str, vocab: int):
    from oryx import OryxConfig

    ours = OryxConfig.from_preset({"fla-gdn": "gdn-130m", "fla-mamba2": "mamba2-130m"}[name])
    if name == "fla-gdn":
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

        config = GatedDeltaNetConfig(
            hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers, num_heads=ours.gdn_num_heads,
            head_dim=ours.head_dim, expand_v=ours.gdn_head_dim_v / ours.head_dim, intermediate_size=1960,
            vocab_size=vocab, tie_word_embeddings=True,
        )  # fmt: skip
        return GatedDeltaNetForCausalLM(config)
    from fla.models import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers, state_size=ours.mamba_d_state,
        expand=ours.mamba_expand, head_dim=ours.mamba_head_dim, n_groups=1, vocab_size=vocab, tie_word_embeddings=True,
    )  # fmt: skip
    return Mamba2ForCausalLM(config)


def train_point(point: dict) -> dict:
    """One training configuration: first step (compile, autotune) and the median of the next steps; a step is what
    `oryx train` runs: forward and backward under bf16 autocast, fused AdamW, the loss read back."""
    from oryx import OryxConfig, OryxForCausalLM
    from oryx.schedule import parse

    torch.manual_seed(0)
    B, T, name, compile_mode = point["batch"], point["seq"], point["model"], point["compile"]
    start = time.perf_counter()
    if name.startswith("fla-"):
        model, is_oryx = _fla_model(name, 50257).to(DEV), False
    else:
        model = OryxForCausalLM(OryxConfig.from_preset(name, max_position_embeddings=max(2048, T))).to(DEV)
        is_oryx = model.config.is_oryx
    if point.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forward = model
    # "-cudagraphs": inductor replays each compiled graph from a CUDA graph (mode="reduce-overhead"), which removes
    # the host's launch cost of every kernel inside it, fla's Python launchers included.
    graphs = compile_mode.endswith("-cudagraphs")
    if compile_mode.startswith("blocks"):
        model.compile_blocks(cuda_graphs=graphs)
    elif compile_mode.startswith("model"):
        forward = torch.compile(model, mode="reduce-overhead" if graphs else "default")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    schedule = parse(TRAIN_MIX)

    loss_kwargs = {} if name.startswith("fla-") else {"loss_chunk_tokens": point["loss_chunk_tokens"]}

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead: their memory is reused
        ids = torch.randint(0, vocab, (B, T), generator=gen).to(DEV, non_blocking=True)
        kwargs = {"modes": schedule.modes(B, T, generator=gen).to(DEV, non_blocking=True)} if is_oryx else {}
        kwargs.update(loss_kwargs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids, labels=ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as the trainer does (it logs every step's loss): every family pays one sync per step

    guard = contextlib.nullcontext()
    if name == "fla-gdn":
        from oryx.ops.backends import fla as fla_backend

        guard = fla_backend._lift_hopper_guard()
    with guard:
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        with _timing_turn(point.get("turns")):
            for _ in range(2):
                step()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(step, warmup=0, repeats=point.get("repeats", 6))
            # With CUDA graphs the graphs' memory pool is allocated while recording (before the reset): the memory
            # the process holds on the card (reserved) is the figure to compare then.
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
            reserved_gb = torch.cuda.memory_reserved() / 2**30
            profile = {}
            if point.get("profile"):
                profile = _profile_steps(step, Path(point["profile"]) / f"{name}-{B}x{T}.txt")
    params = sum(p.numel() for p in model.parameters())
    return {**point, "first_step_s": first, "ms": ms, "tok_s": B * T / ms * 1e3, "params": params,
            "peak_gb": peak_gb, "reserved_gb": reserved_gb, **profile}  # fmt: skip


def _profile_steps(step: Callable[[], None], table: Path, steps: int = 3) -> dict:
    """Where a step's time goes: ``steps`` steps under torch.profiler, the kernels' table (by device time) written to
    ``table``; returned, per step: the device's busy time (the sum of kernel times; far below the step's wall time
    means the host, not the card, sets the pace) and the number of kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
    return {"device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "kernels_per_step": len(kernels) / steps}  # fmt: skip


@contextlib.contextmanager
def _timing_turn(turns: dict | None):
    """With concurrent warm-up: once every process of the wave is warm (the parent's "go" file), the card to this
    process alone while it times (an exclusive lock); the waiting ones have freed their cached blocks first, so that
    every timed process has the card's memory and no other kernel beside its own."""
    if turns is None:
        yield
        return
    import fcntl

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    Path(turns["ready"]).touch()
    while not Path(turns["go"]).exists():
        time.sleep(0.2)
    with open(turns["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def bench_train(
    models: list[str],
    shapes: list[str],
    loss_chunks: list[int],
    record: list[dict],
    save: Callable[[], None],
    concurrent: int = 1,
    profile: str | None = None,
    compile_modes: tuple[str, ...] = ("blocks-cudagraphs",),
) -> None:
    """Every model at every shape and loss chunk (`loss_chunk_tokens` of `oryx train`, 0 = the plain loss; fla's
    models compute their own loss), each in a fresh process; the compiled Transformer with the same loss is the
    anchor of each shape. ``concurrent`` > 1: that many processes warm up at once (a wave), then time one after
    another. ``profile``: a folder for each point's kernel table (after its timed steps, not in them).
    ``compile_modes``: how our models compile (each a point): "blocks" (`compile_blocks`), "model" (`torch.compile`
    of the whole model), either with "-cudagraphs"; the Transformer compiles whole (so "blocks" is "model" for it) and
    the fastest of its points is the anchor; fla's models run eagerly."""
    for shape in shapes:
        B, T = (int(x) for x in shape.split("x"))
        points = []
        for chunk, name in itertools.product(loss_chunks, models):
            modes = dict.fromkeys(_compile_mode(name, mode) for mode in compile_modes)
            points += [{"model": name, "batch": B, "seq": T, "compile": mode, "checkpointing": T >= 32768,
                        "loss_chunk_tokens": chunk, "profile": profile} for mode in modes]  # fmt: skip
        for first in range(0, len(points), concurrent):
            wave = [dict(point) for point in points[first : first + concurrent]]
            sync = Path(tempfile.mkdtemp(prefix="oryx-train-wave-")) if concurrent > 1 else None
            for i, point in enumerate(wave):
                if sync is not None:
                    point["turns"] = {"ready": str(sync / f"ready-{i}"), "go": str(sync / "go"),
                                      "lock": str(sync / "lock")}  # fmt: skip
            _drain([_start_point(i, point) for i, point in enumerate(wave)], record, save, sync)
        for chunk in loss_chunks:
            rows = [r for r in record if (r["seq"], r["batch"], r["loss_chunk_tokens"]) == (T, B, chunk)]
            anchors = [r for r in rows if r["model"].startswith("transformer")]
            if not anchors:
                continue
            anchor = max(anchors, key=lambda r: r["tok_s"])
            for row in rows:
                print(f"  {shape} loss chunk {chunk:<5} {row['model']:<18} {row['compile']:<18} "
                      f"{row['tok_s'] / anchor['tok_s']:.2f}x the compiled Transformer's tokens/s, "
                      f"{row['reserved_gb'] / anchor['reserved_gb']:.2f}x its reserved memory",
                      flush=True)  # fmt: skip


def _compile_mode(model: str, mode: str) -> str:
    """How ``model`` runs under the asked ``mode``: fla's models eagerly, the Transformer compiled whole."""
    if model.startswith("fla-"):
        return "off"
    return mode.replace("blocks", "model") if model.startswith("transformer") else mode


def _start_point(index: int, point: dict) -> tuple[dict, subprocess.Popen, Path]:
    logs = Path(tempfile.mkdtemp(prefix=f"oryx-train-{index}-"))
    argv = [sys.executable, __file__, "train-point", json.dumps(point)]
    with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
        return point, subprocess.Popen(argv, stdout=out, stderr=err, text=True), logs


def _drain(started: list[tuple[dict, subprocess.Popen, Path]], record: list[dict], save: Callable,
           sync: Path | None) -> None:  # fmt: skip
    """Wait for the started points, each printed and saved as it finishes (a stage cut short keeps what it measured);
    with ``sync``, say "go" once every one still running is warm."""
    while started:
        done = [entry for entry in started if entry[1].poll() is not None]
        if sync is not None and all(
            Path(p["turns"]["ready"]).exists() for p, proc, _ in started if proc.poll() is None
        ):
            (sync / "go").touch()
        time.sleep(0 if done else 0.5)
        for entry in done:
            started.remove(entry)
            _collect_point(*entry, record, save)


def _collect_point(point: dict, proc: subprocess.Popen, logs: Path, record: list[dict], save: Callable) -> None:
    shape = f"{point['batch']}x{point['seq']} loss chunk {point['loss_chunk_tokens']:<5}"
    lines = [line for line in (logs / "out").read_text().splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (logs / "err").read_text()[-600:]
        print(f"  train {point['model']} {shape}: failed (exit {proc.returncode}): {tail}", flush=True)
        return
    row = json.loads(lines[-1])
    record.append(row)
    print(f"  train {row['model']:<18} {shape:<8} compile={row['compile']:<6} first step {row['first_step_s']:6.1f} s  "
          f"{row['ms']:7.1f} ms/step {row['tok_s'] / 1e3:7.1f}k tok/s  peak {row['peak_gb']:5.1f} GB "
          f"reserved {row['reserved_gb']:5.1f} GB"
          + (f"  device busy {row['device_busy_ms']:.1f} ms, {row['kernels_per_step']:.0f} kernels per step"
             if "device_busy_ms" in row else ""), flush=True)  # fmt: skip
    save()


def environment() -> dict:
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = None
    # The device machine gets the working tree without .git: the command passes the commit in ORYX_COMMIT.
    commit = os.environ.get("ORYX_COMMIT")
    if commit is None:
        with contextlib.suppress(OSError):
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version,
        "date": time.strftime("%Y-%m-%d"),
        "commit": (commit or "").strip() or None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["mixer", "decode", "generate", "train", "flex-options", "rows", "all"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--rows", type=float, nargs="+", default=[0.25, 0.025], help="shares of chunks in attention")
    parser.add_argument(
        "--variants", nargs="+", default=["tg", "tm"], choices=list(MIXER_OPS), help="mixer variants (default tg tm)"
    )
    parser.add_argument("--backends", nargs="+", default=ROWS_BACKENDS, help="rows: causal_attention backends")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--models", nargs="+", default=TRAIN_MODELS, help="train: presets, fla-gdn, fla-mamba2")
    parser.add_argument("--shapes", nargs="+", default=["8x2048"], help="train: BATCHxLENGTH per step")
    parser.add_argument(
        "--loss-chunk-tokens", type=int, nargs="+", default=[4096], help="train: loss chunks (0 = the plain loss)"
    )
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    parser.add_argument("--concurrent-warmup", type=int, default=1, metavar="N",
                        help="train: N models warm up (compile) at once, then time one at a time")  # fmt: skip
    parser.add_argument("--compile-modes", nargs="+", default=["blocks-cudagraphs"],
                        choices=["blocks", "model", "blocks-cudagraphs", "model-cudagraphs"],
                        help="train: how our models compile, each mode a point (default: what oryx train runs on "
                             "one GPU)")  # fmt: skip
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="train: after the timed steps, profile 3 more; kernel tables to DIR")  # fmt: skip
    if len(sys.argv) > 2 and sys.argv[1] == "train-point":  # a child of `train`
        print(json.dumps(train_point(json.loads(sys.argv[2]))))
        return
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    out: dict = {"env": environment()}
    print(json.dumps(out["env"]))

    def save() -> None:  # atomic, after every section, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(out, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    if args.what in ("mixer", "all"):
        out["mixer"] = []
        bench_mixer(args.lengths, args.rows, args.variants, gen, out["mixer"], save)
    if args.what in ("decode", "all"):
        out["decode"] = bench_decode(args.contexts, gen)
        save()
    if args.what in ("generate", "all"):
        out["generate"] = bench_generate(gen)
        save()
    if args.what == "flex-options":
        out["flex_options"] = bench_flex_options(args.lengths, args.rows[0], gen)
        save()
    if args.what in ("rows", "all"):
        out["rows"] = bench_rows(args.lengths, args.rows, args.backends, gen)
        save()
    if args.what in ("train", "all"):
        out["train"] = []
        bench_train(
            args.models,
            args.shapes,
            args.loss_chunk_tokens,
            out["train"],
            save,
            args.concurrent_warmup,
            args.profile,
            tuple(args.compile_modes),
        )


if __name__ == "__main__":
    main()
