"""Token-mixing ops: the linear recurrences, causal softmax attention and the short causal conv.

Conventions follow flash-linear-attention: layout [B, T, H, D], log-space decay ``g`` [B, T, H] (``kimi_delta_rule``:
[B, T, H, K], one per key channel), ``beta`` [B, T, H], recurrent state [B, H, K, V] accumulated in float32,
``initial_state=None, output_final_state=False``, return ``(o, final_state)``. Each op runs on its
pure-PyTorch reference (backend ``"torch"``) unless a faster registered backend supports the inputs
(see ``oryx.ops.dispatch``).
"""

from oryx.ops.attention import causal_attention, count_score_elements
from oryx.ops.conv import causal_conv1d, causal_conv1d_step
from oryx.ops.gated_delta import (
    gated_delta_rule,
    gated_delta_rule_chunked,
    gated_delta_rule_recurrent,
    gated_delta_step,
)
from oryx.ops.kimi_delta import (
    kimi_delta_rule,
    kimi_delta_rule_chunked,
    kimi_delta_rule_recurrent,
    kimi_delta_step,
)
from oryx.ops.scalar_decay import (
    scalar_decay_rule,
    scalar_decay_rule_chunked,
    scalar_decay_rule_recurrent,
    scalar_decay_step,
)

__all__ = [
    "causal_attention",
    "causal_conv1d",
    "causal_conv1d_step",
    "count_score_elements",
    "gated_delta_rule",
    "gated_delta_rule_chunked",
    "gated_delta_rule_recurrent",
    "gated_delta_step",
    "kimi_delta_rule",
    "kimi_delta_rule_chunked",
    "kimi_delta_rule_recurrent",
    "kimi_delta_step",
    "scalar_decay_rule",
    "scalar_decay_rule_chunked",
    "scalar_decay_rule_recurrent",
    "scalar_decay_step",
]

# Last, so that optional fast backends can register against the ops above (import-safe on CPU).
import oryx.ops.backends  # noqa: F401
