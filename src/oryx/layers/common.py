"""Small building blocks shared by every mixer and block: norms, rotary embeddings, the SwiGLU MLP, padding masks,
and the weight-decay tags.

A module names the parameters it defines that take no weight decay in its class attribute ``no_weight_decay`` (norm
weights, the recurrences' decay, step and skip parameters); ``no_decay_names`` collects them for the optimizer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and returned in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def mask_padding(x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions of x [B, T, ...] (pad_mask [B, T], True = real token): they then enter no conv window
    and write nothing to any state."""
    if pad_mask is None:
        return x
    return x * pad_mask.view(*pad_mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that take no weight decay: those a module lists
    in its ``no_weight_decay`` attribute, and biases."""
    names = set()
    for prefix, module in model.named_modules():
        own = (name for name, _ in module.named_parameters(recurse=False))
        for name in own:
            if name in getattr(module, "no_weight_decay", ()) or name == "bias":
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


class RMSNorm(nn.Module):
    no_weight_decay: ClassVar[tuple[str, ...]] = ("weight",)

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit L2 norm over the last dim (the Gated DeltaNet query/key normalisation)."""
    return x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, D/2] float32 of the rotary embedding at integer ``positions`` [B, T].

    Angles are formed in float32 so that positions far from 0 keep their precision. Every layer of a forward shares
    one pair (``MixContext.rotary``).
    """
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention) of x [B, T, H, D] with ``rotary_tables``' (cos, sin)."""
    cos, sin = tables
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class SwiGLU(nn.Module):
    """The Transformer++ MLP: down(silu(gate(x)) * up(x)); 3·D·I parameters."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
