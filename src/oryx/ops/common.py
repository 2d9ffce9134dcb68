"""Helpers shared by the ops: input checks, the state dtype, chunking, and the stable segment sum."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _dims(t: Tensor | torch.Size) -> str:
    return str(list(t.shape if isinstance(t, Tensor) else t))


def check_floating(**tensors: Tensor | None) -> None:
    """TypeError for any non-floating-point tensor (token ids passed by mistake, masks in the wrong slot)."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}, but the ops need floating-point tensors")


def check_linear_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None,
    chunk_size: int,
    *,
    g_per_key: bool = False,
    **per_head: Tensor,
) -> None:
    """Validate the inputs of a linear recurrence: q, k [B, T, H, K], v [B, T, H, V], g and ``per_head``
    [B, T, H] (g [B, T, H, K] with ``g_per_key``: one log-decay per key channel), initial_state [B, H, K, V].
    Raises ValueError naming the tensor and both shapes."""
    check_floating(q=q, k=k, v=v, g=g, initial_state=initial_state, **per_head)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {_dims(q)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError(f"q has shape {_dims(q)}: the sequence must hold at least one token")
    if k.shape != q.shape:
        raise ValueError(f"k has shape {_dims(k)} but q has {_dims(q)}; they must match")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v has shape {_dims(v)} but q has [{B}, {T}, {H}, ...]; v must be [B, T, H, V]")
    if g_per_key and g.shape != q.shape:
        raise ValueError(f"g has shape {_dims(g)} but q has {_dims(q)}; g must be [B, T, H, K], one per key channel")
    per_token = per_head if g_per_key else {"g": g, **per_head}
    for name, t in per_token.items():
        if t.shape != q.shape[:3]:
            raise ValueError(f"{name} has shape {_dims(t)} but q has [{B}, {T}, {H}, ...]; {name} must be [B, T, H]")
    expected = [B, H, K, v.shape[-1]]
    if initial_state is not None and list(initial_state.shape) != expected:
        raise ValueError(f"initial_state has shape {_dims(initial_state)} but q and v give [B, H, K, V] = {expected}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and decays are accumulated in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else scale


def to_chunks(x: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in ``dtype``, zero-padded at the end to N·C steps.

    Zeros are identity steps for both recurrences (g = 0: no decay; k = 0 or β = 0: no write).
    """
    T = x.shape[1]
    n_chunks = -(-T // chunk_size)
    x = x.to(dtype).transpose(1, 2)  # [B, H, T, ...]
    pad = (0, 0) * (x.dim() - 3) + (0, n_chunks * chunk_size - T)
    x = F.pad(x, pad)
    return x.reshape(*x.shape[:2], n_chunks, chunk_size, *x.shape[3:])


def from_chunks(x: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """[B, H, N, C, D] -> [B, T, H, D] in ``dtype``, dropping the padded tail."""
    x = x.reshape(*x.shape[:2], -1, x.shape[-1])[:, :, :length]
    return x.transpose(1, 2).to(dtype)


def segsum(g: Tensor) -> Tensor:
    """Pairwise log-decays within a chunk: out[..., i, j] = g_{j+1} + ... + g_i for i ≥ j, −inf for i < j.

    g: [..., C] -> [..., C, C]. Summing each segment directly (not as G_i − G_j from a cumulative sum)
    avoids cancellation, and masking *before* ``exp`` keeps the upper triangle at exp(−inf) = 0 instead of
    overflowing to inf, which would poison gradients even when masked afterwards (docs/design.md §13.1).
    """
    C = g.shape[-1]
    x = g.unsqueeze(-1).expand(*g.shape, C)  # x[..., i, j] = g_i
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = x.cumsum(dim=-2)  # out[..., i, j] = sum of g_r for j < r <= i
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def delta_chunk_scan(
    u_free: Tensor,
    w: Tensor,
    q_decayed: Tensor,
    scores: Tensor,
    k_decayed: Tensor,
    chunk_decay: Tensor,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """The loop over chunks of the chunked delta rules (Gated DeltaNet, KDA): the only part that depends on the state a
    chunk starts from. Per chunk, from state S_0 [B, H, K, V]: the pseudo-values u = U' − W S_0, the outputs
    o = Q_decayed S_0 + scores u, and the next state S = chunk_decay ⊙ S_0 + K_decayedᵀ u.

    u_free [B, H, N, C, V]; w, q_decayed, k_decayed [B, H, N, C, K]; scores [B, H, N, C, C]; chunk_decay
    [B, H, N, 1, 1] (a decay per head) or [B, H, N, K, 1] (per key channel). Returns the unscaled outputs
    [B, H, N, C, V] and the final state.
    """
    outs = []
    # unbind once: indexing [:, :, n] inside the loop would make autograd add a full-size zero gradient per chunk.
    per_chunk = (t.unbind(2) for t in (u_free, w, q_decayed, scores, k_decayed.transpose(-1, -2), chunk_decay))
    for u_n, w_n, q_n, scores_n, k_t_n, decay_n in zip(*per_chunk, strict=True):
        u = u_n - w_n @ state  # [B, H, C, V]
        outs.append(q_n @ state + scores_n @ u)
        state = decay_n * state + k_t_n @ u
    return torch.stack(outs, dim=2), state


class DerivedFromMasks:
    """The last value derived from some mask tensors, reused while the very same tensors come back unchanged.

    Every layer of one forward passes the model's same ``attn_rows`` / ``key_mask`` tensors to attention, so what an
    attention backend derives from them (a block mask, the blocks to compute) is built once per forward, not once per
    layer. A hit needs the same tensor objects (held by weak reference, so a freed and reallocated mask never matches)
    at the same ``_version`` (an in-place change invalidates), and equal ``extra`` (shapes, device).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple = ()
        self._value: Any = None

    def get(self, masks: tuple[Tensor | None, ...], extra: Hashable, build: Callable[[], Any]) -> Any:
        if torch.compiler.is_compiling():
            return build()
        key = (tuple(None if m is None else m._version for m in masks), extra)
        alive = len(self._refs) == len(masks) and all(
            (r is None and m is None) or (r is not None and r() is m) for r, m in zip(self._refs, masks, strict=True)
        )
        if not (alive and key == self._key):
            self._value = build()
            self._key, self._refs = key, tuple(None if m is None else weakref.ref(m) for m in masks)
        return self._value
