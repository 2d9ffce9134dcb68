"""Scalar-decay linear recurrence (Mamba-2's SSD), in pure PyTorch.

Per head, with a [K, V] state S:

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

Mamba-2 maps onto it as q = C, k = dt·B, v = x, g = dt·A (the mixer builds these and adds the D skip itself).

Three implementations, equal up to rounding:
- ``scalar_decay_rule_chunked``: the chunked parallel form (mamba's ``ssd_minimal``), O(T) cost, the default;
- ``scalar_decay_rule_recurrent``: ``scalar_decay_step`` looped over T, the decoding path;
- ``scalar_decay_step``: one token.

The torch backend is registered with ``dispatch`` as op ``"scalar_decay_rule"``; a backend function is called
as ``fn(q, k, v, g, scale=, initial_state=, output_final_state=, chunk_size=)`` on checked inputs with
``scale`` resolved.
"""

from __future__ import annotations

import torch

from oryx.ops import dispatch
from oryx.ops.common import (
    check_linear_inputs,
    from_chunks,
    resolve_scale,
    segsum,
    state_dtype,
    to_chunks,
)

Tensor = torch.Tensor


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
