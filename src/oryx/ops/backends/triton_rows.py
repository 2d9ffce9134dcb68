"""Causal attention of the selected query rows on CUDA: our FlashAttention-style Triton kernels over active blocks.

The work follows the attention-mode rows as in the flex backend (``backends/flex.py``): query rows are grouped in blocks
of ``ROWS`` (128); a block holding at least one selected row is *active* and attends, for every one of its rows, over
its causal key prefix; an inactive block costs one flag read. The flags are computed on the device from
``query_mask`` (no host synchronisation: the grid always covers every block, whatever is selected), so one compiled
graph serves every schedule, and no block mask is built.

Algorithm (``triton_rows_kernels.py``), q [B, Tq, H, D], k [B, Tk, H, D], v [B, Tk, H, Dv], row i at key position
Tk − Tq + i:

1. active [B, NQ] = whether each 128-row block holds a selected row (torch, on the device).
2. Forward, one program per (query block, batch·head): an inactive block returns. An active one loops over its key
   tiles with an online softmax (running max m, sum l, fp32 accumulator): first the tiles wholly before its first row
   without a causal mask, then the diagonal tiles with one (key padding masked in both); o = acc / l and
   lse = m + log l. Unselected rows and rows without a valid key are written as exact zeros with lse = +inf.
3. Backward: delta = rowsum(dO·o) − dlse per row of the active blocks; a dK/dV program per key tile loops over the
   query steps of the active blocks at or after it (a device-built list of them: p = exp(s − lse), dv += pᵀdO,
   ds = p·(dO vᵀ − delta), dk += dsᵀq); a dQ program per query step of an active block loops over its causal prefix
   (dq += ds k). Rows with lse = +inf have p = 0, so their gradients are exact zeros.

Dots take the inputs' dtype (bf16/fp16 on the tensor cores; float32 as three-pass TF32, about float32 accuracy) and
accumulate in float32. Head dims D, Dv ∈ ``HEAD_DIMS`` (Dv may differ from D); another Dv goes to the flex backend
(``supports`` sees q only). The kernels autotune a few tile configs per (D, Dv, key padding, dtype) on their first call
(``ORYX_ROWS_AUTOTUNE=0``: the default config only). Offsets are int32: a q, k or v of 2³¹ elements or more is beyond
them.

Custom ops, so that torch.compile (fullgraph) sees through the kernels: ``oryx::rows_attention`` (o, lse) with a fake
implementation and registered autograd calling ``oryx::rows_attention_backward`` (its own fake). Triton is imported on
the first call only (``triton_rows_kernels``), so ``import oryx`` works without it. Registered below flex's priority
until it is validated and timed on a card.

Backend contract (``oryx.ops.attention``): ``fn(q, k, v, query_mask=, key_mask=, scale=)``; returns [B, Tq, H, Dv] in
q's dtype; unselected rows and rows with no valid key are zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oryx.ops import dispatch
from oryx.ops.backends import flex
from oryx.ops.backends._common import FAST_DTYPES, common_dtype, importable

Tensor = torch.Tensor

ROWS = 128  # query rows per active flag: the training mix's chunk (the kernels' ROWS_ and the forward's BLOCK_M)
HEAD_DIMS = (32, 64, 128)  # head dims the kernels are built for (powers of two; 128 is Oryx's q/k head dim)
LOG2E = math.log2(math.e)


def active_blocks(query_mask: Tensor | None, B: int, Tq: int, device: torch.device) -> Tensor:
    """[B, Tq] bool (None = every row) -> [B, NQ] int32: whether each block of ``ROWS`` rows holds a selected row."""
    n = -(-Tq // ROWS)
    if query_mask is None:
        return torch.ones(B, n, dtype=torch.int32, device=device)
    padded = F.pad(query_mask, (0, n * ROWS - Tq), value=False)
    return padded.view(B, n, ROWS).any(-1).to(torch.int32)


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _mask_arg(mask: Tensor | None, placeholder: Tensor) -> Tensor:
    """A bool mask as uint8 (zero-copy), or a placeholder pointer when absent (the kernel then never reads it)."""
    return placeholder if mask is None else mask.contiguous().view(torch.uint8)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get three-pass TF32 dots (about float32 accuracy, on the tensor cores; IEEE dots spill the
    # registers and take minutes to compile at D = 128); one TF32 pass would cost them about 1e-3.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@torch.library.custom_op("oryx::rows_attention", mutates_args=())
def rows_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    active: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of the selected rows: o [B, Tq, H, Dv] in q's dtype and lse [B, H, Tq] float32 (+inf for rows
    that are unselected or see no valid key). q, k, v share one dtype; active from ``active_blocks``."""
    from oryx.ops.backends import triton_rows_kernels as kernels

    B, Tq, H, D = q.shape
    Tk, Dv, NQ = k.shape[1], v.shape[-1], active.shape[1]
    o = torch.zeros(B, Tq, H, Dv, dtype=q.dtype, device=q.device)  # inactive blocks are never written
    lse = torch.full((B, H, Tq), float("inf"), dtype=torch.float32, device=q.device)
    kernels.fwd_kernel[(NQ, B * H)](
        q, k, v, o, lse, active, _mask_arg(query_mask, active), _mask_arg(key_mask, active),
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, Tq, Tk, NQ, scale * LOG2E,
        D=D, DV=Dv, HAS_QMASK=query_mask is not None, HAS_KMASK=key_mask is not None, DOT_PREC=_precision(q.dtype),
    )  # fmt: skip
    return o, lse


@rows_attention.register_fake
def _(q, k, v, active, query_mask, key_mask, scale):
    B, Tq, H, _ = q.shape
    return q.new_empty(B, Tq, H, v.shape[-1]), q.new_empty(B, H, Tq, dtype=torch.float32)


@torch.library.custom_op("oryx::rows_attention_backward", mutates_args=())
def rows_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    active: Tensor,
    key_mask: Tensor | None,
    grad_o: Tensor,
    grad_lse: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of ``rows_attention`` for the output gradients (grad_o, grad_lse), contiguous, in
    q's dtype; dq is zero outside the selected rows."""
    from oryx.ops.backends import triton_rows_kernels as kernels

    B, Tq, H, D = q.shape
    Tk, Dv, NQ = k.shape[1], v.shape[-1], active.shape[1]
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    kernels.delta_kernel[(NQ, B * H)](
        o, grad_o, lse if grad_lse is None else grad_lse.contiguous(), delta, active, *_strides(o), *_strides(grad_o),
        H, Tq, NQ, DV=Dv, HAS_DLSE=grad_lse is not None, BLOCK_M=ROWS, num_warps=8,  # 4 warps spill at Dv = 128
    )  # fmt: skip
    dq = torch.zeros(B, Tq, H, D, dtype=q.dtype, device=q.device)  # inactive blocks are never written
    dk = torch.empty(B, Tk, H, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, Tk, H, Dv, dtype=q.dtype, device=q.device)
    km = _mask_arg(key_mask, active)
    # The dK/dV loop walks a list of the active blocks (no per-step branch): each sequence's active blocks first, in
    # order, and how many come before each block.
    order = torch.argsort((active == 0).to(torch.int8), dim=1, stable=True).to(torch.int32)
    prefix = F.pad(active.cumsum(1, dtype=torch.int32), (1, 0))
    sizes = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_o), H, Tq, Tk, NQ, scale, scale * LOG2E)
    flags = {"D": D, "DV": Dv, "HAS_KMASK": key_mask is not None, "DOT_PREC": _precision(q.dtype), "ROWS_": ROWS}
    kernels.dkdv_kernel[lambda meta: (-(-Tk // meta["BLOCK_N"]), B * H)](
        q, k, v, grad_o, lse, delta, order, prefix, km, dk, dv, *sizes, **flags
    )
    kernels.dq_kernel[lambda meta: (-(-Tq // meta["BLOCK_M"]), B * H)](
        q, k, v, grad_o, lse, delta, active, km, dq, *sizes, **flags
    )
    return dq, dk, dv


@rows_attention_backward.register_fake
def _(q, k, v, o, lse, active, key_mask, grad_o, grad_lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels write them


def _setup(ctx, inputs, output) -> None:
    q, k, v, active, _, key_mask, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, *output, active, key_mask)


def _backward(ctx, grad_o: Tensor | None, grad_lse: Tensor | None):
    q, k, v, o, lse, active, key_mask = ctx.saved_tensors
    grad_o = torch.zeros_like(o) if grad_o is None else grad_o.contiguous()  # only lse took part in the loss
    dq, dk, dv = rows_attention_backward(q, k, v, o, lse, active, key_mask, grad_o, grad_lse, ctx.scale)
    return dq, dk, dv, None, None, None, None


rows_attention.register_autograd(_backward, setup_context=_setup)


def _last_dim_contiguous(x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def rows_attention_backend(
    q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor | None, key_mask: Tensor | None, scale: float
) -> Tensor:
    """The ``causal_attention`` backend (contract in the module docstring)."""
    if v.shape[-1] not in HEAD_DIMS:
        return flex._flex_backend(q, k, v, query_mask, key_mask, scale)
    out_dtype, dtype = q.dtype, common_dtype(q, k, v)
    q, k, v = (_last_dim_contiguous(x, dtype) for x in (q, k, v))
    active = active_blocks(query_mask, q.shape[0], q.shape[1], q.device)
    o, _ = rows_attention(q, k, v, active, query_mask, key_mask, scale)
    return o.to(out_dtype)


def _supports(x: Tensor) -> bool:
    return x.is_cuda and x.dtype in FAST_DTYPES and x.shape[-1] in HEAD_DIMS and importable("triton")


dispatch.register("causal_attention", "triton_rows", rows_attention_backend, supports=_supports, priority=5)
