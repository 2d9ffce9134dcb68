"""The protocol of a linear recurrence, the component an Oryx layer pairs with attention (and a baseline uses alone).

A recurrence owns what is specific to it: its gates (computed from the layer input), the op it calls (``oryx.ops``:
chunked for training and prefill, one step per token when decoding; the op's dispatch picks the form and the kernel),
its state, and how an Oryx layer pairs it with softmax attention. The mixers (``oryx.layers.mixers``) own the rest:
the projections, the short conv, the attention branch and the gated output norm.

    o, final = recurrence(x, q, k, v, pad_mask, initial_state=None, output_final_state=False)

    x      [B, T, D]     the layer's normed input, from which the gates are computed
    q, k   [B, T, H, K]  after the mixer's feature maps (in Oryx: its linear query and the shared key)
    v      [B, T, H, V]
    pad_mask [B, T] bool (True = real token) or None; a padded position must be an identity step (no decay, no write)
    initial_state [B, H, K, V] or None (zeros)
    o      [B, T, H, V] in q's dtype; final [B, H, K, V] float32, or None unless output_final_state

In an Oryx model every parameter of the recurrence belongs to the linear mode. Parameters that take no weight decay
are named in the ``no_weight_decay`` attribute of the module that defines them (``oryx.layers.common``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import initialization as init


@dataclass(frozen=True)
class HeadLayout:
    """The heads of a single-mixer baseline: ``key_heads`` heads of ``key_dim`` for q and k (broadcast to the value
    heads when fewer, as Mamba-2's single group of B and C is), ``value_heads`` heads of ``value_dim`` for v."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int


class Recurrence(nn.Module):
    """Base class of the recurrences (see the module docstring for the call)."""

    # How an Oryx layer pairs the recurrence with attention (docs/design.md §3):
    feature_silu: ClassVar[bool]  # SiLU on the shared K/V after the conv and on both queries (Gated DeltaNet style)
    rotary_linear: ClassVar[bool]  # RoPE on the linear query and key too, not only attention's (Mamba-2 style)
    output_norm: ClassVar[str]  # "head": RMSNorm(o) per head, then ⊙ silu(gate); "full": RMSNorm(o ⊙ silu(gate))
    no_weight_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int, value_dim: int, chunk_size: int = 64) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.key_dim, self.value_dim = hidden_size, num_heads, key_dim, value_dim
        self.chunk_size = chunk_size  # of the torch reference's chunked form (a numerical detail)

    @classmethod
    def baseline_layout(cls, config: Any) -> HeadLayout:
        """The head layout of this recurrence's single-mixer baseline for an ``OryxConfig``."""
        raise NotImplementedError

    def init_parameters(self) -> None:
        """Initialise what a Linear init does not cover; called by the owning mixer's init (so the order of random
        draws is the mixer's)."""

    def forward(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pad_mask: torch.Tensor | None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def init_decay(A_log: nn.Parameter, dt_bias: nn.Parameter) -> None:
    """Mamba's decay init (transformers' guarded init: loaded weights are kept): dt ~ logUniform[1e-3, 1e-1], stored
    as softplus⁻¹(dt) in ``dt_bias``; A ~ U[1, 16] per head, stored as log in ``A_log``."""
    dt = torch.exp(torch.rand(dt_bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
    init.copy_(dt_bias, dt + torch.log(-torch.expm1(-dt)))
    init.copy_(A_log, torch.log(torch.empty(A_log.shape).uniform_(1.0, 16.0)))
