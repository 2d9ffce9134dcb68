"""Mamba-2's SSD (Dao & Gu, 2024): the recurrence of Oryx-TM and of the ``mamba2`` baseline.

Per head, with a step size dt = softplus(W_dt x + dt_bias) [B, T, H] from the layer input x:

    S_t = exp(−exp(A_log) · dt_t) S_{t−1} + (dt_t k_t) v_tᵀ,     o_t = S_tᵀ q_t + D ⊙ v_t

(``oryx.ops.scalar_decay_rule`` with k scaled by dt, unit scale, and the D skip added here). In Mamba-2's terms
q = C, k = B, v = x. dt scales the linear path only: attention in an Oryx layer reads the unscaled shared key.

Parameters: dt_proj = W_dt (D×H), A_log, dt_bias, D (H): D·H + 3·H. In an Oryx layer it follows Mamba-2's conventions:
no SiLU after the shared conv or on the queries, RoPE on both queries and the shared key, and a full-width output norm
of o ⊙ silu(gate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from oryx.layers.common import mask_padding
from oryx.layers.recurrences.base import HeadLayout, Recurrence, init_decay
from oryx.ops import scalar_decay_rule


class Mamba2(Recurrence):
    feature_silu = False
    rotary_linear = True
    output_norm = "full"
    no_weight_decay = ("A_log", "dt_bias", "D")

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int, value_dim: int, chunk_size: int = 64) -> None:
        super().__init__(hidden_size, num_heads, key_dim, value_dim, chunk_size)
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.ones(num_heads))

    @classmethod
    def baseline_layout(cls, config: Any) -> HeadLayout:
        """mamba_ssm's Mamba2 with one group: E·D/P heads of value width P, one B and C of width N for all heads."""
        d_inner, head_dim = config.mamba_expand * config.hidden_size, config.mamba_head_dim
        if d_inner % head_dim:
            raise ValueError(f"mamba_expand·hidden_size ({d_inner}) must be a multiple of mamba_head_dim ({head_dim})")
        return HeadLayout(1, config.mamba_d_state, d_inner // head_dim, head_dim)

    def init_parameters(self) -> None:
        init_decay(self.A_log, self.dt_bias)
        init.ones_(self.D)

    def forward(self, x, q, k, v, pad_mask, initial_state=None, output_final_state=False):
        dt = mask_padding(F.softplus(self.dt_proj(x).float() + self.dt_bias), pad_mask)  # [B, T, H]; 0 at padding
        o, final = scalar_decay_rule(
            q,
            (k * dt[..., None]).to(x.dtype),
            v,
            (-self.A_log.exp() * dt).to(x.dtype),
            scale=1.0,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=self.chunk_size,
        )
        return o + self.D[:, None].to(v.dtype) * v, final
