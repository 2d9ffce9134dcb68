"""The fast backends' host-side decisions, checked on CPU (their kernels need CUDA: tests/test_gpu.py; flex_attention
also compiles for CPU, which lets its compile policy be checked here)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from oryx.ops.backends import fla, flex
from oryx.ops.backends._common import common_dtype


def _dense(mask) -> torch.Tensor:
    return mask.to_dense()


def test_block_mask_is_built_once_per_mask_tensor_and_rebuilt_when_it_changes(gen):
    B, T, cpu = 2, 5 * flex.BLOCK, torch.device("cpu")
    rows = torch.zeros(B, T, dtype=torch.bool)
    rows[:, flex.BLOCK :][torch.rand(B, T - flex.BLOCK, generator=gen) < 0.3] = True  # block 0: no attention row
    first = flex._shared_block_mask(rows, None, B, 2, T, T, cpu)
    assert flex._shared_block_mask(rows, None, B, 2, T, T, cpu) is first  # every layer of a forward: one build

    equal_copy = rows.clone()  # equal values, another tensor: built afresh, never matched by identity
    assert flex._shared_block_mask(equal_copy, None, B, 2, T, T, cpu) is not first

    rows[:, 7] = True  # an in-place change (block 0 becomes active) must not serve the stale mask
    changed = flex._shared_block_mask(rows, None, B, 2, T, T, cpu)
    assert torch.equal(_dense(changed), _dense(flex.block_mask(rows, None, B, 2, T, T, cpu)))
    assert not torch.equal(_dense(changed), _dense(first))

    keys = torch.rand(B, T, generator=gen) < 0.9
    with_keys = flex._shared_block_mask(rows, keys, B, 2, T, T, cpu)
    assert torch.equal(_dense(with_keys), _dense(flex.block_mask(rows, keys, B, 2, T, T, cpu)))


def test_flex_stays_compiled_when_the_process_has_spent_dynamo_recompile_budget(gen):
    """Past dynamo's recompile limit, flex_attention would run eagerly (every score materialised). The flex backend
    keeps its own budget: with the process-wide limit already spent (set to 1 here, with a hard failure instead of the
    silent eager fallback), a second dtype still compiles, and both results match the float64 reference."""
    from oryx import ops

    B, T, H, D = 2, 200, 2, 32
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    rows = torch.rand(B, T, generator=gen) < 0.4
    expected = ops.causal_attention(q.double(), k.double(), v.double(), query_mask=rows, backend="torch")
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            got = flex._flex_backend(q.to(dtype), k.to(dtype), v.to(dtype), rows, None, D**-0.5)
            assert got.dtype == dtype
            assert rel_err(got, expected) <= tol, (dtype, rel_err(got, expected))


def test_flex_pads_to_few_compiled_lengths_and_stays_exact(gen):
    """flex runs at bucketed lengths with the causal offset as data: calls whose lengths share a bucket reuse one
    compiled kernel, even with different offsets (cached continuations), and every result matches the float64
    reference, padded keys (left padding) and unselected rows included."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    from oryx import ops

    lengths = [flex.compiled_length(n) for n in (1, 128, 129, 300, 385, 2048, 2049)]
    assert lengths == [128, 128, 256, 384, 512, 2048, 3072]
    B, H, D = 2, 2, 32
    kernels = []
    for Tq, Tk, padded in ((200, 200, False), (240, 240, False), (150, 230, True), (250, 256, True)):
        q = torch.randn(B, Tq, H, D, generator=gen)
        k, v = (torch.randn(B, Tk, H, D, generator=gen) for _ in range(2))
        rows = torch.rand(B, Tq, generator=gen) < 0.4
        keys = torch.ones(B, Tk, dtype=torch.bool)
        keys[0, : Tk // 2] = False
        keys = keys if padded else None
        got = flex._flex_backend(q, k, v, rows, keys, D**-0.5)
        expected = ops.causal_attention(q.double(), k.double(), v.double(), rows, keys, backend="torch")
        assert rel_err(got, expected) <= 1e-5, (Tq, Tk, rel_err(got, expected))
        kernels.append(len(_debug_get_cache_entry_list(flex_attention.__code__)))
    # Every length here is in the 256 bucket: the second call of each mask function (without, then with key padding)
    # runs the kernel compiled for the first.
    assert kernels[1] == kernels[0] and kernels[3] == kernels[2], kernels


def test_fast_backends_get_one_dtype_for_mixed_precision_inputs():
    """Triton dots need equal operand types: mixed inputs meet at the autocast dtype in autocast, else the widest."""
    bf16, fp32 = torch.randn(2, dtype=torch.bfloat16), torch.randn(2)
    assert common_dtype(bf16, fp32, None) == torch.float32
    assert common_dtype(bf16, bf16) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common_dtype(fp32, bf16) == torch.bfloat16


@pytest.mark.parametrize(("choice", "bf16", "fp32"), [(None, True, False), ("1", True, True), ("0", False, False)])
def test_hopper_backward_policy_defaults_to_the_verified_dtype(monkeypatch, choice, bf16, fp32):
    """fla's guarded backward (Hopper, Triton < 3.7.1) by default only where it was verified on the card: bf16."""
    if choice is None:
        monkeypatch.delenv(fla.HOPPER_BACKWARD_ENV, raising=False)
    else:
        monkeypatch.setenv(fla.HOPPER_BACKWARD_ENV, choice)
    assert fla._hopper_backward_allowed(torch.bfloat16) is bf16
    assert fla._hopper_backward_allowed(torch.float32) is fp32
    assert fla._hopper_backward_allowed(torch.float16) is fp32


def test_hopper_backward_policy_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(fla.HOPPER_BACKWARD_ENV, "yes")
    with pytest.raises(ValueError, match="ORYX_FLA_HOPPER_BACKWARD='yes'; use 1"):
        fla._hopper_backward_allowed(torch.bfloat16)


# --- fla's kernels as custom ops: checked on CPU with the torch reference standing in for fla's kernels ------------
def _reference_kernels() -> dict:
    """The torch reference in fla's call convention (q, k, v, g, beta, scale, h0) -> (o, final state)."""
    from oryx import ops

    def chunked(op):
        def run(q, k, v, g, beta, scale, h0):
            extra = () if op == "scalar_decay_rule" else (beta,)
            fn = getattr(ops, op.replace("_rule", "_rule_chunked"))
            return fn(q, k, v, g, *extra, scale=scale, initial_state=h0, output_final_state=True, chunk_size=16)

        return run

    return {op: (chunked(op), chunked(op)) for op in fla.KERNELS}


def _linear_inputs(op: str, gen: torch.Generator, T: int = 40, initial: bool = True):
    B, H, K, V = 2, 2, 16, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, *([K] if op == "kimi_delta_rule" else []), generator=gen)
    beta = None if op == "scalar_decay_rule" else torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if initial else None
    return [x if x is None else x.requires_grad_() for x in (q, k, v, g, beta, h0)]


@pytest.mark.parametrize("op", list(fla.KERNELS))
def test_fla_custom_ops_have_consistent_fake_and_autograd_registrations(op, gen, monkeypatch):
    monkeypatch.setattr(fla, "KERNELS", _reference_kernels())
    q, k, v, g, beta, h0 = _linear_inputs(op, gen)
    torch.library.opcheck(fla.fla_chunk, (op, q, k, v, g, beta, h0, 0.25))
    inference = [None if x is None else x.detach() for x in (q, k, v, g, beta)]
    torch.library.opcheck(fla.fla_recurrent, (op, *inference, None, 0.25))


@pytest.mark.parametrize("op", list(fla.KERNELS))
@pytest.mark.parametrize(("compiled", "final_in_loss"), [(False, True), (False, False), (True, True)])
def test_fla_backend_values_and_gradients_match_the_reference_through_its_custom_ops(
    op, compiled, final_in_loss, gen, monkeypatch
):
    """The backend's whole path (dtype unification, the chunked custom op, its recomputing backward) against the
    reference op called directly, with and without the final state in the loss (its gradient then None); compiled
    with fullgraph=True, the custom ops are the only thing the compiler sees of fla."""
    from oryx import ops

    monkeypatch.setattr(fla, "KERNELS", _reference_kernels())
    monkeypatch.setattr(fla, "_guarded_backward", lambda device_index: False)
    inputs = _linear_inputs(op, gen)
    q, k, v, g, beta, h0 = inputs
    extra = () if beta is None else (beta,)
    backend = {"gated_delta_rule": fla._gated_delta_fla, "scalar_decay_rule": fla._scalar_decay_fla,
               "kimi_delta_rule": fla._kimi_delta_fla}[op]  # fmt: skip

    def run(q, k, v, g, *rest):
        *extra, h0 = rest
        o, final = backend(q, k, v, g, *extra, 0.25, h0, final_in_loss, 16)
        return (o * o).sum() + (final.sum() if final_in_loss else 0.0)

    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager_decomp_partition", fullgraph=True)
    loss = run(q, k, v, g, *extra, h0)
    present = [x for x in inputs if x is not None]
    got = torch.autograd.grad(loss, present)
    doubles = [x.detach().double().requires_grad_() for x in present]
    o, final = getattr(ops, op)(*doubles[:4], *doubles[4:-1], scale=0.25, initial_state=doubles[-1],
                                output_final_state=True, backend="torch")  # fmt: skip
    expected_loss = (o * o).sum() + (final.sum() if final_in_loss else 0.0)
    expected = torch.autograd.grad(expected_loss, doubles)
    assert rel_err(loss, expected_loss) < 1e-5
    names = [name for name, x in zip(["q", "k", "v", "g", "beta", "h0"], inputs, strict=True) if x is not None]
    for name, a, b in zip(names, got, expected, strict=True):
        assert rel_err(a, b) < 1e-5, name


def test_flex_backend_traces_into_one_graph(gen):
    """Inside a compiled model the flex backend (block mask, padding to compiled lengths, flex_attention) is traced,
    not called: no graph break (regression: `bisect` in compiled_length broke every layer's graph on the H200), and the
    traced result equals the eager one."""
    B, T, H, D = 2, 200, 2, 32
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    rows = torch.rand(B, T, generator=gen) < 0.4
    keys = torch.ones(B, T, dtype=torch.bool)
    keys[0, :50] = False

    def attend(q, k, v, rows, keys):
        return flex._flex_backend(q, k, v, rows, keys, D**-0.5)

    explained = torch._dynamo.explain(attend)(q, k, v, rows, keys)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    traced = torch.compile(attend, backend="aot_eager_decomp_partition", fullgraph=True)(q, k, v, rows, keys)
    assert rel_err(traced, attend(q, k, v, rows, keys)) < 1e-5
