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
    first = flex._shared_block_mask(rows, None, B, T, T, cpu)
    assert flex._shared_block_mask(rows, None, B, T, T, cpu) is first  # every layer of a forward: one build

    equal_copy = rows.clone()  # equal values, another tensor: built afresh, never matched by identity
    assert flex._shared_block_mask(equal_copy, None, B, T, T, cpu) is not first

    rows[:, 7] = True  # an in-place change (block 0 becomes active) must not serve the stale mask
    changed = flex._shared_block_mask(rows, None, B, T, T, cpu)
    assert torch.equal(_dense(changed), _dense(flex.block_mask(rows, None, B, T, T, cpu)))
    assert not torch.equal(_dense(changed), _dense(first))

    keys = torch.rand(B, T, generator=gen) < 0.9
    with_keys = flex._shared_block_mask(rows, keys, B, T, T, cpu)
    assert torch.equal(_dense(with_keys), _dense(flex.block_mask(rows, keys, B, T, T, cpu)))


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
