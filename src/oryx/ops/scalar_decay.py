"""Scalar-decay linear recurrence (Mamba-2's SSD), in pure PyTorch.

Per head, with a [K, V] state S:

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Mamba-2 maps onto it as q = C, k = dt·B, v = x, g = dt·A (the mixer builds these and adds the D skip itself).

Three implementations, equal up to rounding:
- ``scalar_decay_rule_chunked``: the chunked parallel form (mamba's ``ssd_minimal``), O(T) cost, the default;
- ``scalar_decay_rule_recurrent``: ``scalar_decay_step`` looped over T, the decoding path;
- ``scalar_decay_step``: one token.

This module also holds the helpers that the gated delta rule reuses (input checks, chunking, ``segsum``).
The torch backend is registered with ``dispatch`` as op ``"scalar_decay_rule"``; a backend function is called
as ``fn(q, k, v, g, scale=, initial_state=, output_final_state=, chunk_size=)`` on checked inputs with
``scale`` resolved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oryx.ops import dispatch

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# Helpers shared with the gated delta rule
# ------------------------------------------------------------------------------------------------------------


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
    **per_head: Tensor,
) -> None:
    """Validate the inputs of a linear recurrence: q, k [B, T, H, K], v [B, T, H, V], g and ``per_head``
    [B, T, H], initial_state [B, H, K, V]. Raises ValueError naming the tensor and both shapes."""
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
    for name, t in {"g": g, **per_head}.items():
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
    overflowing to inf, which would poison gradients even when masked afterwards (DESIGN.md §8).
    """
    C = g.shape[-1]
    x = g.unsqueeze(-1).expand(*g.shape, C)  # x[..., i, j] = g_i
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = x.cumsum(dim=-2)  # out[..., i, j] = sum of g_r for j < r <= i
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return out.masked_fill(~lower, float("-inf"))


# ------------------------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------------------------


def scalar_decay_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence.

    q, k: [B, H, K]; v: [B, H, V]; g: [B, H]; state: [B, H, K, V].
    Returns o [B, H, V] in q's dtype and the new state [B, H, K, V] in float32 (float64 for float64 inputs).
    """
    out_dtype, dtype = q.dtype, state_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    state = g.exp()[..., None, None] * state.to(dtype) + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def scalar_decay_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``scalar_decay_step`` looped over T (shapes as in ``scalar_decay_rule``)."""
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=state_dtype(q.dtype)) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o_t, state = scalar_decay_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale)
        outs.append(o_t)
    return torch.stack(outs, dim=1), (state if output_final_state else None)


def scalar_decay_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked SSD: quadratic attention-like work inside chunks of ``chunk_size``, a recurrence between them.

    Cost O(T·C·(K+V) + T·K·V). Shapes as in ``scalar_decay_rule``.
    """
    B, T, H, K = q.shape
    dtype = state_dtype(q.dtype)
    scale = resolve_scale(scale, K)
    # [B, H, N, C, D] and [B, H, N, C]; padded steps have g = 0 and k = v = 0: they leave the state as is.
    qc, kc, vc = (to_chunks(x, chunk_size, dtype) for x in (q, k, v))
    gc = to_chunks(g, chunk_size, dtype)
    decay = segsum(gc).exp()  # [B, H, N, C, C]: exp(G_i − G_j) below the diagonal, 0 above
    decay_from_start = gc.cumsum(-1).exp()  # [B, H, N, C]: exp(G_i), what the incoming state has decayed by at i
    decay_to_end = decay[..., -1, :]  # [B, H, N, C]: exp(G_C − G_j), what a write at j has decayed by at chunk end

    # 1. Outputs from inside the chunk (the diagonal blocks): (Q Kᵀ ∘ decay) V.
    scores = (qc @ kc.transpose(-1, -2)) * decay
    o_intra = scores @ vc

    # 2. What each chunk alone writes into the state by its end: Σ_j exp(G_C − G_j) k_j v_jᵀ.
    chunk_writes = (kc * decay_to_end[..., None]).transpose(-1, -2) @ vc  # [B, H, N, K, V]

    # 3. Pass the state from chunk to chunk (sequential over N = T/C chunks, so O(T) overall).
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    incoming = []
    # unbind once: indexing [:, :, n] inside the loop would make autograd add a full-size zero gradient per chunk.
    chunk_decays = decay_from_start[..., -1, None, None].unbind(2)
    for chunk_decay, writes in zip(chunk_decays, chunk_writes.unbind(2), strict=True):
        incoming.append(state)
        state = chunk_decay * state + writes
    incoming_states = torch.stack(incoming, dim=2)  # [B, H, N, K, V]

    # 4. Outputs from the state carried into each chunk, decayed to each position.
    o_inter = (qc * decay_from_start[..., None]) @ incoming_states

    o = from_chunks(scale * (o_intra + o_inter), T, q.dtype)
    return o, (state if output_final_state else None)


def _torch_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    # One token (decoding) is a single step; anything longer takes the chunked form.
    if q.shape[1] == 1:
        return scalar_decay_rule_recurrent(q, k, v, g, scale, initial_state, output_final_state)
    return scalar_decay_rule_chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size)


dispatch.register("scalar_decay_rule", "torch", _torch_backend)


def scalar_decay_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """S_t = exp(g_t) S_{t−1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t (Mamba-2 SSD).

    Args:
        q, k: [B, T, H, K].
        v: [B, T, H, V].
        g: [B, T, H] log-space decay (≤ 0 for a contraction).
        scale: defaults to K**-0.5.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "auto", "torch" or a registered fast backend (see ``oryx.ops.dispatch``).
        chunk_size: chunk length of the chunked form (any T works; the tail is padded with identity steps).

    Returns:
        o [B, T, H, V] in q's dtype, and the final state [B, H, K, V] in float32 (or None).
    """
    check_linear_inputs(q, k, v, g, initial_state, chunk_size)
    impl = dispatch.resolve("scalar_decay_rule", q, backend).fn
    return impl(
        q,
        k,
        v,
        g,
        scale=resolve_scale(scale, q.shape[-1]),
        initial_state=initial_state,
        output_final_state=output_final_state,
        chunk_size=chunk_size,
    )
