"""The Triton kernels of ``oryx.ops.backends.triton_rows``, which launches them (this module imports triton: it is
imported on first use only).

Layouts: q [B, Tq, H, D], k [B, Tk, H, D], v [B, Tk, H, Dv], o / dO [B, Tq, H, Dv] (last dim contiguous, any other
strides); lse and delta [B, H, Tq] float32; active [B, NQ] int32, one flag per block of ROWS_ (128) query rows; the
optional query and key masks [B, Tq] / [B, Tk] as uint8. Query row i sits at key position ``offset + i`` with
offset = Tk − Tq. The log-sum-exp is natural-log; the kernels work in base 2 (``exp2``, ``qk_scale`` = scale·log2 e;
1.4426950408889634 below is log2 e, a literal because a kernel reads only constexpr globals).
Rows that are unselected, or that see no valid key, get lse = +inf: every probability of theirs is then exactly 0 in
the backward, so their gradients (dq rows, their share of dk and dv) are exact zeros.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ORYX_ROWS_AUTOTUNE=0 runs each kernel's first config only (no autotuning: a quick first call, e.g. for tests).
AUTOTUNE = not INTERPRET and os.environ.get("ORYX_ROWS_AUTOTUNE", "1") != "0"

# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, the first the default. A few only:
# each costs a compile on a fresh card. Chosen from ptxas's resource use for sm_90 at D = 128 (bf16): BLOCK_M·D fp32
# accumulators need 8 warps at 128 rows, or spill.
# Forward: BLOCK_M is ROWS_ (one program per flag); BLOCK_N its key tile.
FWD_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3)]
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per step (divides ROWS_: a step never straddles two flags).
DKDV_TILES = [(64, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2)]
# dQ: BLOCK_M query rows per program (divides ROWS_), BLOCK_N keys per step.
DQ_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)]
# float32 inputs (a test and reference path, not the fast one): tiles whose operands fit in shared memory at D = 128.
FWD_TILES_FP32 = [(128, 32, 8, 2)]
DKDV_TILES_FP32 = [(32, 64, 8, 2)]
DQ_TILES_FP32 = [(64, 32, 8, 2)]


Tiles = list[tuple[int, int, int, int]]


def _autotune(tiles: Tiles, tiles_fp32: Tiles):
    """``triton.autotune`` over the 16-bit candidates, then the float32 ones, pruned by the inputs' dtype; each list's
    first only without autotuning, and the 16-bit default alone under the interpreter (which cannot time candidates)."""
    if INTERPRET:
        tiles, tiles_fp32 = tiles[:1], []
    elif not AUTOTUNE:
        tiles, tiles_fp32 = tiles[:1], tiles_fp32[:1]
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles + tiles_fp32
    ]

    def by_dtype(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        return configs[len(tiles) :] if named_args["Q"].dtype.itemsize == 4 else configs[: len(tiles)]

    return triton.autotune(
        configs=configs, key=["D", "DV", "HAS_KMASK"], prune_configs_by={"early_config_prune": by_dtype}
    )


# --- forward ----------------------------------------------------------------------------------------------------------
@triton.jit
def _key_tile(
    q, K, V, KM, stride_kn, stride_vn, offs_d, offs_dv, pos, start_n, Tk, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Keys and values of the tile at ``start_n`` and its base-2 scores [BLOCK_M, BLOCK_N]: −inf for keys after a
    row's position (CAUSAL), padding keys and keys past Tk."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_k = offs_n < Tk
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=in_k[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if CAUSAL:  # also hides keys past Tk: every row's position is below Tk
        s = tl.where(offs_n[None, :] <= pos[:, None], s, float("-inf"))
    if HAS_KMASK:
        valid = tl.load(KM + offs_n, mask=in_k, other=0) != 0
        s = tl.where(valid[None, :], s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, q, K, V, KM, stride_kn, stride_vn, offs_d, offs_dv, pos, start, end, Tk, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Online-softmax steps over the key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        _, v, s = _key_tile(
            q, K, V, KM, stride_kn, stride_vn, offs_d, offs_dv, pos, start_n, Tk, qk_scale,
            BLOCK_N, CAUSAL, HAS_KMASK, DOT_PREC,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no valid key yet keeps m = −inf; shift it by 0 so that exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(FWD_TILES, FWD_TILES_FP32)
@triton.jit
def fwd_kernel(
    Q, K, V, Out, LSE, ACTIVE, QM, KM,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, Tq, Tk, NQ, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_QMASK: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    if tl.load(ACTIVE + b * NQ + pid_m) == 0:  # no selected row in this block: nothing to do (o stays zero)
        return
    offset = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    in_q = offs_m < Tq
    pos = offset + offs_m
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=in_q[:, None], other=0.0
    )
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    KM += b * Tk
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Key tiles wholly at or before the block's first row need no causal mask; the rest, up to its last row, do.
    first = offset + pid_m * BLOCK_M
    last = offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    full = (first + 1) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, K, V, KM, stride_kt, stride_vt, offs_d, offs_dv, pos, 0, full, Tk, qk_scale,
        BLOCK_N, False, HAS_KMASK, DOT_PREC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, K, V, KM, stride_kt, stride_vt, offs_d, offs_dv, pos, full, last + 1, Tk, qk_scale,
        BLOCK_N, True, HAS_KMASK, DOT_PREC,
    )  # fmt: skip
    keep = in_q & (l_i > 0)  # rows with at least one valid key
    if HAS_QMASK:
        keep = keep & (tl.load(QM + b * Tq + offs_m, mask=in_q, other=0) != 0)
    o = tl.where(keep[:, None], acc / tl.where(keep, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(keep, (m_i + tl.log2(tl.where(keep, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    o_ptr = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptr, o.to(Out.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=in_q)


# --- backward ---------------------------------------------------------------------------------------------------------
@triton.jit
def delta_kernel(
    Out, DO, DLSE, DELTA, ACTIVE, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, H, Tq, NQ,
    DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO·o) − dlse over the rows of active blocks (lse's own gradient enters the softmax backward
    as ds = p·(dp − delta), the same form)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    if tl.load(ACTIVE + b * NQ + pid_m) == 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV)
    in_q = offs_m < Tq
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :], mask=in_q[:, None]
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_dv[None, :], mask=in_q[:, None]
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * Tq + offs_m, mask=in_q, other=0.0)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=in_q)


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, Q, DO, LSE, DELTA, ORDER, stride_qt, stride_dt, offs_d, offs_dv, offs_n, start, end, offset, Tq,
    qk_scale, BLOCK_M: tl.constexpr, ROWS_: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV [BLOCK_N, ·] over the query steps [start, end) of the active blocks listed in ORDER (step j
    is part j % steps of block ORDER[j // steps], steps = ROWS_ / BLOCK_M); scores transposed: [BLOCK_N, BLOCK_M]."""
    steps = ROWS_ // BLOCK_M
    for j in range(start, end):
        offs_m = tl.load(ORDER + j // steps) * ROWS_ + (j % steps) * BLOCK_M + tl.arange(0, BLOCK_M)
        in_q = offs_m < Tq
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=in_q[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dt + offs_dv[None, :], mask=in_q[:, None], other=0.0)
        # Rows past Tq read lse = +inf: probability 0.
        lse = tl.load(LSE + offs_m, mask=in_q, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.exp2(st - lse[None, :])
        if CAUSAL:
            pt = tl.where(offs_n[:, None] <= offset + offs_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@_autotune(DKDV_TILES, DKDV_TILES_FP32)
@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, ORDER, PREFIX, KM, DK, DVALUE,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_db, stride_dt, stride_dh,
    H, Tq, Tk, NQ, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr, ROWS_: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile over the active query blocks at or after it: ORDER [B, NQ] lists each sequence's active blocks
    first, ascending; PREFIX [B, NQ + 1] counts the active blocks before each block."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offset = Tk - Tq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    in_k = offs_n < Tk
    kv_rows = offs_n[:, None]
    PREFIX += b * (NQ + 1)
    # Blocks from `first` on hold a row that sees the tile's first key; from `whole` on, every row sees the whole tile
    # (no causal mask). In list positions: [j0, j1) masked, [j1, j2) not, in steps of BLOCK_M rows.
    first_key = pid_n * BLOCK_N
    first = tl.maximum(first_key - offset, 0) // ROWS_
    whole = tl.minimum((tl.maximum(first_key + BLOCK_N - 1 - offset, 0) + ROWS_ - 1) // ROWS_, NQ)
    steps = ROWS_ // BLOCK_M
    j0, j1, j2 = tl.load(PREFIX + first) * steps, tl.load(PREFIX + whole) * steps, tl.load(PREFIX + NQ) * steps
    # A tile that no active row sees reads nothing (a load under an all-false mask) and writes zero gradients.
    live = (in_k & (j0 < j2))[:, None]
    k = tl.load(K + b * stride_kb + h * stride_kh + kv_rows * stride_kt + offs_d[None, :], mask=live, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + kv_rows * stride_vt + offs_dv[None, :], mask=live, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_db + h * stride_dh
    LSE += pid_bh * Tq
    DELTA += pid_bh * Tq
    ORDER += b * NQ
    dk, dv = _dkdv_steps(
        dk, dv, k, v, Q, DO, LSE, DELTA, ORDER, stride_qt, stride_dt, offs_d, offs_dv, offs_n, j0, j1, offset, Tq,
        qk_scale, BLOCK_M, ROWS_, True, DOT_PREC,
    )  # fmt: skip
    dk, dv = _dkdv_steps(
        dk, dv, k, v, Q, DO, LSE, DELTA, ORDER, stride_qt, stride_dt, offs_d, offs_dv, offs_n, j1, j2, offset, Tq,
        qk_scale, BLOCK_M, ROWS_, False, DOT_PREC,
    )  # fmt: skip
    if HAS_KMASK:  # a padding key's column of probabilities is 0 in the forward: no gradient
        valid = tl.load(KM + b * Tk + offs_n, mask=in_k, other=0) != 0
        dk = tl.where(valid[:, None], dk, 0.0)
        dv = tl.where(valid[:, None], dv, 0.0)
    # dK, dV are contiguous [B, Tk, H, ·] (allocated so by the launcher).
    dk_ptr = DK + ((b * Tk + kv_rows) * H + h) * D + offs_d[None, :]
    dv_ptr = DVALUE + ((b * Tk + kv_rows) * H + h) * DV + offs_dv[None, :]
    tl.store(dk_ptr, (dk * scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(dv_ptr, dv.to(DVALUE.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, K, V, KM, stride_kn, stride_vn, offs_d, offs_dv, pos, start, end, Tk, qk_scale,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ [BLOCK_M, D] over the key tiles [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        k, v, s = _key_tile(
            q, K, V, KM, stride_kn, stride_vn, offs_d, offs_dv, pos, start_n, Tk, qk_scale,
            BLOCK_N, CAUSAL, HAS_KMASK, DOT_PREC,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])  # 0 for masked keys (s = −inf) and for rows with lse = +inf
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@_autotune(DQ_TILES, DQ_TILES_FP32)
@triton.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, ACTIVE, KM, DQ,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_db, stride_dt, stride_dh,
    H, Tq, Tk, NQ, scale, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, HAS_KMASK: tl.constexpr, DOT_PREC: tl.constexpr, ROWS_: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    if tl.load(ACTIVE + b * NQ + pid_m * BLOCK_M // ROWS_) == 0:  # dq stays zero
        return
    offset = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    in_q = offs_m < Tq
    pos = offset + offs_m
    rows = offs_m[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(
        DO + b * stride_db + h * stride_dh + rows * stride_dt + offs_dv[None, :], mask=in_q[:, None], other=0.0
    )
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=in_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=in_q, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    KM += b * Tk
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    first = offset + pid_m * BLOCK_M
    last = offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    full = (first + 1) // BLOCK_N * BLOCK_N
    dq = _dq_steps(
        dq, q, do, lse, delta, K, V, KM, stride_kt, stride_vt, offs_d, offs_dv, pos, 0, full, Tk, qk_scale,
        BLOCK_N, False, HAS_KMASK, DOT_PREC,
    )  # fmt: skip
    dq = _dq_steps(
        dq, q, do, lse, delta, K, V, KM, stride_kt, stride_vt, offs_d, offs_dv, pos, full, last + 1, Tk, qk_scale,
        BLOCK_N, True, HAS_KMASK, DOT_PREC,
    )  # fmt: skip
    dq_ptr = DQ + ((b * Tq + rows) * H + h) * D + offs_d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])
