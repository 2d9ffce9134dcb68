"""Helpers shared by the fast backends: call-time availability checks (never at import)."""

from __future__ import annotations

import functools
import importlib.util

import torch

FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_IMPORTABLE: dict[tuple[str, ...], bool] = {}


@torch.compiler.assume_constant_result
def importable(*modules: str) -> bool:
    """Whether every named module can be imported (looked up once per process, on the first call that asks). A
    constant to torch.compile, which runs it instead of tracing into importlib (a plain dict, not functools.cache:
    dynamo traces through a cache wrapper)."""
    if modules not in _IMPORTABLE:
        _IMPORTABLE[modules] = all(importlib.util.find_spec(name) is not None for name in modules)
    return _IMPORTABLE[modules]


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients through any of ``tensors`` from this call."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def common_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The one dtype a Triton kernel gets for mixed-precision inputs (its dots need equal operand types): the autocast
    dtype inside an autocast region (where our mixers hand over bf16 projections beside fp32 gate-scaled keys),
    otherwise the widest of the given dtypes."""
    present = [t for t in tensors if t is not None]
    if torch.is_autocast_enabled(present[0].device.type):
        return torch.get_autocast_dtype(present[0].device.type)
    return functools.reduce(torch.promote_types, (t.dtype for t in present))
