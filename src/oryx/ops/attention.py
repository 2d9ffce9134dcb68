"""Causal softmax attention over selected query rows, in pure PyTorch.

Oryx computes attention outputs only for the tokens whose mode is attention, but over *all* earlier keys
(the KV cache holds every token). So the cost must follow the number of selected rows, not T²: query rows are
cut into blocks of ``QUERY_BLOCK`` consecutive positions, and a block is computed only for the sequences that
select at least one of its rows (batched: one call per block), scoring only against the keys up to its last row.
Unselected rows are zeros. The cost follows the number of blocks that hold attention-mode rows: exact for Oryx's
128-token mode chunks, while a lone selected row costs its whole block. Plain causal self-attention (every row,
no padding) is one fused ``scaled_dot_product_attention`` call.

``count_score_elements()`` measures that work honestly: every q·k score the implementation computes (per query
row, key and head, masked ones included) is added to the counters that are open.

The torch backend is registered with ``dispatch`` as op ``"causal_attention"``; a backend function is called
as ``fn(q, k, v, query_mask=, key_mask=, scale=)`` on checked inputs with ``scale`` resolved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from oryx.ops import dispatch
from oryx.ops.common import DerivedFromMasks, check_floating, state_dtype

Tensor = torch.Tensor

QUERY_BLOCK = 128  # rows per block; a block pays for keys up to its last row, so small blocks waste little


@dataclass
class ScoreCounter:
    """Running total of the q·k score elements computed (one per query row, key and head)."""

    value: int = 0


_open_counters: list[ScoreCounter] = []


@contextmanager
def count_score_elements() -> Iterator[ScoreCounter]:
    """Count the score elements that attention computes inside the ``with`` block (torch backend only)."""
    counter = ScoreCounter()
    _open_counters.append(counter)
    try:
        yield counter
    finally:
        _open_counters.remove(counter)


def _attend(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """Softmax attention of one block of query rows over a prefix of the keys.

    q: [..., H, R, D], rows at absolute key positions ``positions`` [R];
    k: [..., H, L, D] and v: [..., H, L, Dv], keys 0..L−1; key_mask: [..., L] bool (False = padding) or None.
    Returns [..., H, R, Dv]; a row without any allowed key gets zeros.
    """
    for counter in _open_counters:
        counter.value += q[..., 0].numel() * k.shape[-2]
    allowed = torch.arange(k.shape[-2], device=q.device) <= positions[:, None]  # [R, L]
    if key_mask is not None:
        allowed = allowed & key_mask[..., None, None, :]  # [..., 1, R, L]
    # A row without any allowed key would be a softmax over all −inf (NaN): let it see every key, then zero it.
    empty = ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


def _torch_backend(
    q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor | None, key_mask: Tensor | None, scale: float
) -> Tensor:
    B, Tq, H, _ = q.shape
    Tk, Dv = k.shape[1], v.shape[-1]
    offset = Tk - Tq  # absolute key position of query row 0
    out_dtype, dtype = q.dtype, state_dtype(q.dtype)
    qh, kh, vh = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]

    if query_mask is None and key_mask is None and Tq == Tk:
        # Plain causal self-attention: one fused call (which skips the blocks above the diagonal).
        for counter in _open_counters:
            counter.value += B * H * Tq * (Tq + 1) // 2
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return out.transpose(1, 2).to(out_dtype)
    # Blocks of QUERY_BLOCK consecutive rows; rows [i0, i1) need keys up to offset + i1. A block is computed only for
    # the sequences that select at least one of its rows (all sequences at once: one call per block, not per row),
    # and unselected rows of a computed block are zeroed afterwards.
    n_blocks = -(-Tq // QUERY_BLOCK)
    o = q.new_zeros(B, H, Tq, Dv, dtype=dtype)
    for block, seqs in enumerate(_sequences_per_block(query_mask, B, n_blocks, q.device)):
        if seqs is not None and seqs.numel() == 0:
            continue
        i0, i1 = block * QUERY_BLOCK, min((block + 1) * QUERY_BLOCK, Tq)
        end = offset + i1
        positions = torch.arange(offset + i0, end, device=q.device)
        rows = slice(None) if seqs is None else seqs
        mask = None if key_mask is None else key_mask[rows, :end]
        block_out = _attend(qh[rows, :, i0:i1], kh[rows, :, :end], vh[rows, :, :end], positions, mask, scale)
        o[rows, :, i0:i1] = block_out.to(dtype)  # CUDA autocast runs SDPA in bf16/fp16
    if query_mask is not None:
        o = o * query_mask[:, None, :, None]
    return o.transpose(1, 2).to(out_dtype)


_blocks_needed = DerivedFromMasks()  # the blocks and sequences to compute, once per forward (shared by its layers)


def _sequences_per_block(query_mask: Tensor | None, B: int, n_blocks: int, device: torch.device) -> list:
    """Per query block, the sequences that select one of its rows: None for all B (a slice, no gather), else an index
    tensor on ``device`` (possibly empty). Read back to the host once per forward (one sync, not one per block)."""

    def build() -> list:
        # A CUDA graph being captured, or a graph being compiled, cannot read the mask back: every block is computed
        # for every sequence (the unselected rows are zeroed afterwards). Compiling is asked first: dynamo cannot
        # trace is_current_stream_capturing.
        if (
            query_mask is None
            or torch.compiler.is_compiling()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        ):
            return [None] * n_blocks
        padded = F.pad(query_mask, (0, n_blocks * QUERY_BLOCK - query_mask.shape[1]))
        needed = padded.view(B, n_blocks, QUERY_BLOCK).any(-1).T.cpu()  # [n_blocks, B]
        return [
            None if bool(seqs.all()) else seqs.nonzero().squeeze(-1).to(device, non_blocking=True)
            for seqs in needed.unbind(0)
        ]

    return _blocks_needed.get((query_mask,), (B, n_blocks, device), build)


dispatch.register("causal_attention", "torch", _torch_backend)


def _check_mask(name: str, mask: Tensor | None, expected: list[int], what: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} has dtype {mask.dtype}; it must be a bool tensor ({what})")
    if list(mask.shape) != expected:
        raise ValueError(f"{name} has shape {list(mask.shape)} but expected {expected} ({what})")


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Causal softmax attention of the selected query rows over every valid key at or before them.

    Args:
        q: [B, Tq, H, D]; row i sits at absolute key position Tk − Tq + i (the queries are the last Tq
            positions, which is how a cached continuation calls it).
        k: [B, Tk, H, D] with Tk ≥ Tq.
        v: [B, Tk, H, Dv].
        query_mask: [B, Tq] bool, the rows to compute (None = all); unselected rows are zeros, cost nothing.
        key_mask: [B, Tk] bool, False marks padding keys, never attended (None = all valid).
        scale: defaults to D**-0.5.
        backend: "auto", "torch" or a registered fast backend (see ``oryx.ops.dispatch``).

    Returns:
        o [B, Tq, H, Dv] in q's dtype; zeros for unselected rows and for rows without any valid key.
    """
    check_floating(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {list(t.shape)}")
    B, Tq, _, D = q.shape
    Tk = k.shape[1]
    if Tq == 0:
        raise ValueError(f"q has shape {list(q.shape)}: there must be at least one query row")
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k has shape {list(k.shape)} but q has {list(q.shape)}; k must be [B, Tk, H, D]")
    if Tk < Tq:
        raise ValueError(
            f"k has shape {list(k.shape)} but q has {list(q.shape)}: {Tk} keys for {Tq} query rows; "
            "the queries are the last Tq key positions, so Tk ≥ Tq"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v has shape {list(v.shape)} but k has {list(k.shape)}; v must be [B, Tk, H, Dv]")
    _check_mask("query_mask", query_mask, [B, Tq], "rows to compute")
    _check_mask("key_mask", key_mask, [B, Tk], "valid keys")
    impl = dispatch.resolve("causal_attention", q, backend).fn
    return impl(q, k, v, query_mask=query_mask, key_mask=key_mask, scale=D**-0.5 if scale is None else scale)
