"""The CUDA fast paths (oryx.ops.backends) against the pure-PyTorch reference, on the same inputs (docs/design.md §11,
§12).

Every check feeds one set of fresh random inputs to the fast backend and to the torch reference computed in float64 from
the same values (bf16 inputs upcast exactly), then compares outputs, final states and gradients by relative RMS error.
Skipped without CUDA; the fla checks also without fla-core. Run on a GPU machine with ``pytest -m gpu -s
tests/test_gpu.py`` (``-s`` prints every measured error; benchmarks/RESULTS.md records a run).

Tolerances, per path and dtype (H100, torch 2.11, Triton 3.6, fla-core 0.6.0; benchmarks/RESULTS.md has the run):
- flex / SDPA attention: float32 ≤ 1e-5 (measured ≤ 9e-7: IEEE float32), bfloat16 ≤ 1e-2 (measured ≤ 3.1e-3), values
  and gradients. Unselected rows must be exact zeros, output and query gradient (compared with ==). The triton_rows
  kernels are held to the same (float32 dots as IEEE float32; float16 to the bfloat16 tolerance).
- fla fused recurrent (decoding, short inference calls): float32 ≤ 1e-5 (measured ≤ 1.1e-7: no matrix units), bfloat16
  ≤ 1e-2 (measured ≤ 1.7e-3).
- fla chunked (training, prefill): float32 ≤ 5e-3, because Triton runs float32 dots as TF32 on Ampere and later;
  bfloat16 ≤ 2e-2 (dg/dβ sum many bf16 products). Measured on an H100 with fla's Hopper guard lifted: bfloat16 ≤ 8.9e-3,
  float32 ≤ 1.5e-3. Hopper + Triton < 3.7.1 still trains float32 on fla only with ORYX_FLA_HOPPER_BACKWARD=1 (these
  tests set it; see oryx/ops/backends/fla.py).
- KDA (kimi_delta_rule: chunk_kda, fused_recurrent_kda) is held to the same tolerances.
- Compiled models (torch.compile, inductor, on the fast backends) against the same model eager: float32 ≤ 1e-4,
  bfloat16 autocast ≤ 2e-2 (loss and every gradient); the eager fast path against the reference as above.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import tiny

import oryx
from oryx import ops
from oryx.ops import dispatch
from oryx.ops.backends import fla
from oryx.ops.backends.fla import HOPPER_BACKWARD_ENV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
LINEAR_TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
RECURRENT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
LINEAR_OPS = ["gated_delta_rule", "scalar_decay_rule", "kimi_delta_rule"]
ORYX_VARIANTS = oryx.variants.oryx_variants()
ALL_VARIANTS = list(oryx.variants.VARIANTS)


def needs_fla() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("fla")


def check(name: str, fast: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(fast, ref)
    line = f"  {name:<36} rel err {err:.2e}  (tol {tol:.0e})"
    print(line)
    if "ORYX_TEST_LOG" in os.environ:  # a log that survives a run cut short (the device machine's time limit)
        with open(os.environ["ORYX_TEST_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]} {line.strip()}\n")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def leaves(*tensors: torch.Tensor | None, dtype: torch.dtype) -> tuple[list, list]:
    """The same values twice: fast-path leaves in ``dtype`` on CUDA, and float64 reference leaves."""
    fast = [None if t is None else t.to(DEV, dtype).requires_grad_() for t in tensors]
    ref = [None if t is None else t.to(DEV, dtype).double().requires_grad_() for t in tensors]
    return fast, ref


def linear_inputs(op: str, B: int, T: int, H: int, K: int, gen: torch.Generator, state: bool):
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen)
    # Gates from near 1 to very small (log-decay down to about −8), as the design's extreme-gate checks ask; KDA has
    # one per key channel.
    g_shape = (B, T, H, K) if op == "kimi_delta_rule" else (B, T, H)
    g = -F.softplus(2 * torch.randn(g_shape, generator=gen)) * torch.rand(g_shape, generator=gen) * 3
    h0 = torch.randn(B, H, K, K, generator=gen) * 0.5 if state else None
    if op in ("gated_delta_rule", "kimi_delta_rule"):
        return [q, k, v, g, torch.rand(B, T, H, generator=gen)], h0
    return [q, k, v, g], h0


def run_linear(op: str, tensors, h0, backend: str):
    return getattr(ops, op)(*tensors, initial_state=h0, output_final_state=True, backend=backend)


# ------------------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------------------


def test_auto_picks_fast_backends_on_cuda_and_env_forces_torch(monkeypatch):
    x = torch.zeros(1, 4, 2, 128, device=DEV)
    assert dispatch.resolve("causal_attention", x).name == "flex"
    if dispatch._REGISTRY["gated_delta_rule"]["fla"].supports(x):
        assert dispatch.resolve("gated_delta_rule", x).name == "fla"
        assert dispatch.resolve("scalar_decay_rule", x).name == "fla"
        assert dispatch.resolve("kimi_delta_rule", x).name == "fla"
    assert dispatch.resolve("gated_delta_rule", x.cpu()).name == "torch"
    assert dispatch.resolve("kimi_delta_rule", x.cpu()).name == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    for op in ("gated_delta_rule", "scalar_decay_rule", "kimi_delta_rule", "causal_attention"):
        assert dispatch.resolve(op, x).name == "torch"


# ------------------------------------------------------------------------------------------------------------
# Linear recurrences (fla)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", LINEAR_OPS)
@pytest.mark.parametrize(("B", "T", "state"), [(2, 257, True), (3, 100, False)])
def test_linear_chunked_values_and_gradients(op, dtype, B, T, state, gen, monkeypatch):
    """Training path: fla's chunked kernels (on Hopper with Triton < 3.7.1: its backward with the guard lifted)."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    tensors, h0 = linear_inputs(op, B, T, 4, 128, gen, state)
    (fast, ref) = leaves(*tensors, h0, dtype=dtype)
    o, s = run_linear(op, fast[:-1], fast[-1], "fla")
    o_ref, s_ref = run_linear(op, ref[:-1], ref[-1], "torch")
    do = torch.randn(o.shape, generator=gen).to(DEV)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    ((o.float() * do).sum() + (s * ds).sum()).backward()
    ((o_ref * do.double()).sum() + (s_ref * ds.double()).sum()).backward()
    print(f"\n{op} {dtype} B={B} T={T} initial_state={state}")
    tol = LINEAR_TOL[dtype]
    check("o", o, o_ref, tol)
    check("final state", s, s_ref, tol)
    names = [*["dq", "dk", "dv", "dg", "dbeta"][: len(tensors)], "dh0"]
    for name, a, b in zip(names, fast, ref, strict=True):
        if a is not None:
            check(name, a.grad, b.grad, tol)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_the_first_fla_kernel_restores_the_shipped_autotune_choices(form, gen, monkeypatch):
    """Each fla custom op asks for the shipped choices of its card (autotune_choices) before its kernel runs."""
    needs_fla()
    asked = []
    monkeypatch.setattr(fla, "restore_shipped_choices", lambda device: asked.append(device))
    tensors, h0 = linear_inputs("gated_delta_rule", 1, 100 if form == "chunked" else 1, 2, 128, gen, True)
    (fast,) = leaves(*tensors, h0, dtype=torch.bfloat16)[:1]
    with torch.no_grad():
        run_linear("gated_delta_rule", fast[:-1], fast[-1], "fla")
    assert asked and all(d.type == "cuda" for d in asked)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", LINEAR_OPS)
@pytest.mark.parametrize("T", [1, 37])
def test_linear_inference_fused_recurrent(op, dtype, T, gen):
    """Decoding and short continuations without gradients: fla's fused recurrent kernels, from a given state."""
    needs_fla()
    tensors, h0 = linear_inputs(op, 16, T, 4, 128, gen, state=True)
    with torch.no_grad():
        o, s = run_linear(op, [t.to(DEV, dtype) for t in tensors], h0.to(DEV), "fla")
        o_ref, s_ref = run_linear(op, [t.to(DEV, dtype).double() for t in tensors], h0.to(DEV).double(), "torch")
    print(f"\n{op} {dtype} fused recurrent T={T}")
    check("o", o, o_ref, RECURRENT_TOL[dtype])
    check("final state", s, s_ref, RECURRENT_TOL[dtype])


@pytest.mark.parametrize("op", ["gated_delta_rule", "kimi_delta_rule"])
def test_linear_training_with_head_dim_64_stays_correct(op, gen):
    """Head dim 64 is the tile fla miscompiles on Hopper with Triton < 3.7.1: gradients must still be right (GDN trains
    on the torch reference there; KDA's backward has other kernels, with no guard, and runs on fla: this checks it)."""
    needs_fla()
    tensors, h0 = linear_inputs(op, 2, 130, 2, 64, gen, state=True)
    fast, ref = leaves(*tensors, h0, dtype=torch.float32)
    o, s = run_linear(op, fast[:-1], fast[-1], "fla")
    o_ref, s_ref = run_linear(op, ref[:-1], ref[-1], "torch")
    do = torch.randn(o.shape, generator=gen).to(DEV)
    ((o * do).sum() + s.sum()).backward()
    ((o_ref * do.double()).sum() + s_ref.sum()).backward()
    print(f"\n{op} float32 K=64 training")
    check("o", o, o_ref, LINEAR_TOL[torch.float32])
    check("final state", s, s_ref, LINEAR_TOL[torch.float32])
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], fast, ref, strict=True):
        check(name, a.grad, b.grad, LINEAR_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kimi_delta_chunked_with_extreme_channel_gates(dtype, gen):
    """chunk_kda with per-channel gates at both ends: about half the channels barely decay (g ≈ −1e-4), the others
    forget everything at every step (g ≈ −30) or until a time of their own and then stop; values and gradients."""
    needs_fla()
    B, T, H, K = 2, 200, 4, 128
    tensors, h0 = linear_inputs("kimi_delta_rule", B, T, H, K, gen, state=True)
    slow = -1e-4 * torch.rand(B, T, H, K, generator=gen)
    fast_decay = -30 - torch.rand(B, T, H, K, generator=gen)
    stop = torch.randint(0, T + 1, (B, 1, H, K), generator=gen)
    stopped = torch.arange(T)[None, :, None, None] >= stop
    kind = torch.randint(0, 3, (B, 1, H, K), generator=gen)  # 0: slow, 1: fast, 2: fast until `stop`, then slow
    tensors[3] = torch.where((kind == 0) | ((kind == 2) & stopped), slow, fast_decay)
    fast, ref = leaves(*tensors, h0, dtype=dtype)
    o, s = run_linear("kimi_delta_rule", fast[:-1], fast[-1], "fla")
    o_ref, s_ref = run_linear("kimi_delta_rule", ref[:-1], ref[-1], "torch")
    do = torch.randn(o.shape, generator=gen).to(DEV)
    ds = torch.randn(s.shape, generator=gen).to(DEV)
    ((o.float() * do).sum() + (s * ds).sum()).backward()
    ((o_ref * do.double()).sum() + (s_ref * ds.double()).sum()).backward()
    print(f"\nkimi_delta_rule {dtype} extreme per-channel gates")
    tol = LINEAR_TOL[dtype]
    check("o", o, o_ref, tol)
    check("final state", s, s_ref, tol)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], fast, ref, strict=True):
        check(name, a.grad, b.grad, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kimi_delta_prefill_then_decoding_steps(dtype, gen):
    """Inference as generation runs it: a prompt longer than SHORT through chunk_kda (no gradients), then one-token
    steps through fused_recurrent_kda from the carried float32 state; against one float64 reference call over it all."""
    needs_fla()
    from oryx.ops.backends.fla import SHORT

    B, T, steps, H, K = 4, SHORT + 36, 6, 4, 128
    tensors, h0 = linear_inputs("kimi_delta_rule", B, T + steps, H, K, gen, state=True)
    inputs = [t.to(DEV, dtype) for t in tensors]
    with torch.no_grad():
        o_prompt, state = run_linear("kimi_delta_rule", [t[:, :T] for t in inputs], h0.to(DEV), "fla")
        decoded = []
        for t in range(T, T + steps):
            o_t, state = run_linear("kimi_delta_rule", [x[:, t : t + 1] for x in inputs], state, "fla")
            decoded.append(o_t)
        o_ref, s_ref = run_linear("kimi_delta_rule", [t.double() for t in inputs], h0.to(DEV).double(), "torch")
    print(f"\nkimi_delta_rule {dtype} prefill T={T} + {steps} decoding steps")
    assert o_prompt.dtype == dtype and state.dtype == torch.float32
    tol = LINEAR_TOL[dtype]  # the steps start from the chunked prefill's state
    check("prompt o", o_prompt, o_ref[:, :T], tol)
    check("decoded o", torch.cat(decoded, dim=1), o_ref[:, T:], tol)
    check("final state", state, s_ref, tol)


# ------------------------------------------------------------------------------------------------------------
# Attention over selected rows (flex_attention / SDPA)
# ------------------------------------------------------------------------------------------------------------


def query_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "all":
        return None
    if kind == "none":
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "tokens":  # token-granular switches: partially selected blocks everywhere
        return torch.rand(B, T, generator=gen) < 0.3
    # the training mix: 128-token chunks in attention with probability 1/4 (at least one)
    chunks = torch.rand(B, -(-T // 128), generator=gen) < 0.25
    chunks[:, 0] = True
    return chunks.repeat_interleave(128, dim=1)[:, :T]


@pytest.mark.parametrize("backend", ["flex", "triton_rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("Tq", "Tk", "kind", "padded"),
    [
        (300, 300, "tokens", False),
        (300, 300, "chunks", False),
        (300, 300, "all", True),
        (200, 457, "tokens", True),  # cached continuation with left padding in the cache
        (129, 129, "none", False),
        (5, 300, "tokens", True),  # a few rows: SDPA with a dense mask
        (1, 300, "all", False),  # one decoding row: SDPA without a mask
    ],
)
def test_attention_values_gradients_and_exact_zero_rows(backend, dtype, Tq, Tk, kind, padded, gen):
    B, H, D = 2, 4, 128
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for T in (Tq, Tk, Tk))
    qm = query_mask(kind, B, Tq, gen)
    km = None
    if padded:
        km = torch.ones(B, Tk, dtype=torch.bool)
        km[0, : Tk // 2] = False  # row 0 is left-padded; its first query rows may see no key at all
    qm_d = None if qm is None else qm.to(DEV)
    km_d = None if km is None else km.to(DEV)
    fast, ref = leaves(q, k, v, dtype=dtype)
    o = ops.causal_attention(*fast, query_mask=qm_d, key_mask=km_d, backend=backend)
    o_ref = ops.causal_attention(*ref, query_mask=qm_d, key_mask=km_d, backend="torch")
    print(f"\nattention {backend} {dtype} Tq={Tq} Tk={Tk} rows={kind} padded={padded}")
    tol = ATTN_TOL[dtype]
    if kind != "none":  # with no row selected the reference returns constant zeros, without a graph
        do = torch.randn(o.shape, generator=gen).to(DEV)
        (o.float() * do).sum().backward()
        (o_ref * do.double()).sum().backward()
        check("o", o, o_ref, tol)
        for name, a, b in zip(["dq", "dk", "dv"], fast, ref, strict=True):
            check(name, a.grad, b.grad, tol)
    if qm is not None:
        # Unselected rows: exact zeros in the output and in the query gradient.
        assert torch.equal(o[~qm_d], torch.zeros_like(o[~qm_d]))
        if fast[0].grad is not None:
            assert torch.equal(fast[0].grad[~qm_d], torch.zeros_like(fast[0].grad[~qm_d]))


@pytest.mark.parametrize("backend", ["torch", "flex", "triton_rows"])
def test_attention_under_cuda_autocast_matches_float64(backend, gen):
    """Training runs under bf16 autocast, where CUDA runs SDPA in bf16: the per-block reference must still assemble
    its output (regression: a float32 buffer refused bf16 blocks) and match float64 within bf16 error."""
    B, T, H, D = 3, 300, 2, 64
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEV) for _ in range(3))
    qm = query_mask("tokens", B, T, gen).to(DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = ops.causal_attention(q, k, v, query_mask=qm, backend=backend)
    o_ref = ops.causal_attention(q.double(), k.double(), v.double(), query_mask=qm, backend="torch")
    check(f"o ({backend}, autocast bf16)", o, o_ref, ATTN_TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_triton_rows_long_rows_and_head_dims(dtype, D, gen):
    """triton_rows past its key tiles and query steps (T = 1000, several 128-row blocks, chunk and token selections in
    one batch, an all-unselected sequence): values and gradients ≈ float64, unselected rows exact zeros."""
    B, T, H = 3, 1000, 2
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    qm = torch.cat([query_mask("chunks", 1, T, gen), query_mask("tokens", 1, T, gen), query_mask("none", 1, T, gen)])
    qm_d = qm.to(DEV)
    fast, ref = leaves(q, k, v, dtype=dtype)
    o = ops.causal_attention(*fast, query_mask=qm_d, backend="triton_rows")
    o_ref = ops.causal_attention(*ref, query_mask=qm_d, backend="torch")
    do = torch.randn(o.shape, generator=gen).to(DEV)
    (o.float() * do).sum().backward()
    (o_ref * do.double()).sum().backward()
    print(f"\ntriton_rows {dtype} D={D} T={T}")
    tol = ATTN_TOL[torch.bfloat16 if dtype == torch.float16 else dtype]
    check("o", o, o_ref, tol)
    for name, a, b in zip(["dq", "dk", "dv"], fast, ref, strict=True):
        check(name, a.grad, b.grad, tol)
    assert torch.equal(o[~qm_d], torch.zeros_like(o[~qm_d]))
    assert torch.equal(fast[0].grad[~qm_d], torch.zeros_like(fast[0].grad[~qm_d]))


def test_triton_rows_compiled_equals_eager_and_passes_opcheck(gen):
    """The custom ops inside a fullgraph-compiled region (inductor) against eager, and torch.library.opcheck."""
    from oryx.ops.backends import triton_rows

    B, T, H, D = 2, 384, 2, 128
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3))
    rows = (torch.rand(B, T, generator=gen) < 0.5).to(DEV)
    do = torch.randn(B, T, H, D, generator=gen).to(DEV, torch.bfloat16)

    def attend(q, k, v):
        return ops.causal_attention(q, k, v, query_mask=rows, backend="triton_rows")

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True)):
        o = fn(q, k, v)
        results.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, a, b in zip(["o", "dq", "dk", "dv"], results[1], results[0], strict=True):
        check(f"{name} (compiled vs eager triton_rows)", a, b, ATTN_TOL[torch.bfloat16])
    keys = torch.ones(B, T, dtype=torch.bool, device=DEV)
    keys[0, :100] = False
    active = triton_rows.active_blocks(rows, B, T, q.device)
    torch.library.opcheck(triton_rows.rows_attention, (q, k, v, active, rows, keys, D**-0.5))


def _chunk_rows(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] attention rows as the training mix draws them: random 128-token chunks, a few token-level switches."""
    from oryx.schedule import parse

    modes = parse("chunks:size=128,p_attn=0.5").modes(B, T, generator=gen)
    flips = torch.randint(0, T - 3, (B,), generator=gen)
    for b in range(B):
        modes[b, flips[b] : flips[b] + 3] = 1 - modes[b, flips[b] : flips[b] + 3]
    return (modes == 0).to(DEV)


def test_block_mask_gives_work_only_to_selected_query_blocks():
    """Attention work follows the attention rows: a query block without a selected row gets no key block."""
    from oryx.ops.backends.flex import BLOCK, block_mask

    B, T = 2, 16 * BLOCK
    chunks = torch.zeros(B, T // BLOCK, dtype=torch.bool, device=DEV)
    chunks[0, [3, 9]] = True
    chunks[1, 15] = True
    mask = block_mask(chunks.repeat_interleave(BLOCK, dim=1), None, B, 2, T, T, torch.device(DEV))
    counts = mask.kv_num_blocks + mask.full_kv_num_blocks  # [B, H, Nq]: the same lists for each head
    assert torch.equal(counts[:, 0], counts[:, 1])
    blocks = counts[:, 1]
    expected = torch.zeros(B, T // BLOCK, dtype=blocks.dtype, device=DEV)
    expected[0, 3], expected[0, 9], expected[1, 15] = 4, 10, 16  # causal: block i sees key blocks 0..i
    assert torch.equal(blocks, expected)
    assert int(mask.kv_num_blocks[:, 0].sum()) == 3  # only the diagonal blocks evaluate the mask function


# ------------------------------------------------------------------------------------------------------------
# The Oryx mixer and model on the fast paths
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_model_forward_backward_and_cached_decoding_match_reference(variant, gen, monkeypatch):
    """A small Oryx model (fp32) with the training mix: loss gradients on the fast paths ≈ reference; cached decoding
    token by token with switches ≈ the full forward (fused recurrent steps + SDPA rows)."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    from oryx import OryxConfig, OryxForCausalLM
    from oryx.cache import OryxCache
    from oryx.schedule import parse

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    config = OryxConfig(variant=variant, vocab_size=512, hidden_size=256, num_hidden_layers=2)
    model = OryxForCausalLM(config).to(DEV)
    B, T = 2, 300
    ids = torch.randint(0, 512, (B, T), generator=gen).to(DEV)
    modes = parse("chunks:size=128,p_attn=0.5").modes(B, T, generator=gen).to(DEV)
    modes[:, 200:203] = 0  # a 3-token attention span inside a linear chunk
    modes[:, 250] = 1 - modes[:, 250]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, modes=modes, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_fast, grads_fast = loss_and_grads()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    loss_ref, grads_ref = loss_and_grads()
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    print(f"\nmodel {variant} fp32 T={T} training mix")
    check("loss", loss_fast, loss_ref, 1e-3)
    flat_fast = torch.cat([g.flatten() for g in grads_fast.values()])
    flat_ref = torch.cat([grads_ref[n].flatten() for n in grads_fast])
    check("all parameter gradients", flat_fast, flat_ref, LINEAR_TOL[torch.float32])

    with torch.no_grad():
        full = model(ids[:, :160], modes=modes[:, :160]).logits
        cache = OryxCache(config)
        pieces = [model(ids[:, :100], modes=modes[:, :100], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], modes=modes[:, t : t + 1], cache=cache).logits for t in range(100, 160)]
    check("cached decoding vs full forward", torch.cat(pieces, 1), full, 1e-3)


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_model_trains_under_bf16_autocast_on_fast_backends(variant, gen, monkeypatch):
    """Training as `oryx train` runs it (bf16 autocast): the mixers hand fla bf16 projections beside fp32 gate-scaled
    keys (regression: Triton refused the mixed dot); loss and gradients match the torch reference within bf16 error."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    from oryx import OryxConfig, OryxForCausalLM
    from oryx.schedule import parse

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = OryxForCausalLM(OryxConfig(variant=variant, vocab_size=512, hidden_size=256, num_hidden_layers=2)).to(DEV)
    B, T = 2, 384
    ids = torch.randint(0, 512, (B, T), generator=gen).to(DEV)
    modes = parse("chunks:size=128,p_attn=0.25").modes(B, T, generator=gen).to(DEV)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, modes=modes, labels=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss_fast, grads_fast = loss_and_grads()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    loss_ref, grads_ref = loss_and_grads()
    print(f"\nmodel {variant} bf16 autocast T={T} training mix")
    check("loss", loss_fast, loss_ref, 1e-2)
    check("all parameter gradients", grads_fast, grads_ref, LINEAR_TOL[torch.bfloat16])


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_cuda_graph_decoding_matches_the_growing_cache(variant, gen):
    """generate(cuda_graphs=True)'s steps (oryx.decoding), replayed from CUDA graphs once warm, equal the ordinary
    cache token by token, through mode switches and steps whose rows are in different modes."""
    needs_fla()
    from oryx import OryxConfig, OryxForCausalLM
    from oryx.cache import OryxCache
    from oryx.decoding import StaticDecoder

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = OryxForCausalLM(OryxConfig(variant=variant, vocab_size=512, hidden_size=256, num_hidden_layers=2))
    model = model.to(DEV).eval()
    B, prompt, steps = 3, 100, 30
    ids = torch.randint(0, 512, (B, prompt + steps), generator=gen).to(DEV)
    reference, static = OryxCache(model.config), OryxCache(model.config)
    with torch.no_grad():
        for cache in (reference, static):
            model(ids[:, :prompt], cache=cache)
        decoder = StaticDecoder(model, capacity=prompt + steps, cache=static)
        assert decoder.use_graphs
        worst = 0.0
        for t in range(steps):
            modes = torch.full((B, 1), 0 if (t // 10) % 2 else 1)
            if t >= 20:
                modes[0] = 1 - modes[0]
            token = ids[:, prompt + t : prompt + t + 1]
            expected = model(token, modes=modes.to(DEV), cache=reference).logits
            worst = max(worst, rel_err(decoder.step(token, modes), expected))
    print(f"\ncuda-graph decoding {variant}: {len(decoder._graphs)} graphs, worst step logits rel err {worst:.2e}")
    assert len(decoder._graphs) == 3  # all-linear, all-attention and mixed steps were each captured and replayed
    assert worst <= 1e-4, f"worst step logits rel err {worst:.2e}"


# ------------------------------------------------------------------------------------------------------------
# torch.compile on the fast backends
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_fla_custom_ops_fake_implementations_match_the_kernels(op, gen):
    """opcheck runs each custom op on fla's real kernels and against its fake implementation, autograd included."""
    needs_fla()
    tensors, h0 = linear_inputs(op, 2, 130, 2, 128, gen, state=True)
    q, k, v, g, *beta = (t.to(DEV).requires_grad_() for t in tensors)
    args = (op, q, k, v, g, beta[0] if beta else None, h0.to(DEV).requires_grad_(), 128**-0.5)
    torch.library.opcheck(fla.fla_chunk, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(fla.fla_recurrent, detached)


def _small_model_inputs(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [2, 384] and training-mix modes of _small_model's shape, drawn anew."""
    from oryx.schedule import parse

    ids = torch.randint(0, 512, (2, 384), generator=gen).to(DEV)
    return ids, parse("chunks:size=128,p_attn=0.5").modes(2, 384, generator=gen).to(DEV)


def _small_model(variant: str, gen: torch.Generator):
    from oryx import OryxConfig, OryxForCausalLM
    from oryx.schedule import parse

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = OryxForCausalLM(OryxConfig(variant=variant, vocab_size=512, hidden_size=256, num_hidden_layers=2)).to(DEV)
    B, T = 2, 384
    ids = torch.randint(0, 512, (B, T), generator=gen).to(DEV)
    modes = None
    if model.config.is_oryx:
        modes = parse("chunks:size=128,p_attn=0.5").modes(B, T, generator=gen)
        modes[:, 200:203] = 1 - modes[:, 200:203]  # token-level switches inside a chunk
        modes = modes.to(DEV)
    return model, ids, modes


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_training_forward_has_no_graph_break_on_the_fast_backends(variant, gen, monkeypatch):
    """The whole model, on fla's custom ops and flex: one graph (the CPU suite checks the reference ops)."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    model, ids, modes = _small_model(variant, gen)

    def loss(ids, modes):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(ids, modes=modes, labels=ids).loss

    explained = torch._dynamo.explain(loss)(ids, modes)
    print(f"\n{variant}: {explained.graph_break_count} graph breaks, {explained.graph_count} graphs")
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    code = explained.graphs[0].code
    if model.config.variant != "transformer":
        assert "fla_chunk" in code  # the recurrence ran on fla, as a custom op the compiler sees
    if model.config.is_oryx:
        assert "flex_attention" in code


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_training_forward_has_no_graph_break_on_the_reference_ops_on_cuda(variant, gen, monkeypatch):
    """ORYX_BACKEND=torch on a GPU (a user checking the fast paths) compiles whole too: nothing in the reference
    attention asks the host a question dynamo cannot trace (CUDA-graph capture state)."""
    monkeypatch.setenv("ORYX_BACKEND", "torch")
    model, ids, modes = _small_model(variant, gen)

    def loss(ids, modes):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(ids, modes=modes, labels=ids).loss

    explained = torch._dynamo.explain(loss)(ids, modes)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_model_equals_eager_on_the_fast_backends(variant, precision, gen, monkeypatch):
    """compile_blocks (inductor, what `oryx train` runs on a GPU) against the same model eager on the same backends,
    with token-level switches: the loss and every gradient. In float32 at the fast paths' tolerance (fla's chunked
    kernels run TF32, and compiled code sums in another order). Under bf16 autocast, compiled and eager round
    differently, so both are also measured against the float32 eager model: the compiled gradients may not be
    further from it than the eager ones (by 25 %, plus 1e-3). The five worst parameters are printed."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    model, ids, modes = _small_model(variant, gen)

    def loss_and_grads(bf16: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, modes=modes, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), torch.cat([g.flatten() for g in grads.values()]), grads

    bf16 = precision == "bf16"
    _, reference, _ = loss_and_grads(bf16=False)
    loss_eager, flat_eager, grads_eager = loss_and_grads(bf16)
    torch._dynamo.reset()
    model.compile_blocks()
    loss_compiled, flat_compiled, grads_compiled = loss_and_grads(bf16)
    tol = LINEAR_TOL[torch.bfloat16 if bf16 else torch.float32]
    worst = sorted(((rel_err(grads_compiled[n], g), n) for n, g in grads_eager.items()), reverse=True)[:5]
    print(f"\ncompiled {variant} {precision}; worst parameters: " + ", ".join(f"{n} {e:.1e}" for e, n in worst))
    check("loss (compiled vs eager)", loss_compiled, loss_eager, tol)
    check("all parameter gradients (compiled vs eager)", flat_compiled, flat_eager, tol)
    if bf16:
        eager_error = rel_err(flat_eager, reference)
        check("gradients (compiled vs float32 eager)", flat_compiled, reference, 1.25 * eager_error + 1e-3)


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_training_steps_equal_the_compiled_steps(variant, precision, gen, monkeypatch):
    """compile_blocks(cuda_graphs=True) (what `oryx train` runs on one GPU) against compile_blocks(): four SGD steps,
    each on new tokens and new modes, give the same losses and the same weight updates (lr x the summed gradients).
    The first step warms up, the second records, the later ones replay: a replay that read stale inputs (the modes,
    the block lists) or handed out overwritten gradients would part from the graph-free run by far more than the
    tolerances. The two compiles are separate, so they may round differently (Mamba-2's bf16 updates differed by
    about 1.5 % in one card run while Gated DeltaNet's and KDA's were bitwise equal): the updates are held to the
    suite's gradient tolerance of the precision, the losses to 1e-4. Plain SGD, whose update is the gradient:
    AdamW's first steps move every weight by ±lr whatever its gradient's size, which turns a rounding difference in
    a near-zero gradient into a full-size weight difference."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    compiled, _, _ = _small_model(variant, gen)
    replayed = copy.deepcopy(compiled)
    batches = [_small_model_inputs(gen) for _ in range(4)]
    torch._dynamo.reset()
    compiled.compile_blocks()
    replayed.compile_blocks(cuda_graphs=True)

    def train(model, graphs: bool) -> torch.Tensor:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for ids, modes in batches:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(ids, modes=modes, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return torch.tensor(losses)

    def flat(model) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    initial = flat(compiled)
    losses, losses_replayed = train(compiled, False), train(replayed, True)
    print(f"\n{variant} {precision} losses {losses.tolist()} / replayed {losses_replayed.tolist()}")
    check("losses (CUDA graphs vs compiled)", losses_replayed, losses, 1e-4)
    update, update_replayed = flat(compiled) - initial, flat(replayed) - initial
    tol = LINEAR_TOL[torch.float32 if precision == "fp32" else torch.bfloat16]
    assert update.norm() > 1e-2 * initial.norm(), "the steps must move the weights, or a stale replay would not show"
    check("weight updates of 4 steps (CUDA graphs vs compiled)", update_replayed, update, tol)


def test_oryx_train_on_one_gpu_replays_cuda_graphs_with_the_same_losses(corpus, tmp_path, monkeypatch):
    """`oryx train` on CUDA (compiled, CUDA graphs unset = on) against `--no-cuda-graphs`: the same losses step by
    step and the same validation perplexities, through evaluations and checkpoints between the steps."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    from oryx.training import train
    from oryx.training.metrics import read_metrics

    runs = {}
    for graphs in (None, False):
        torch._dynamo.reset()
        out = tmp_path / f"graphs-{graphs}"
        train(tiny(corpus, out, device="cuda", hidden_size=256, head_dim=128, grad_accum=1, steps=8, eval_every=4,
                   save_every=4, cuda_graphs=graphs))  # fmt: skip
        runs[graphs] = read_metrics(out)
    firsts = {graphs: next(r for r in records if r["kind"] == "first_step") for graphs, records in runs.items()}
    assert (firsts[None]["cuda_graphs"], firsts[False]["cuda_graphs"]) == (True, False)
    losses = {g: torch.tensor([r["loss"] for r in records if r["kind"] == "train"]) for g, records in runs.items()}
    assert len(losses[None]) == 8
    check("training losses (CUDA graphs vs not)", losses[None], losses[False], 1e-4)
    ppl = {g: torch.tensor([r["val_ppl_attn"] for r in records if "val_ppl_attn" in r]) for g, records in runs.items()}
    check("validation perplexity (CUDA graphs vs not)", ppl[None], ppl[False], 1e-4)


@pytest.mark.parametrize("selection", ["tokens", "chunks"])
def test_flex_backend_compiled_equals_eager_forward_and_backward(selection, gen):
    """The attention branch alone inside a compiled region (block mask built in the graph, flex's backward by
    inductor) against the eager flex backend, for random token rows (every query block active) and for the training
    mix's chunks (sequences with different block lists). Regression: with the lists' head dimension of 1, inductor
    gave it stride 0 and flex's kernel read the first sequence's lists for every sequence (o off by 0.2-0.97)."""
    from oryx.ops.backends import flex

    B, T, H, D = 2, 384, 2, 128
    q, k, v = (torch.randn(B, T, H, D, generator=gen).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3))
    rows = (torch.rand(B, T, generator=gen) < 0.5).to(DEV) if selection == "tokens" else _chunk_rows(B, T, gen)
    do = torch.randn(B, T, H, D, generator=gen).to(DEV, torch.bfloat16)

    def attend(q, k, v):
        return flex._flex_backend(q, k, v, rows, None, D**-0.5)

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True)):
        o = fn(q, k, v)
        results.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, a, b in zip(["o", "dq", "dk", "dv"], results[1], results[0], strict=True):
        check(f"{name} (compiled vs eager flex)", a, b, ATTN_TOL[torch.bfloat16])


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_fla_custom_op_compiled_equals_eager_forward_and_backward(op, gen, monkeypatch):
    """The recurrence alone inside a compiled region (oryx::fla_chunk and its recomputing backward under inductor,
    bf16 inputs beside a float32 gate as the mixers pass them) against the same op eager."""
    needs_fla()
    monkeypatch.setenv(HOPPER_BACKWARD_ENV, "1")
    tensors, h0 = linear_inputs(op, 2, 384, 2, 128, gen, state=True)
    inputs = [t.to(DEV, torch.float32 if i == 3 else torch.bfloat16).requires_grad_() for i, t in enumerate(tensors)]
    h0 = h0.to(DEV).requires_grad_()

    def run(*xs):
        o, final = getattr(ops, op)(*xs[:-1], initial_state=xs[-1], output_final_state=True)
        return (o.float() * o.float()).sum() + final.sum()

    grads = []
    for fn in (run, torch.compile(run, fullgraph=True)):
        grads.append(torch.autograd.grad(fn(*inputs, h0), [*inputs, h0]))
    names = [*["dq", "dk", "dv", "dg", "dbeta"][: len(inputs)], "dh0"]
    for name, a, b in zip(names, grads[1], grads[0], strict=True):
        check(f"{name} (compiled vs eager {op})", a, b, LINEAR_TOL[torch.bfloat16])
