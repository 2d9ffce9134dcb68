"""Token mixers: the Oryx multi-mixer, and the single-mixer baselines built from the same components.

Every mixer maps x [B, T, D] to y [B, T, D] given a `MixContext` (per-token modes, rotary positions, padding) and an
optional `LayerState` that it reads and advances in place (the inference cache of one layer). The components:

    short_conv     causal depthwise conv over time, continuing from the cached window
    attend         causal softmax attention of the attention-mode rows over every cached and new key
    a Recurrence   the linear recurrence: its gates, op and state (oryx.layers.recurrences)
    gated_output   RMSNorm and the SiLU gate, per head or full width, as the recurrence prescribes

Oryx mixer (docs/design.md §2; D = H·d, d = head_dim), parameters:
    shared:    W_K, W_V (D×D each), short conv on [K; V] (2D×W), W_G (D×D), gated-norm weight, W_O (D×D)
    attention: W_Qa (D×D)
    linear:    W_Ql (D×D) + the recurrence's own (gates: Gated DeltaNet 2DH + 2H, Mamba-2 DH + 3H)
so 5D² are active per mode and 4D² (plus the MLP's 8D² in the block) are shared: the paper's ≥ 90 %.

Baselines: `AttentionMixer` (Transformer++, 4D²) and `RecurrentMixer` (one recurrence with its own [q; k; v]
projection and conv, in the head layout of fla's GatedDeltaNet layer or mamba_ssm's Mamba2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from oryx.cache import LayerState
from oryx.configuration import OryxConfig
from oryx.layers.common import mask_padding, rms_norm, rotary_tables, rotate
from oryx.layers.recurrences import Recurrence
from oryx.ops import causal_attention, causal_conv1d
from oryx.variants import ATTN, LINEAR, variant

# A routing decision (oryx.routing): called by layer 0's mixer with its input x [B, T, D] and its linear branch's
# output [B, T, H, d], it sets the modes of the forward (MixContext.set_modes) for that layer and every later one.
Route = Callable[[torch.Tensor, torch.Tensor, "MixContext"], None]


def mode_flags(
    modes: torch.Tensor, pad_mask: torch.Tensor | None, active_modes: tuple[bool, bool] | None, tracing: bool
) -> tuple[torch.Tensor | None, bool, bool]:
    """(attn_rows, has_attn, has_linear) of `modes` [B, T]: the rows whose output comes from attention ([B, T] bool,
    padding excluded; None when every row does, so attention can take its fused causal path) and whether any row
    needs each mixer. `active_modes` gives the flags when the caller knows them on the host; while tracing without
    them both mixers run (exact: each token still selects its mode's output)."""
    attn_rows = modes == ATTN if pad_mask is None else (modes == ATTN) & pad_mask
    if active_modes is not None:
        has_attn, has_linear = active_modes
    elif tracing:
        has_attn = has_linear = True
    else:
        has_attn, has_linear = bool(attn_rows.any()), bool((modes == LINEAR).any())
    has_linear = has_linear or not has_attn
    return (None if not has_linear else attn_rows), has_attn, has_linear


@dataclass
class MixContext:
    """What every layer needs to know about the tokens of one forward (computed once per forward).

    modes [B, T] long; positions [B, T] long (rotary positions, from the padding mask); pad_mask [B, T] bool or None
    (True = real token); key_mask [B, Tc+T] bool or None (valid keys, cached ones included); attn_rows [B, T] bool
    (rows whose output comes from attention) or None when every row does; has_attn / has_linear: whether any row
    needs that mixer's output. route: a pending routing decision, which layer 0 makes (and clears) after its linear
    branch; soft_select [B, T] float or None: training a router through the select, every layer outputs
    m·o_attn + (1 − m)·o_linear with this m instead of picking one output (both branches run on every row).
    """

    modes: torch.Tensor
    positions: torch.Tensor
    pad_mask: torch.Tensor | None
    key_mask: torch.Tensor | None
    attn_rows: torch.Tensor | None
    has_attn: bool
    has_linear: bool
    route: Route | None = None
    soft_select: torch.Tensor | None = None
    _rotary: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def rotary(self, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) tables of ``positions``, computed once per forward and shared by every layer."""
        if (head_dim, theta) not in self._rotary:
            self._rotary[head_dim, theta] = rotary_tables(self.positions, head_dim, theta)
        return self._rotary[head_dim, theta]

    def set_modes(self, modes: torch.Tensor, soft_select: torch.Tensor | None = None) -> None:
        """Decide the forward's modes [B, T] (a routing decision, made in layer 0); with `soft_select` [B, T] (the
        straight-through select of router training) every row runs both branches and mixes them by it."""
        self.modes = modes
        if soft_select is None:
            self.attn_rows, self.has_attn, self.has_linear = mode_flags(modes, self.pad_mask, None, False)
        else:
            self.attn_rows, self.has_attn, self.has_linear = None, True, True
        self.soft_select = soft_select


# --- components -----------------------------------------------------------------------------------------------------
def short_conv(x: torch.Tensor, weight: torch.Tensor, state: LayerState | None) -> torch.Tensor:
    """Causal depthwise conv of x [B, T, C], continuing from (and advancing) the cached conv window."""
    y, final = causal_conv1d(
        x, weight, initial_state=None if state is None else state.conv, output_final_state=state is not None
    )
    if state is not None:
        state.conv = final
    return y


def attend(q: torch.Tensor | None, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor | None:
    """Causal softmax attention of the attention-mode rows over every key so far; appends k, v to the KV cache.

    q is None when no row of this forward is in attention mode: the keys are still cached, nothing is computed.
    """
    if state is not None:
        k, v = state.append_kv(k, v)
    if q is None:
        return None
    return causal_attention(q, k, v, query_mask=ctx.attn_rows, key_mask=ctx.key_mask)


def gated_output(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    """The recurrences' output norm: o [B, T, H, V], gate [B, T, H·V] (before its SiLU) -> [B, T, H·V].

    "head": RMSNorm(o) over each head (weight [V]), then ⊙ silu(gate) (Gated DeltaNet); "full": RMSNorm(o ⊙ silu(gate))
    over the full width (weight [H·V]; Mamba-2's gated norm).
    """
    B, T = o.shape[:2]
    if style == "full":
        return rms_norm(o.reshape(B, T, -1) * F.silu(gate), weight, eps)
    return rms_norm(o, weight, eps).reshape(B, T, -1) * F.silu(gate)


def _norm_width(style: str, heads: int, value_dim: int) -> int:
    return heads * value_dim if style == "full" else value_dim


def _init_conv(weight: nn.Parameter) -> None:
    """PyTorch's depthwise conv default, U(±1/sqrt(W))."""
    width = weight.shape[1]
    init.uniform_(weight, -(width**-0.5), width**-0.5)


def _broadcast_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, h, d] -> [B, T, heads, d]: each of the h groups serves heads / h consecutive heads."""
    if x.shape[2] == heads:
        return x
    if x.shape[2] == 1:
        return x.expand(*x.shape[:2], heads, x.shape[3])
    return x.repeat_interleave(heads // x.shape[2], dim=2)


# --- mixers ---------------------------------------------------------------------------------------------------------
class OryxMixer(nn.Module):
    """The multi-mixer: shared keys/values feed both a softmax attention and a linear recurrence.

    Both states advance over every token; the per-token mode only picks which output the token uses. Attention is
    computed only for attention-mode rows (each over every key at or before it), so its cost scales with the number
    of attention-mode tokens. The recurrence runs over all tokens (its state must absorb them all).
    """

    MODE_OF: ClassVar[dict[str, int]] = {"q_attn": ATTN, "q_linear": LINEAR, "recurrence": LINEAR}
    no_weight_decay = ("norm_weight",)

    def __init__(self, config: OryxConfig, recurrence: type[Recurrence]):
        super().__init__()
        d_model, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.rope_theta, self.eps = config.rope_theta, config.rms_norm_eps
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * d_model, config.conv_size))
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_attn = nn.Linear(d_model, d_model, bias=False)
        self.q_linear = nn.Linear(d_model, d_model, bias=False)
        self.recurrence = recurrence(d_model, self.num_heads, self.head_dim, self.head_dim, config.chunk_size)
        self.norm_weight = nn.Parameter(torch.ones(_norm_width(recurrence.output_norm, self.num_heads, self.head_dim)))

    def reset_special_parameters(self) -> None:
        _init_conv(self.conv_weight)
        self.recurrence.init_parameters()
        init.ones_(self.norm_weight)

    def mode_of(self, param_name: str) -> int | None:
        """The mode a parameter (named relative to this mixer) belongs to, or None if both modes use it."""
        return self.MODE_OF.get(param_name.split(".")[0])

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, d = self.num_heads, self.head_dim
        # 1. Shared keys and values: projection, padding masked out, short causal conv (GDN-style: then SiLU).
        kv = short_conv(
            mask_padding(torch.cat([self.k_proj(x), self.v_proj(x)], -1), ctx.pad_mask), self.conv_weight, state
        )
        if self.recurrence.feature_silu:
            kv = F.silu(kv)
        k, v = kv.view(B, T, 2, H, d).unbind(2)
        # 2. Each mode's output. The recurrence is skipped only when nothing needs it (no cache, no linear row, no
        # pending routing decision). A routing decision reads the linear branch of layer 0, which no token's mode
        # can change (both states advance on every token), then holds for this layer's attention and every later
        # layer.
        need_linear = ctx.has_linear or state is not None or ctx.route is not None
        out_linear = self._linear(x, k, v, ctx, state) if need_linear else None
        if ctx.route is not None:
            route, ctx.route = ctx.route, None
            route(x, out_linear, ctx)
        out_attn = self._attention(x, k, v, ctx, state)
        if out_linear is None:
            o = out_attn
        elif out_attn is None:
            o = out_linear
        elif ctx.soft_select is not None:
            select = ctx.soft_select[..., None, None].to(out_attn.dtype)
            o = select * out_attn + (1 - select) * out_linear
        else:
            o = out_attn if ctx.attn_rows is None else torch.where(ctx.attn_rows[..., None, None], out_attn, out_linear)
        # 3. Shared gated norm and output projection.
        return self.o_proj(gated_output(o, self.g_proj(x), self.norm_weight, self.eps, self.recurrence.output_norm))

    def _attention(self, x, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor | None:
        if not ctx.has_attn and state is None:
            return None
        tables = ctx.rotary(self.head_dim, self.rope_theta)
        q = None
        if ctx.has_attn:
            q = self.q_attn(x).view(*x.shape[:2], self.num_heads, self.head_dim)
            q = rotate(F.silu(q) if self.recurrence.feature_silu else q, tables)
        return attend(q, rotate(k, tables), v, ctx, state)

    def _linear(self, x, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor:
        q = self.q_linear(x).view(*x.shape[:2], self.num_heads, self.head_dim)
        if self.recurrence.feature_silu:
            q = F.silu(q)
        if self.recurrence.rotary_linear:
            tables = ctx.rotary(self.head_dim, self.rope_theta)
            q, k = rotate(q, tables), rotate(k, tables)
        o, final = self.recurrence(
            x, q, k, v, ctx.pad_mask, None if state is None else state.recurrent, output_final_state=state is not None
        )
        if state is not None:
            state.recurrent = final
        return o


class AttentionMixer(nn.Module):
    """Transformer++ baseline: multi-head causal softmax attention with RoPE; 4D² parameters."""

    def __init__(self, config: OryxConfig):
        super().__init__()
        d_model, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        tables = ctx.rotary(self.head_dim, self.rope_theta)
        q = rotate(self.q_proj(x).view(shape), tables)
        k = rotate(self.k_proj(x).view(shape), tables)
        o = attend(q, k, self.v_proj(x).view(shape), ctx, state)
        return self.o_proj(o.reshape(B, T, -1))


class RecurrentMixer(nn.Module):
    """A single-recurrence baseline (fla's GatedDeltaNet layer, mamba_ssm's Mamba2): the same recurrence module as
    Oryx's linear path, on its own [q; k; v] projection.

    [q; k; v] = short_conv(W_qkv x) then SiLU; the recurrence over q, k (broadcast to the value heads when the layout
    has fewer key heads) and v; `gated_output` with W_G x; W_O. With the layouts of `Recurrence.baseline_layout`:
    ≈ 6D² parameters and a larger state than Oryx's (Gated DeltaNet 1.5×, Mamba-2 2×), as in the paper.
    """

    no_weight_decay = ("norm_weight",)

    def __init__(self, config: OryxConfig, recurrence: type[Recurrence]):
        super().__init__()
        d_model, self.eps = config.hidden_size, config.rms_norm_eps
        self.layout = layout = recurrence.baseline_layout(config)
        self.widths = [layout.key_heads * layout.key_dim] * 2 + [layout.value_heads * layout.value_dim]
        value_width = self.widths[2]
        self.qkv_proj = nn.Linear(d_model, sum(self.widths), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(sum(self.widths), config.conv_size))
        self.recurrence = recurrence(d_model, layout.value_heads, layout.key_dim, layout.value_dim, config.chunk_size)
        self.g_proj = nn.Linear(d_model, value_width, bias=False)
        self.o_proj = nn.Linear(value_width, d_model, bias=False)
        self.norm_weight = nn.Parameter(
            torch.ones(_norm_width(recurrence.output_norm, layout.value_heads, layout.value_dim))
        )

    def reset_special_parameters(self) -> None:
        _init_conv(self.conv_weight)
        self.recurrence.init_parameters()
        init.ones_(self.norm_weight)

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        layout = self.layout
        qkv = F.silu(short_conv(mask_padding(self.qkv_proj(x), ctx.pad_mask), self.conv_weight, state))
        q, k, v = qkv.split(self.widths, dim=-1)
        q, k = (_broadcast_heads(t.view(B, T, layout.key_heads, layout.key_dim), layout.value_heads) for t in (q, k))
        o, final = self.recurrence(
            x,
            q,
            k,
            v.reshape(B, T, layout.value_heads, layout.value_dim),
            ctx.pad_mask,
            None if state is None else state.recurrent,
            output_final_state=state is not None,
        )
        if state is not None:
            state.recurrent = final
        return self.o_proj(gated_output(o, self.g_proj(x), self.norm_weight, self.eps, self.recurrence.output_norm))


def build_mixer(config: OryxConfig) -> nn.Module:
    """The mixer of one layer of ``config.variant`` (the variant table, ``oryx.variants``)."""
    row = variant(config.variant)
    if row.recurrence is None:
        return AttentionMixer(config)
    return (OryxMixer if row.is_oryx else RecurrentMixer)(config, row.recurrence)


def mode_specific(mixer: nn.Module, param_name: str) -> int | None:
    """The mode a mixer parameter belongs to (ATTN or LINEAR), or None if both modes use it (always, for a baseline)."""
    return mixer.mode_of(param_name) if hasattr(mixer, "mode_of") else None


def mixer_parameter_count(config: OryxConfig, mode: int | None = None) -> int:
    """Parameters of one mixer; with `mode`, only those active in that mode (shared + that mode's own)."""
    with torch.device("meta"):
        mixer = build_mixer(config)
    return sum(p.numel() for name, p in mixer.named_parameters() if mode_specific(mixer, name) in (None, mode))


def matched_intermediate_size(config: OryxConfig) -> int:
    """The SwiGLU width of ``config``: ≈ 8D/3 for Oryx; for a baseline, the width giving the same active parameters
    per layer as an Oryx-TG layer of the same shape in attention mode (the paper's parameter matching)."""
    d = config.hidden_size
    oryx_mlp = round(8 * d / 3 / 8) * 8
    if variant(config.variant).is_oryx:
        return oryx_mlp
    oryx = OryxConfig(variant="tg", hidden_size=d, num_hidden_layers=1, head_dim=config.head_dim,
                      conv_size=config.conv_size)  # fmt: skip
    target = mixer_parameter_count(oryx, mode=ATTN) + 3 * d * oryx_mlp
    return max(8, round((target - mixer_parameter_count(config)) / (3 * d) / 8) * 8)
