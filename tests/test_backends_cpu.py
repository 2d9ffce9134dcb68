"""The fast backends' host-side decisions, checked on CPU (their kernels need CUDA: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

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
