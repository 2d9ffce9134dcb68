"""Per-call backend selection for the token-mixing ops.

Every public op (``gated_delta_rule``, ``scalar_decay_rule``, ``causal_attention``, ...) has a pure-PyTorch
implementation registered under the name ``"torch"``; it runs on every device and is the reference.
Fast implementations (Triton kernels, flex_attention, ...) register themselves under other names with a
``supports(tensor)`` predicate that looks at the tensor's device and at what is importable *at call time*.
Nothing is decided at import: installing an optional package on a CPU machine changes nothing.

Choice, in order:
1. an explicit ``backend=`` argument other than ``"auto"`` (an unknown or unusable name is an error);
2. the environment variable ``ORYX_BACKEND`` (e.g. ``ORYX_BACKEND=torch`` forces the reference everywhere);
   a name that an op does not have leaves that op on automatic choice;
3. the highest-priority registered backend whose ``supports`` accepts the inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "ORYX_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[[torch.Tensor], bool]
    priority: int


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(
    op: str,
    name: str,
    fn: Callable,
    supports: Callable[[torch.Tensor], bool] = lambda x: True,
    priority: int = 0,
) -> None:
    """Register ``fn`` as backend ``name`` of ``op``; ``supports(x)`` is asked on every automatic call."""
    _REGISTRY.setdefault(op, {})[name] = Backend(name, fn, supports, priority)


def available(op: str) -> list[str]:
    """Names of the backends registered for ``op``, best first."""
    backends = sorted(_REGISTRY.get(op, {}).values(), key=lambda b: -b.priority)
    return [b.name for b in backends]


def resolve(op: str, x: torch.Tensor, backend: str = "auto") -> Backend:
    """The backend that runs ``op`` on inputs like ``x`` (see the module docstring for the order)."""
    table = _REGISTRY.get(op)
    if not table:
        raise KeyError(f"no backend is registered for op {op!r}")
    if backend != "auto":
        if backend not in table:
            raise ValueError(f"backend {backend!r} is not available for {op}; choose one of {available(op)} or 'auto'")
        chosen = table[backend]
        if not chosen.supports(x):
            raise ValueError(
                f"backend {backend!r} of {op} cannot run on {x.device.type} tensors of dtype {x.dtype} "
                f"(or its package is missing); use backend='auto' or 'torch'"
            )
        return chosen
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced and forced != "auto" and forced in table and table[forced].supports(x):
        return table[forced]
    for name in available(op):
        if table[name].supports(x):
            return table[name]
    raise RuntimeError(f"no backend of {op} supports {x.device.type} tensors")  # unreachable: torch supports all
