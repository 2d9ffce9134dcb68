"""The triton_rows attention kernels (oryx.ops.backends.triton_rows) on the CPU, through Triton's interpreter, against
the float64 torch reference: values, gradients, exact zero rows, the custom ops' registrations and a traced graph.

Skipped unless triton imports and ``TRITON_INTERPRET=1`` (CPU CI has no triton). Triton 3.6's interpreter needs
numpy < 2.4 (it converts 1-element arrays to ints). For example::

    pip install --target /tmp/tri triton==3.6.0 "numpy<2.4"
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/tri:src python -m pytest -q tests/test_triton_rows_interpret.py

The interpreter runs the kernels in numpy with each program's blocks as arrays: float32 dots are exact float32
products (no TF32), so float32 is held to the GPU suite's float32 tolerance; bfloat16 inputs are rounded as on the
card and held to its bfloat16 tolerance. tests/test_gpu.py checks the same kernels compiled, on a card.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import rel_err

from oryx import ops

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs triton and TRITON_INTERPRET=1",
    ),
    # The interpreter's int() of 1-element arrays (numpy 2.3 warns; 2.4 refuses, hence numpy < 2.4).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _bfloat16_dots(monkeypatch):
    """Triton 3.6's interpreter holds bfloat16 as its uint16 bit patterns and its dot multiplies those patterns as
    integers (it widens only fp8 operands): widen bfloat16 operands to float32 first, which is exact (the card's
    tensor cores multiply them exactly and accumulate in float32)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    dot = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)


def query_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "all":
        return None
    if kind == "none":
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "tokens":  # token-level switches: partly selected blocks
        return torch.rand(B, T, generator=gen) < 0.3
    chunks = torch.rand(B, -(-T // 128), generator=gen) < 0.4  # the training mix: whole 128-row chunks
    chunks[:, 0] = True
    return chunks.repeat_interleave(128, dim=1)[:, :T]


def padding(B: int, Tk: int) -> torch.Tensor:
    """Sequence 0 left-padded over half the keys: its first query rows may see no key at all."""
    km = torch.ones(B, Tk, dtype=torch.bool)
    km[0, : Tk // 2] = False
    return km


def rows(q, k, v, query_mask=None, key_mask=None):
    from oryx.ops.backends import triton_rows

    return triton_rows.rows_attention_backend(q, k, v, query_mask, key_mask, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("Tq", "Tk", "kind", "padded", "Dv"),
    [
        (256, 256, "tokens", False, 64),
        (256, 256, "chunks", False, 64),
        (300, 300, "all", True, 64),  # T not a multiple of 128, key padding
        (200, 457, "tokens", True, 64),  # a continuation (Tq < Tk) over a left-padded cache
        (129, 129, "none", False, 64),
        (5, 300, "tokens", True, 64),  # a few rows
        (1, 300, "all", False, 64),  # one decoding row
        (256, 256, "tokens", False, 32),  # Dv ≠ D
    ],
)
def test_values_gradients_and_exact_zero_rows(dtype, Tq, Tk, kind, padded, Dv):
    gen = torch.Generator().manual_seed(Tq + Tk + Dv)
    B, H, D = 2, 2, 64
    q, k = (torch.randn(B, T, H, D, generator=gen) for T in (Tq, Tk))
    v = torch.randn(B, Tk, H, Dv, generator=gen)
    qm = query_mask(kind, B, Tq, gen)
    km = padding(B, Tk) if padded else None
    fast = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
    ref = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]  # the same (rounded) values
    o = rows(*fast, qm, km)
    o_ref = ops.causal_attention(*ref, query_mask=qm, key_mask=km, backend="torch")
    assert o.dtype == dtype and o.shape == (B, Tq, H, Dv)
    tol = TOL[dtype]
    assert rel_err(o, o_ref) <= tol
    do = torch.randn(o.shape, generator=gen)
    (o.float() * do).sum().backward()
    if kind != "none":  # with no row selected the reference returns constant zeros, without a graph
        (o_ref * do.double()).sum().backward()
        for name, a, b in zip(["dq", "dk", "dv"], fast, ref, strict=True):
            assert rel_err(a.grad, b.grad) <= tol, name
    else:
        for x in fast:
            assert torch.equal(x.grad, torch.zeros_like(x.grad))
    if qm is not None:  # unselected rows: exact zeros in the output and the query gradient
        assert torch.equal(o[~qm], torch.zeros_like(o[~qm]))
        assert torch.equal(fast[0].grad[~qm], torch.zeros_like(fast[0].grad[~qm]))
    if km is not None:  # padding keys: exact zero key and value gradients
        assert torch.equal(fast[1].grad[~km], torch.zeros_like(fast[1].grad[~km]))
        assert torch.equal(fast[2].grad[~km], torch.zeros_like(fast[2].grad[~km]))


@pytest.mark.parametrize("choice", [0, 1, 2])
def test_every_block_shape_of_the_autotuner(choice, monkeypatch):
    """The interpreter runs one config per kernel; here each kernel runs each of its autotune block shapes in turn
    (``choice`` picks the shape, modulo the kernel's count), on a continuation with key padding and token rows."""
    import triton

    from oryx.ops.backends import triton_rows_kernels as kernels

    for kernel, tiles in (
        (kernels.fwd_kernel, kernels.FWD_TILES),
        (kernels.dkdv_kernel, kernels.DKDV_TILES),
        (kernels.dq_kernel, kernels.DQ_TILES),
    ):
        shapes = sorted({(m, n) for m, n, _, _ in tiles})
        m, n = shapes[choice % len(shapes)]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4)])
    gen = torch.Generator().manual_seed(choice)
    B, Tq, Tk, H, D = 2, 300, 430, 2, 64
    q = torch.randn(B, Tq, H, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, Tk, H, D, generator=gen, requires_grad=True) for _ in range(2))
    qm, km = query_mask("tokens", B, Tq, gen), padding(B, Tk)
    o = rows(q, k, v, qm, km)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref = ops.causal_attention(*ref, query_mask=qm, key_mask=km, backend="torch")
    do = torch.randn(o.shape, generator=gen)
    grads = torch.autograd.grad(o, (q, k, v), do)
    refs = torch.autograd.grad(o_ref, ref, do.double())
    assert rel_err(o, o_ref) <= TOL[torch.float32]
    for name, a, b in zip(["dq", "dk", "dv"], grads, refs, strict=True):
        assert rel_err(a, b) <= TOL[torch.float32], name


def test_lse_gradient_matches_float64():
    """The log-sum-exp output's own gradient (delta − dlse in the backward) against autograd through logsumexp."""
    from oryx.ops.backends import triton_rows

    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 200, 2, 32
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    active = triton_rows.active_blocks(None, B, T, q.device)
    o, lse = triton_rows.rows_attention(q, k, v, active, None, None, D**-0.5)
    w = torch.randn(lse.shape, generator=gen)
    grads = torch.autograd.grad((lse * w).sum() + o.sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = torch.einsum("bihd,bjhd->bhij", qd, kd) * D**-0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o_ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), vd)
    lse_ref = s.logsumexp(-1)
    assert rel_err(lse, lse_ref) <= 1e-5
    refs = torch.autograd.grad((lse_ref * w.double()).sum() + o_ref.sum(), (qd, kd, vd))
    for name, a, b in zip(["dq", "dk", "dv"], grads, refs, strict=True):
        assert rel_err(a, b) <= 1e-5, name


def test_custom_ops_pass_opcheck_on_strided_inputs():
    """opcheck (schema, fake shapes and strides, autograd registration, AOT dispatch) with q, k, v as views of one
    fused projection [B, T, 3, H, D], as a mixer hands them over."""
    from oryx.ops.backends import triton_rows

    gen = torch.Generator().manual_seed(2)
    B, T, H, D = 1, 160, 2, 32
    qkv = torch.randn(B, T, 3, H, D, generator=gen)
    q, k, v = (qkv[:, :, i].requires_grad_() for i in range(3))
    qm = torch.rand(B, T, generator=gen) < 0.5
    km = torch.ones(B, T, dtype=torch.bool)
    km[0, :20] = False
    active = triton_rows.active_blocks(qm, B, T, q.device)
    torch.library.opcheck(triton_rows.rows_attention, (q, k, v, active, qm, km, D**-0.5))
    o = rows(q, k, v, qm, km)
    o_ref = ops.causal_attention(*(x.detach().double() for x in (q, k, v)), query_mask=qm, key_mask=km, backend="torch")
    assert rel_err(o, o_ref) <= TOL[torch.float32]


def test_traced_graph_equals_eager():
    """fullgraph tracing through the custom ops (aot_eager: the fake implementations and the registered autograd, the
    kernels run by the interpreter) gives the eager values and gradients."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 256, 2, 64
    q, k, v = (torch.randn(B, T, H, D, generator=gen).requires_grad_() for _ in range(3))
    qm = query_mask("tokens", B, T, gen)
    do = torch.randn(B, T, H, D, generator=gen)

    def attend(q, k, v, qm):
        return rows(q, k, v, qm)

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        o = fn(q, k, v, qm)
        results.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for a, b in zip(results[1], results[0], strict=True):
        assert torch.equal(a, b)
