"""Kimi Delta Attention (KDA, Kimi Linear 2025): the recurrence of Oryx-TK and of the ``kda`` baseline.

Gated DeltaNet with a decay per key channel instead of per head (``oryx.ops.kimi_delta_rule``): per head,

    S_t = (I − β_t k_t k_tᵀ) Diag(exp(g_t)) S_{t−1} + β_t k_t v_tᵀ,     o_t = S_tᵀ q_t / sqrt(K)

with L2-normalised q and k. Gates from the layer input x [B, T, D], in float32:

    β = sigmoid(W_β x)                                        [B, T, H]
    g = −exp(A_log) ⊙ softplus(W_up W_down x + dt_bias)        [B, T, H, K], one A per head, one bias per channel

The decay projection is low-rank, as in Kimi Linear, with rank r = max(16, D/16): it adds 2·D·r ≈ D²/8 parameters to
the linear mode, which keeps an Oryx-TK layer above 90 % shared. Parameters: b_proj (D×H), a_down (D×r),
a_up (r×H·K), A_log (H), dt_bias (H·K). In an Oryx layer it follows Gated DeltaNet's conventions (SiLU features, no
RoPE on the linear path, output norm per head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oryx.layers.common import l2_normalize
from oryx.layers.recurrences.base import HeadLayout, Recurrence, init_decay
from oryx.layers.recurrences.gated_delta import delta_gates
from oryx.ops import kimi_delta_rule


def decay_rank(hidden_size: int) -> int:
    """The rank of KDA's decay projection in a layer of width D: max(16, D/16)."""
    return max(16, hidden_size // 16)


class KimiDelta(Recurrence):
    feature_silu = True
    rotary_linear = False
    output_norm = "head"
    no_weight_decay = ("A_log", "dt_bias")

    def __init__(self, hidden_size: int, num_heads: int, key_dim: int, value_dim: int, chunk_size: int = 64) -> None:
        super().__init__(hidden_size, num_heads, key_dim, value_dim, chunk_size)
        rank = decay_rank(hidden_size)
        self.a_down = nn.Linear(hidden_size, rank, bias=False)
        self.a_up = nn.Linear(rank, num_heads * key_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads * key_dim))

    @classmethod
    def baseline_layout(cls, config: Any) -> HeadLayout:
        """The delta-rule baselines' layout (Gated DeltaNet's): H ≈ 0.75·D/128 heads of keys of head_dim, values of
        256."""
        return HeadLayout(config.gdn_num_heads, config.head_dim, config.gdn_num_heads, config.gdn_head_dim_v)

    def init_parameters(self) -> None:
        init_decay(self.A_log, self.dt_bias)

    def forward(self, x, q, k, v, pad_mask, initial_state=None, output_final_state=False):
        B, T = x.shape[:2]
        H, K = self.num_heads, self.key_dim
        decay_logits = self.a_up(self.a_down(x)).view(B, T, H, K)
        g, beta = delta_gates(decay_logits, self.b_proj(x), self.A_log[:, None], self.dt_bias.view(H, K), pad_mask)
        return kimi_delta_rule(
            l2_normalize(q),
            l2_normalize(k),
            v,
            g.to(x.dtype),
            beta.to(x.dtype),
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=self.chunk_size,
        )
