"""Causal attention of the selected query rows on CUDA: block-sparse ``flex_attention``, or SDPA for a few rows.

Work follows the attention-mode rows: query rows are grouped in blocks of ``BLOCK`` (128) and a block that holds no
selected row is given no key block at all, so it costs nothing, forward and backward. A block that holds at least one
selected row attends, for every one of its rows, over every key block at or before its last row; key blocks wholly
before the block's first row (and free of padding) are "full" blocks that skip the mask function. The rows of an active
block that are not selected are computed too and then replaced by exact zeros, which is what the reference returns, so
token-granular switches stay exact (the mixer then picks per token). A row with no valid key at all is zero as well.

flex is compiled for static shapes, at a few lengths only: queries and keys are padded at the end to
``compiled_length`` (whole blocks, rounded up to 2^k or 3·2^k blocks, ≤ 33 % padding and none at 2k/8k/32k). Padded
query rows are never selected (no work) and padded keys come after every real row (causally hidden), so the padding
costs a copy, not attention. Without it every new length compiled flex again and, once dynamo turned the lengths
dynamic, float32 flex kernels with Oryx-TM's head dims took minutes to compile (benchmarks/RESULTS.md).

With at most ``FEW_ROWS`` query rows (decoding, short continuations) the block mask would cost more than the
attention: those calls go to ``scaled_dot_product_attention`` over the whole cache with an explicit mask (none at all
for one row without padding, which lets SDPA pick its flash kernel).

Backend contract (``oryx.ops.attention``): ``fn(q, k, v, query_mask=, key_mask=, scale=)`` with q [B, Tq, H, D],
k [B, Tk, H, D], v [B, Tk, H, Dv], row i of q at key position Tk − Tq + i; returns [B, Tq, H, Dv] in q's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from oryx.ops import dispatch
from oryx.ops.backends._common import FAST_DTYPES, importable
from oryx.ops.common import DerivedFromMasks

Tensor = torch.Tensor

BLOCK = 128  # flex block size for queries and keys (also the training mix's chunk: a chunk maps to one block)
FEW_ROWS = 16  # up to this many query rows, SDPA with a dense [Tq, Tk] mask is cheaper than building a block mask
# Compiled variants of flex_attention one process may hold: one per dtype, grad mode, head count, batch size and pair
# of compiled lengths (prompts of any length up to 128k fall in about 20 length buckets). Past dynamo's default of 8,
# flex silently runs eagerly, materialising every score ([B, H, Tq, Tk]: out of memory at long contexts); a process
# that trains, evaluates and generates can pass 8 (the GPU test module does).
RECOMPILE_LIMIT = 64

# flex_attention's kernel options (block sizes, warps, stages), None for its own choice per card; benchmarks/gpu.py
# flex-options measures alternatives on a card. A change compiles flex again (the options are constants of its kernel).
KERNEL_OPTIONS: dict[str, int] | None = None
_compiled_flex: Callable | None = None
_block_masks = DerivedFromMasks()  # one BlockMask per forward, shared by its layers


def _flex(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """``flex_attention`` compiled once per process, on first use, kept compiled past dynamo's recompile limit."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    if torch.compiler.is_compiling():  # inside a compiled model: inlined there, under the caller's settings
        return _compiled_flex(q, k, v, block_mask=mask, scale=scale, kernel_options=KERNEL_OPTIONS)
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
        return _compiled_flex(q, k, v, block_mask=mask, scale=scale, kernel_options=KERNEL_OPTIONS)


def compiled_length(n_tokens: int) -> int:
    """The length flex runs at for ``n_tokens`` queries or keys: whole blocks, rounded up to the next 2^k or 3·2^k
    blocks (integer arithmetic only: it runs inside compiled models, where dynamo cannot call ``bisect``)."""
    blocks = -(-n_tokens // BLOCK)
    power = 1 << max(0, blocks - 1).bit_length()  # the smallest 2^k >= blocks
    three = 3 * power // 4  # the 3·2^j just below it (a whole number of blocks from 4 on)
    return BLOCK * (three if power >= 4 and three >= blocks else power)


def _pad_length(x: Tensor, length: int) -> Tensor:
    """[B, T, H, D] -> [B, length, H, D], zeros appended: the layout (strides) of an unpadded input, which the
    compiled kernel is specialised to as well."""
    return x if x.shape[1] == length else F.pad(x, (0, 0, 0, 0, 0, length - x.shape[1]))


def _pad_rows(mask: Tensor, length: int, value: bool) -> Tensor:
    """[B, T] bool -> [B, length] (length ≥ T), filled with ``value``."""
    return F.pad(mask, (0, length - mask.shape[1]), value=value)


def _blocks_to_indices(blocks: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """[B, Nq, Nk] bool -> (count [B, H, Nq], indices [B, H, Nq, Nk]) int32, listed blocks first (in key order),
    repeated for each of the H heads.

    Per head, not a broadcast head dimension of 1: flex's kernel finds a sequence's lists at (b·H_mask + h) times the
    head stride, and for a size-1 head dimension of a tensor built inside a compiled graph inductor may choose any
    stride, 0 included; then every sequence read the first one's lists (benchmarks/RESULTS.md, 2026-12-02). Real
    strides cost H copies of lists of Nq·Nk ints."""
    count = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[:, None].repeat(1, heads, 1), indices[:, None].repeat(1, heads, 1, 1)


def block_mask(
    query_mask: Tensor | None, key_mask: Tensor | None, B: int, H: int, Tq: int, Tk: int, device: torch.device
):
    """The ``BlockMask`` of causal attention restricted to the query blocks that hold a selected row, for H heads.

    query_mask [B, Tq] and key_mask [B, Tk] bool or None; row i sits at key position Tk − Tq + i. The mask is for
    queries and keys padded to ``compiled_length`` (its ``seq_lengths``), where padded rows are unselected.
    """
    from torch.nn.attention.flex_attention import BlockMask

    offset = Tk - Tq
    Pq, Pk = compiled_length(Tq), compiled_length(Tk)
    nq, nk = Pq // BLOCK, Pk // BLOCK
    starts = torch.arange(nq, device=device) * BLOCK
    first_row = offset + starts  # key position of each query block's first and last row
    last_row = offset + torch.clamp(starts + BLOCK, max=Tq) - 1
    key_start = torch.arange(nk, device=device) * BLOCK
    visible = key_start[None, :] <= last_row[:, None]  # [Nq, Nk]: some key of block j is at or before a row
    before = key_start[None, :] + BLOCK - 1 <= first_row[:, None]  # all of block j is before every row
    if query_mask is None:
        query_mask = torch.ones(B, Tq, dtype=torch.bool, device=device)
    active = _pad_rows(query_mask, Pq, False).view(B, nq, BLOCK).any(-1)
    if key_mask is None:
        any_key = (key_start < Tk)[None].expand(B, nk)  # blocks of padding only are skipped
        all_keys = (key_start + BLOCK <= Tk)[None].expand(B, nk)  # a block holding padding is never "full"
    else:
        key_mask = _pad_rows(key_mask, Pk, False)
        any_key, all_keys = key_mask.view(B, nk, BLOCK).any(-1), key_mask.view(B, nk, BLOCK).all(-1)
    live = active[:, :, None] & any_key[:, None, :]  # [B, Nq, Nk]: blocks of only padding keys are skipped
    full = live & before & all_keys[:, None, :]
    partial = live & visible & ~full
    # A tensor, not an int: the compiled kernel would otherwise be specialised to (and recompiled for) each offset.
    shift = torch.tensor(offset, device=device)

    if key_mask is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + shift

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + shift) & key_mask[b, kv_idx]

    return BlockMask.from_kv_blocks(
        *_blocks_to_indices(partial, H),
        *_blocks_to_indices(full, H),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(Pq, Pk),
    )


def _shared_block_mask(
    query_mask: Tensor | None, key_mask: Tensor | None, B: int, H: int, Tq: int, Tk: int, device: torch.device
):
    """``block_mask``, built once per forward: building it costs about a hundred small launches (milliseconds of
    host time per call, more than the attention itself at 2.5 % of the rows)."""
    return _block_masks.get(
        (query_mask, key_mask), (B, H, Tq, Tk, device), lambda: block_mask(query_mask, key_mask, B, H, Tq, Tk, device)
    )


def _rows_with_keys(key_mask: Tensor, Tq: int) -> Tensor:
    """[B, Tk] -> [B, Tq]: whether query row i has any valid key at or before its position Tk − Tq + i."""
    return key_mask.cumsum(1, dtype=torch.int32)[:, key_mask.shape[1] - Tq :] > 0


def _sdpa_rows(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """All Tq (few) rows through SDPA with an explicit causal/padding mask; [B, H, T, D] in and out."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = None
    if Tq > 1 or key_mask is not None:
        positions = torch.arange(Tk - Tq, Tk, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= positions[:, None]  # [Tq, Tk]
        if key_mask is not None:
            mask = mask & key_mask[:, None, :]  # [B, Tq, Tk]
            # A row without any valid key would be a softmax over nothing (NaN); let it see everything, then the
            # caller zeros it.
            mask = mask | ~mask.any(-1, keepdim=True)
            mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _flex_backend(
    q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor | None, key_mask: Tensor | None, scale: float
) -> Tensor:
    B, Tq, H = q.shape[:3]
    Tk = k.shape[1]
    if Tq <= FEW_ROWS:
        o = _sdpa_rows(*(x.transpose(1, 2) for x in (q, k, v)), key_mask, scale)  # [B, H, T, D]
    else:
        mask = _shared_block_mask(query_mask, key_mask, B, H, Tq, Tk, q.device)
        Pq, Pk = mask.seq_lengths
        padded = (_pad_length(x, P).transpose(1, 2) for x, P in ((q, Pq), (k, Pk), (v, Pk)))
        o = _flex(*padded, mask, scale)[:, :, :Tq]
    o = o.transpose(1, 2)
    keep = query_mask
    if key_mask is not None:
        has_key = _rows_with_keys(key_mask, Tq)
        keep = has_key if keep is None else keep & has_key
    # Exact zeros (not products with 0, which would keep a NaN) for unselected rows and rows without keys.
    if keep is None:
        return o
    return torch.where(keep[:, :, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


def _supports(x: Tensor) -> bool:
    return x.is_cuda and x.dtype in FAST_DTYPES and importable("triton")


dispatch.register("causal_attention", "flex", _flex_backend, supports=_supports, priority=10)
