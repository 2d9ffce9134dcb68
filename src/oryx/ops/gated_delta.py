"""Gated delta rule (Gated DeltaNet), in pure PyTorch.

Per head, with a [K, V] state S:

    S_t = exp(g_t) · (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

q and k are expected L2-normalised by the caller (then I − β k kᵀ is a contraction for β ∈ [0, 1]).

Three implementations, equal up to rounding:
- ``gated_delta_rule_chunked``: the WY/UT chunked form (one triangular solve per chunk, then a recurrence over
  chunks), O(T) cost, the default;
- ``gated_delta_rule_recurrent``: ``gated_delta_step`` looped over T, the decoding path;
- ``gated_delta_step``: one token.

The torch backend is registered with ``dispatch`` as op ``"gated_delta_rule"``; a backend function is called
as ``fn(q, k, v, g, beta, scale=, initial_state=, output_final_state=, chunk_size=)`` on checked inputs with
``scale`` resolved.
"""

from __future__ import annotations

import torch

from oryx.ops import dispatch
from oryx.ops.common import (
    check_linear_inputs,
    delta_chunk_scan,
    from_chunks,
    resolve_scale,
    segsum,
    state_dtype,
    to_chunks,
)

Tensor = torch.Tensor


def gated_delta_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence.

    q, k: [B, H, K]; v: [B, H, V]; g, beta: [B, H]; state: [B, H, K, V].
    Returns o [B, H, V] in q's dtype and the new state [B, H, K, V] in float32 (float64 for float64 inputs).
    """
    out_dtype, dtype = q.dtype, state_dtype(q.dtype)
    scale = resolve_scale(scale, q.shape[-1])
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    state = g.exp()[..., None, None] * state.to(dtype)
    # Delta rule: write β·(v − what the decayed state already returns for k), so k now reads back ≈ v.
    error = v - torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + (beta[..., None] * k)[..., :, None] * error[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def gated_delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``gated_delta_step`` looped over T (shapes as in ``gated_delta_rule``)."""
    B, T, H, K = q.shape
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=state_dtype(q.dtype)) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        o_t, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outs.append(o_t)
    return torch.stack(outs, dim=1), (state if output_final_state else None)


def gated_delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule in the WY/UT representation. Shapes as in ``gated_delta_rule``.

    Within a chunk that starts from state S_0, with G_i the cumulative log-decay since the chunk start,
    S_i = exp(G_i) S_0 + Σ_{j≤i} exp(G_i − G_j) k_j u_jᵀ, where the "pseudo-values"
    u_j = β_j (v_j − exp(G_j) S_0ᵀ k_j − Σ_{i<j} exp(G_j − G_i) (k_j·k_i) u_i) are what each step writes.
    That is a unit lower-triangular system (I + A) U = βV − (β exp(G) K) S_0, whose solution splits into a
    part independent of S_0 (solved for all chunks at once) and a part linear in S_0: U = U' − W S_0.
    Only the last product needs the incoming state, so the loop over chunks costs O(T·K·V); the rest is
    chunk-parallel, O(T·C·(C + K + V)).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = state_dtype(q.dtype)
    scale = resolve_scale(scale, K)
    # [B, H, N, C, D] and [B, H, N, C]; padded steps have g = 0 and k = v = β = 0: they leave the state as is.
    qc, kc, vc = (to_chunks(x, chunk_size, dtype) for x in (q, k, v))
    gc, bc = (to_chunks(x, chunk_size, dtype) for x in (g, beta))
    decay = segsum(gc).exp()  # [B, H, N, C, C]: exp(G_i − G_j) below the diagonal, 0 above
    decay_from_start = gc.cumsum(-1).exp()  # [B, H, N, C]: exp(G_i)
    decay_to_end = decay[..., -1, :]  # [B, H, N, C]: exp(G_C − G_j)

    # 1. The triangular system: A_ij = β_i exp(G_i − G_j) (k_i·k_j) for j < i.
    A = (bc[..., None] * decay * (kc @ kc.transpose(-1, -2))).tril(-1)
    eye = torch.eye(chunk_size, dtype=dtype, device=q.device)

    # 2. Solve (I + A) [U', W] = [β V, β exp(G) K] once for every chunk (the WY/UT transform).
    rhs = torch.cat([bc[..., None] * vc, (bc * decay_from_start)[..., None] * kc], dim=-1)
    u_free, w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    # 3. Causal, decayed query-key weights inside each chunk (diagonal included: o_i reads S_i, after step i).
    scores = (qc @ kc.transpose(-1, -2)) * decay
    q_decayed = qc * decay_from_start[..., None]
    k_decayed = kc * decay_to_end[..., None]

    # 4. Recurrence over chunks: the pseudo-values, outputs and next state are the only S_0-dependent parts.
    state = q.new_zeros(B, H, K, V, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outs, state = delta_chunk_scan(
        u_free, w, q_decayed, scores, k_decayed, decay_from_start[..., -1, None, None], state
    )
    o = from_chunks(scale * outs, T, q.dtype)
    return o, (state if output_final_state else None)


def _torch_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    # One token (decoding) is a single step; anything longer takes the chunked form.
    if q.shape[1] == 1:
        return gated_delta_rule_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state)
    return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


dispatch.register("gated_delta_rule", "torch", _torch_backend)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

    Args:
        q, k: [B, T, H, K], already L2-normalised by the caller.
        v: [B, T, H, V].
        g: [B, T, H] log-space decay (≤ 0).
        beta: [B, T, H] write strength, in [0, 1].
        scale: defaults to K**-0.5.
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: also return the state after the last token.
        backend: "auto", "torch" or a registered fast backend (see ``oryx.ops.dispatch``).
        chunk_size: chunk length of the chunked form (any T works; the tail is padded with identity steps).

    Returns:
        o [B, T, H, V] in q's dtype, and the final state [B, H, K, V] in float32 (or None).
    """
    check_linear_inputs(q, k, v, g, initial_state, chunk_size, beta=beta)
    impl = dispatch.resolve("gated_delta_rule", q, backend).fn
    return impl(
        q,
        k,
        v,
        g,
        beta,
        scale=resolve_scale(scale, q.shape[-1]),
        initial_state=initial_state,
        output_final_state=output_final_state,
        chunk_size=chunk_size,
    )
