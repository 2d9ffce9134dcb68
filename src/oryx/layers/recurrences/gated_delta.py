"""Gated DeltaNet (Yang et al., 2024): the recurrence of Oryx-TG and of the ``gdn`` baseline.

Per head, S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ and o_t = S_tᵀ q_t / sqrt(K), with L2-normalised q
and k (``oryx.ops.gated_delta_rule``). Gates from the layer input x [B, T, D], both [B, T, H] in float32:

    β = sigmoid(W_β x)                                   write strength, in (0, 1)
    g = −exp(A_log) · softplus(W_α x + dt_bias)           log-decay, ≤ 0

Parameters: a_proj = W_α, b_proj = W_β (D×H each), A_log, dt_bias (H): 2·D·H + 2·H. In an Oryx layer it follows
Gated DeltaNet's conventions: SiLU on the shared keys/values after the conv and on both queries, no RoPE on the
linear path, and the output norm per head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oryx.layers.common import l2_normalize, mask_padding
from oryx.layers.recurrences.base import HeadLayout, Recurrence, init_decay
from oryx.ops import gated_delta_rule


def delta_gates(
    decay_logits: torch.Tensor,
    beta_logits: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    pad_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, β) of a delta rule, float32: g = −exp(A_log)·softplus(decay_logits + dt_bias), β = sigmoid(beta_logits),
    with g = 0 and β = 0 (an identity step) at padded positions. decay_logits [B, T, H] (a decay per head) or
    [B, T, H, K] (per key channel), with A_log and dt_bias broadcasting against it; beta_logits [B, T, H]."""
    beta = mask_padding(torch.sigmoid(beta_logits.float()), pad_mask)
    g = mask_padding(-A_log.exp() * F.softplus(decay_logits.float() + dt_bias), pad_mask)
    return g, beta


class GatedDeltaNet(Recurrence):
    feature_silu = True
    rotary_linear = False
    output_norm = "head"
    no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int, value_dim: int, chunk_size: int = 64) -> None:
        super().__init__(hidden_size, num_heads, key_dim, value_dim, chunk_size)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))

    @classmethod
    def baseline_layout(cls, config: Any) -> HeadLayout:
        """fla's GatedDeltaNet layer: H ≈ 0.75·D/128 heads, keys of head_dim, values of 256 (a state 1.5× Oryx's)."""
        return HeadLayout(config.gdn_num_heads, config.head_dim, config.gdn_num_heads, config.gdn_head_dim_v)

    def init_parameters(self) -> None:
        init_decay(self.A_log, self.dt_bias)

    def forward(self, x, q, k, v, pad_mask, initial_state=None, output_final_state=False):
        g, beta = delta_gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias, pad_mask)
        return gated_delta_rule(
            l2_normalize(q),
            l2_normalize(k),
            v,
            g.to(x.dtype),
            beta.to(x.dtype),
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=self.chunk_size,
        )
