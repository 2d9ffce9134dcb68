"""The flex backend's block mask, shared by the layers of one forward (built on CPU here; the kernels need CUDA)."""

from __future__ import annotations

import torch

from oryx.ops.backends import flex


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
