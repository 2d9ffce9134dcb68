"""Token mixers: the Oryx multi-mixer and the three single-mixer baselines built from the same parts.

Every mixer maps x [B, T, D] to y [B, T, D] given a `MixContext` (per-token modes, rotary positions, padding) and an
optional `LayerState` that it reads and advances in place (the inference cache of one layer).

Oryx mixer (paper-notes §2.3; D = H·d, d = head_dim), parameters:
    shared:   W_K, W_V (D×D each), short conv on [K; V] (2D×W), W_G (D×D), gated-norm weight, W_O (D×D)
    attention: W_Qa (D×D)
    linear:    W_Ql (D×D) + supports; TG: W_alpha, W_beta (D×H), A_log, dt_bias (H);
                                     TM: W_dt (D×H), dt_bias, A_log, D (H)
so 5D² are active per mode and 4D² (plus the MLP's 8D² in the block) are shared: the ≥ 90% of paper-notes §2.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from oryx.cache import LayerState
from oryx.configuration import ATTN, LINEAR, OryxConfig
from oryx.layers.common import l2_normalize, rms_norm, rotary_tables, rotate
from oryx.ops import causal_attention, causal_conv1d, gated_delta_rule, scalar_decay_rule


@dataclass
class MixContext:
    """What every layer needs to know about the tokens of one forward (computed once per forward).

    modes [B, T] long; positions [B, T] long (rotary positions, from the padding mask); pad_mask [B, T] bool or None
    (True = real token); key_mask [B, Tc+T] bool or None (valid keys, cached ones included); attn_rows [B, T] bool
    (rows whose output comes from attention) or None when every row does; has_attn / has_linear: whether any row
    needs that mixer's output.
    """

    modes: torch.Tensor
    positions: torch.Tensor
    pad_mask: torch.Tensor | None
    key_mask: torch.Tensor | None
    attn_rows: torch.Tensor | None
    has_attn: bool
    has_linear: bool
    _rotary: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def rotary(self, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) tables of ``positions``, computed once per forward and shared by every layer."""
        if (head_dim, theta) not in self._rotary:
            self._rotary[head_dim, theta] = rotary_tables(self.positions, head_dim, theta)
        return self._rotary[head_dim, theta]


def _mask_padding(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions of x [B, T, ...]: they then enter no conv window and write nothing to any state."""
    if pad_mask is None:
        return x
    return x * pad_mask.view(*pad_mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def _short_conv(x: torch.Tensor, weight: torch.Tensor, state: LayerState | None) -> torch.Tensor:
    """Causal depthwise conv of x [B, T, C], continuing from (and advancing) the cached conv window."""
    y, final = causal_conv1d(
        x, weight, initial_state=None if state is None else state.conv, output_final_state=state is not None
    )
    if state is not None:
        state.conv = final
    return y


def _attend(q: torch.Tensor | None, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor | None:
    """Causal softmax attention of the attention-mode rows over every key so far; appends k, v to the KV cache.

    q is None when no row of this forward is in attention mode: the keys are still cached, nothing is computed.
    """
    if state is not None:
        k, v = state.append_kv(k, v)
    if q is None:
        return None
    return causal_attention(q, k, v, query_mask=ctx.attn_rows, key_mask=ctx.key_mask)


def _delta_gates(mixer: nn.Module, x: torch.Tensor, pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's per-head log-decay g = -exp(A_log)·softplus(W_alpha x + dt_bias) and write strength
    β = sigmoid(W_beta x), both [B, T, H] in float32; padded positions get g = 0 and β = 0 (identity steps)."""
    beta = _mask_padding(torch.sigmoid(mixer.b_proj(x).float()), pad_mask)
    g = _mask_padding(-mixer.A_log.exp() * F.softplus(mixer.a_proj(x).float() + mixer.dt_bias), pad_mask)
    return g, beta


def _init_special(mixer: nn.Module) -> None:
    """Init of the parameters a Linear init does not cover (transformers' guarded init: loaded weights are kept).

    Conv: PyTorch's depthwise default U(±1/sqrt(W)). Mamba-style decay: dt ~ logUniform[1e-3, 1e-1] stored as
    softplus⁻¹(dt) in dt_bias, A ~ U[1, 16] stored as log. Skip D = 1, norm weights = 1.
    """
    width = mixer.conv_weight.shape[1]
    init.uniform_(mixer.conv_weight, -(width**-0.5), width**-0.5)
    heads = mixer.A_log.shape[0]
    dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
    init.copy_(mixer.dt_bias, dt + torch.log(-torch.expm1(-dt)))
    init.copy_(mixer.A_log, torch.log(torch.empty(heads).uniform_(1.0, 16.0)))
    init.ones_(mixer.norm_weight)
    if hasattr(mixer, "D"):
        init.ones_(mixer.D)


class OryxMixer(nn.Module):
    """The multi-mixer: shared keys/values feed both a softmax attention and a linear recurrence.

    Both states advance over every token; the per-token mode only picks which output the token uses. Attention is
    computed only for attention-mode rows (each over every key at or before it), so its cost scales with the number
    of attention-mode tokens. The recurrence runs over all tokens (its state must absorb them all).
    """

    ATTN_PARAMS = ("q_attn",)
    LINEAR_PARAMS = ("q_linear", "a_proj", "b_proj", "dt_proj", "A_log", "dt_bias", "D")

    def __init__(self, config: OryxConfig):
        super().__init__()
        d_model, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.variant, self.rope_theta, self.eps = config.variant, config.rope_theta, config.rms_norm_eps
        self.chunk_size = config.chunk_size
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * d_model, config.conv_size))
        self.g_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_attn = nn.Linear(d_model, d_model, bias=False)
        self.q_linear = nn.Linear(d_model, d_model, bias=False)
        heads = self.num_heads
        if self.variant == "tg":
            self.a_proj = nn.Linear(d_model, heads, bias=False)
            self.b_proj = nn.Linear(d_model, heads, bias=False)
            self.norm_weight = nn.Parameter(torch.ones(self.head_dim))  # per-head RMSNorm, weight shared by heads
        else:
            self.dt_proj = nn.Linear(d_model, heads, bias=False)
            self.D = nn.Parameter(torch.ones(heads))
            self.norm_weight = nn.Parameter(torch.ones(d_model))  # full-width RMSNorm
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))

    def reset_special_parameters(self) -> None:
        _init_special(self)

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, d = self.num_heads, self.head_dim
        # 1. Shared keys and values: projection, padding masked out, short causal conv (TG: then SiLU).
        kv = _short_conv(
            _mask_padding(torch.cat([self.k_proj(x), self.v_proj(x)], -1), ctx.pad_mask), self.conv_weight, state
        )
        if self.variant == "tg":
            kv = F.silu(kv)
        k, v = kv.view(B, T, 2, H, d).unbind(2)
        # 2. Each mode's output. The recurrence is skipped only when nothing needs it (no cache, no linear row).
        need_linear = ctx.has_linear or state is not None
        out_linear = self._linear(x, k, v, ctx, state) if need_linear else None
        out_attn = self._attention(x, k, v, ctx, state)
        if out_linear is None:
            o = out_attn
        elif out_attn is None:
            o = out_linear
        else:
            o = out_attn if ctx.attn_rows is None else torch.where(ctx.attn_rows[..., None, None], out_attn, out_linear)
        # 3. Shared gated norm and output projection (TM: RMSNorm(o ⊙ silu(g)); TG: RMSNorm_head(o) ⊙ silu(g)).
        gate = F.silu(self.g_proj(x))
        if self.variant == "tm":
            y = rms_norm(o.reshape(B, T, H * d) * gate, self.norm_weight, self.eps)
        else:
            y = rms_norm(o, self.norm_weight, self.eps).reshape(B, T, H * d) * gate
        return self.o_proj(y)

    def _attention(self, x, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor | None:
        if not ctx.has_attn and state is None:
            return None
        k = rotate(k, ctx.rotary(self.head_dim, self.rope_theta))
        q = None
        if ctx.has_attn:
            q = self.q_attn(x).view(*x.shape[:2], self.num_heads, self.head_dim)
            q = rotate(F.silu(q) if self.variant == "tg" else q, ctx.rotary(self.head_dim, self.rope_theta))
        return _attend(q, k, v, ctx, state)

    def _linear(self, x, k, v, ctx: MixContext, state: LayerState | None) -> torch.Tensor:
        q = self.q_linear(x).view(*x.shape[:2], self.num_heads, self.head_dim)
        initial = None if state is None else state.recurrent
        if self.variant == "tg":
            # Gated DeltaNet: L2-normalised q and (its copy of) k, no RoPE; padding: beta = 0 and g = 0 (identity).
            g, beta = _delta_gates(self, x, ctx.pad_mask)
            o, final = gated_delta_rule(
                l2_normalize(F.silu(q)),
                l2_normalize(k),
                v,
                g.to(x.dtype),
                beta.to(x.dtype),
                initial_state=initial,
                output_final_state=state is not None,
                chunk_size=self.chunk_size,
            )
        else:
            # Mamba-2 SSD: C = RoPE(q), B = dt·RoPE(k) (dt scales the linear path only), x = v, plus the D skip.
            dt = _mask_padding(F.softplus(self.dt_proj(x).float() + self.dt_bias), ctx.pad_mask)
            tables = ctx.rotary(self.head_dim, self.rope_theta)
            q, k = rotate(q, tables), rotate(k, tables)
            o, final = scalar_decay_rule(
                q,
                (k * dt[..., None]).to(x.dtype),
                v,
                (-self.A_log.exp() * dt).to(x.dtype),
                scale=1.0,
                initial_state=initial,
                output_final_state=state is not None,
                chunk_size=self.chunk_size,
            )
            o = o + self.D[:, None].to(v.dtype) * v
        if state is not None:
            state.recurrent = final
        return o


class AttentionMixer(nn.Module):
    """Transformer++ baseline: multi-head causal softmax attention with RoPE; 4D² parameters."""

    ATTN_PARAMS: tuple[str, ...] = ()
    LINEAR_PARAMS: tuple[str, ...] = ()

    def __init__(self, config: OryxConfig):
        super().__init__()
        d_model, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    def reset_special_parameters(self) -> None:
        """Nothing beyond the model's Linear init."""

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        tables = ctx.rotary(self.head_dim, self.rope_theta)
        q = rotate(self.q_proj(x).view(shape), tables)
        k = rotate(self.k_proj(x).view(shape), tables)
        o = _attend(q, k, self.v_proj(x).view(shape), ctx, state)
        return self.o_proj(o.reshape(B, T, -1))


class GatedDeltaNetMixer(nn.Module):
    """Gated DeltaNet baseline (fla's layer): H heads with key width d_k = head_dim and value width d_v.

    Short conv + SiLU on q, k, v; L2-normalised q, k; beta = sigmoid(W_beta x); g = -exp(A_log)·softplus(W_alpha x +
    dt_bias); output RMSNorm_head(o) ⊙ silu(W_G x), then W_O. With H ≈ 0.75·D/128 and d_v = 256: ≈ 6D² parameters and
    a state 1.5× Oryx's (paper-notes §4).
    """

    ATTN_PARAMS: tuple[str, ...] = ()
    LINEAR_PARAMS: tuple[str, ...] = ()

    def __init__(self, config: OryxConfig):
        super().__init__()
        d_model, heads = config.hidden_size, config.gdn_num_heads
        self.num_heads, self.d_k, self.d_v = heads, config.head_dim, config.gdn_head_dim_v
        self.eps, self.chunk_size = config.rms_norm_eps, config.chunk_size
        self.qkv_proj = nn.Linear(d_model, heads * (2 * self.d_k + self.d_v), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(heads * (2 * self.d_k + self.d_v), config.conv_size))
        self.a_proj = nn.Linear(d_model, heads, bias=False)
        self.b_proj = nn.Linear(d_model, heads, bias=False)
        self.g_proj = nn.Linear(d_model, heads * self.d_v, bias=False)
        self.o_proj = nn.Linear(heads * self.d_v, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.d_v))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))

    def reset_special_parameters(self) -> None:
        _init_special(self)

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        qkv = F.silu(_short_conv(_mask_padding(self.qkv_proj(x), ctx.pad_mask), self.conv_weight, state))
        q, k, v = qkv.split([H * self.d_k, H * self.d_k, H * self.d_v], dim=-1)
        g, beta = _delta_gates(self, x, ctx.pad_mask)
        o, final = gated_delta_rule(
            l2_normalize(q.view(B, T, H, self.d_k)),
            l2_normalize(k.view(B, T, H, self.d_k)),
            v.reshape(B, T, H, self.d_v),
            g.to(x.dtype),
            beta.to(x.dtype),
            initial_state=None if state is None else state.recurrent,
            output_final_state=state is not None,
            chunk_size=self.chunk_size,
        )
        if state is not None:
            state.recurrent = final
        y = rms_norm(o, self.norm_weight, self.eps).reshape(B, T, -1) * F.silu(self.g_proj(x))
        return self.o_proj(y)


class Mamba2Mixer(nn.Module):
    """Mamba-2 baseline (mamba_ssm's Mamba2 with ngroups = 1), on the same scalar-decay op.

    in_proj D → [z (E·D), x (E·D), B (N), C (N), dt (Hm)]; short conv + SiLU on [x, B, C]; SSD with Hm = E·D/P heads of
    value width P and state width N, decay exp(dt·A); y + D·x; RMSNorm(y ⊙ silu(z)) full width; out_proj E·D → D.
    ≈ 6D² parameters at E = 2 and a state 2× Oryx's (paper-notes §4).
    """

    ATTN_PARAMS: tuple[str, ...] = ()
    LINEAR_PARAMS: tuple[str, ...] = ()

    def __init__(self, config: OryxConfig):
        super().__init__()
        d_model = config.hidden_size
        self.d_inner, self.d_state, self.head_dim = (
            config.mamba_expand * d_model,
            config.mamba_d_state,
            config.mamba_head_dim,
        )
        if self.d_inner % self.head_dim:
            raise ValueError(
                f"mamba_expand·hidden_size ({self.d_inner}) must be a multiple of mamba_head_dim ({self.head_dim})"
            )
        self.num_heads, self.eps = self.d_inner // self.head_dim, config.rms_norm_eps
        self.chunk_size = config.chunk_size
        conv_channels = self.d_inner + 2 * self.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_channels + self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(conv_channels, config.conv_size))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def reset_special_parameters(self) -> None:
        _init_special(self)

    def forward(self, x: torch.Tensor, ctx: MixContext, state: LayerState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, P, N = self.num_heads, self.head_dim, self.d_state
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        xbc = F.silu(_short_conv(_mask_padding(xbc, ctx.pad_mask), self.conv_weight, state))
        xs, b, c = xbc.split([self.d_inner, N, N], dim=-1)
        dt = _mask_padding(F.softplus(dt.float() + self.dt_bias), ctx.pad_mask)  # [B, T, H]
        xs = xs.reshape(B, T, H, P)
        k = (b[:, :, None, :].float() * dt[..., None]).to(x.dtype)  # dt·B per head: [B, T, H, N]
        o, final = scalar_decay_rule(
            c[:, :, None, :].expand(B, T, H, N),
            k,
            xs,
            (-self.A_log.exp() * dt).to(x.dtype),
            scale=1.0,
            initial_state=None if state is None else state.recurrent,
            output_final_state=state is not None,
            chunk_size=self.chunk_size,
        )
        if state is not None:
            state.recurrent = final
        y = (o + self.D[:, None].to(xs.dtype) * xs).reshape(B, T, self.d_inner)
        return self.out_proj(rms_norm(y * F.silu(z), self.norm_weight, self.eps))


MIXERS: dict[str, type[nn.Module]] = {
    "tg": OryxMixer,
    "tm": OryxMixer,
    "transformer": AttentionMixer,
    "gdn": GatedDeltaNetMixer,
    "mamba2": Mamba2Mixer,
}


def build_mixer(config: OryxConfig) -> nn.Module:
    return MIXERS[config.variant](config)


def mode_specific(mixer: nn.Module, param_name: str) -> int | None:
    """The mode a mixer parameter belongs to (ATTN or LINEAR), or None if both modes use it."""
    root = param_name.split(".")[0]
    if root in mixer.ATTN_PARAMS:
        return ATTN
    if root in mixer.LINEAR_PARAMS:
        return LINEAR
    return None


def mixer_parameter_count(config: OryxConfig, mode: int | None = None) -> int:
    """Parameters of one mixer; with `mode`, only those active in that mode (shared + that mode's own)."""
    with torch.device("meta"):
        mixer = build_mixer(config)
    return sum(p.numel() for name, p in mixer.named_parameters() if mode_specific(mixer, name) in (None, mode))
