"""The linear recurrences on CUDA through fla-core's Triton kernels (``pip install fla-core``).

- ``gated_delta_rule``  -> ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (``fused_recurrent_*`` for short
  inference calls, decoding included);
- ``scalar_decay_rule`` -> ``fla.ops.simple_gla.chunk_simple_gla`` (same recurrence: S_t = exp(g_t) S_{t−1} + k_t v_tᵀ,
  o_t = scale · S_tᵀ q_t), ``fused_recurrent_simple_gla`` for short inference calls;
- ``kimi_delta_rule``   -> ``fla.ops.kda.chunk_kda`` (``fused_recurrent_kda`` for short inference calls), given our
  precomputed log-decays (``use_gate_in_kernel=False``: no A_log / dt_bias gate inside the kernel), β in [0, 1] as is,
  q and k as the caller normalised them.

All follow our conventions already: [B, T, H, D], log-space g [B, T, H] ([B, T, H, K] for KDA), state [B, H, K, V]
float32. fla uses its own chunk length (64); ``chunk_size`` is a detail of the torch reference and is ignored here.

The Hopper trap (DESIGN.md §4, fla issue #640): Triton ≥ 3.4, < 3.7.1 miscompiles fla's gated ``chunk_bwd_dqkwg``
on sm_90, and fla-core ≥ 0.5 refuses that backward there outright. The miscompile needs a key tile of 64
(BK = next_pow2(K) capped at 128 on Hopper, so 32 < K ≤ 64); our head dim is 128 (BK = 128), which computes
correctly (fla #640's own tile sweep: 32 and 128 pass, 64 fails). So on that card and Triton we run fla's backward
with its guard lifted, only for head dims whose tile is not 64 and only inside our own backward call, where it has
been verified: bf16 on an H100 with Triton 3.6 (tests/test_gpu.py against a float64 reference, GDN and simple_gla,
values and all gradients ≤ 8.9e-3; float32 since measured at ≤ 1.5e-3, TF32-level; benchmarks/RESULTS.md).
``ORYX_FLA_HOPPER_BACKWARD`` chooses: unset = bf16 only (float32 and float16 train on the torch reference there),
``1`` = every dtype, ``0`` = never.
For 32 < K ≤ 64 training there always runs the torch reference (correct, slow); inference calls, and every other
card or Triton, use fla throughout.

KDA is outside that trap as fla-core 0.6.0 is written: ``chunk_kda``'s backward (``fla/ops/kda/chunk_bwd.py``,
``chunk_kda_bwd``) never calls the guarded ``chunk_bwd_dqkwg`` of ``fla/ops/common/chunk_o.py``. It recomputes w, u
(``kda/wy_fast.py``), passes states with the ``common/chunk_delta_h`` kernels GDN's backward also uses (in their
per-key ``gk`` variant), and takes dq, dk, dg, dβ from kernels of its own (``chunk_kda_bwd_dAv``,
``chunk_kda_bwd_wy_dqkg_fused``, ``chunk_kda_bwd_intra``). Nothing refuses to run on Hopper, so there is no guard to
lift (no ``_run_chunked``) and every head dim and dtype trains on fla; fla's own Hopper workaround there is to drop
the (BK = 32, 4 warps) autotune config of ``chunk_kda_bwd_kernel_wy_dqkg_fused``. Whether #640's miscompile (a key
tile of 64 in ``chunk_bwd_kernel_dqkwg``) has a twin in those kernels on Triton < 3.7.1 is not known yet:
tests/test_gpu.py checks KDA training, K = 64 included, against a float64 reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

from oryx.ops import dispatch
from oryx.ops.backends._common import FAST_DTYPES, common_dtype, importable, needs_grad
from oryx.ops.gated_delta import gated_delta_rule_chunked
from oryx.ops.scalar_decay import scalar_decay_rule_chunked

Tensor = torch.Tensor

SHORT = 64  # inference calls up to this many tokens use the fused recurrent kernels (no chunk set-up)
HOPPER_BACKWARD_ENV = "ORYX_FLA_HOPPER_BACKWARD"  # guarded backward on Hopper: unset = bf16, 1 = all, 0 = none


@functools.cache
def _guarded_backward(device_index: int) -> bool:
    """Whether this card and Triton are in the range where fla refuses its gated backward (Hopper, [3.4, 3.7.1))."""
    import triton
    from packaging.version import Version

    hopper = torch.cuda.get_device_capability(device_index)[0] == 9
    return hopper and Version("3.4.0") <= Version(triton.__version__.split("+")[0]) < Version("3.7.1")


def _miscompiled_tile(head_dim: int) -> bool:
    """fla's key tile on Hopper is next_pow2(K) capped at 128; the #640 miscompile hits tile 64 only."""
    return 32 < head_dim <= 64


@contextlib.contextmanager
def _lift_hopper_guard() -> Iterator[None]:
    """Let fla run its gated backward on Hopper with Triton < 3.7.1 (only entered for tiles that compile right)."""
    from fla.ops.common import chunk_o

    if not hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):  # fla versions without the guard
        yield
        return
    saved = chunk_o.TRITON_ABOVE_3_7_1
    chunk_o.TRITON_ABOVE_3_7_1 = True
    try:
        yield
    finally:
        chunk_o.TRITON_ABOVE_3_7_1 = saved


class _UnguardedBackward(torch.autograd.Function):
    """Runs ``run(*inputs) -> (o, final_state)`` (an fla op, with its own autograd) and backpropagates through it with
    the Hopper guard lifted. The fla graph is built in forward and kept on ctx, as autograd would keep it anyway."""

    @staticmethod
    def forward(ctx, run: Callable, *inputs: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.leaves = [
            None if x is None else x.detach().requires_grad_(need)
            for x, need in zip(inputs, ctx.needs_input_grad[1:], strict=True)
        ]
        with torch.enable_grad():
            ctx.outputs = run(*ctx.leaves)
        return tuple(t.detach() for t in ctx.outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        pairs = [(t, g) for t, g in zip(ctx.outputs, grads, strict=True) if g is not None and t.requires_grad]
        wanted = [x for x in ctx.leaves if x is not None and x.requires_grad]
        if not pairs or not wanted:
            return (None,) * (len(ctx.leaves) + 1)
        outputs, grad_outputs = zip(*pairs, strict=True)
        with _lift_hopper_guard():
            found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
        return (None, *(next(found) if x is not None and x.requires_grad else None for x in ctx.leaves))


def _hopper_backward_allowed(dtype: torch.dtype) -> bool:
    """Whether fla's guarded backward may run for inputs of ``dtype`` (see the module docstring)."""
    choice = os.environ.get(HOPPER_BACKWARD_ENV, "")
    if choice not in ("", "0", "1"):
        raise ValueError(f"{HOPPER_BACKWARD_ENV}={choice!r}; use 1 (every dtype), 0 (never) or leave it unset (bf16)")
    return choice == "1" or (choice == "" and dtype == torch.bfloat16)


def _run_chunked(run: Callable, head_dim: int, *inputs: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """fla's chunked op ``run`` with a backward that works on this card, or None when only the reference can train."""
    if not (needs_grad(*inputs) and _guarded_backward(inputs[0].device.index or 0)):
        return run(*inputs)
    if _miscompiled_tile(head_dim) or not _hopper_backward_allowed(inputs[0].dtype):
        return None
    return _UnguardedBackward.apply(run, *inputs)


def _gated_delta_fla(
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
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    dtype = common_dtype(q, k, v)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    grad = needs_grad(q, k, v, g, beta, initial_state)
    if not grad and q.shape[1] <= SHORT:
        o, final = fused_recurrent_gated_delta_rule(
            q, k, v, g, beta=beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
        return o, final

    def run(q, k, v, g, beta, initial_state):
        return chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True
        )

    result = _run_chunked(run, q.shape[-1], q, k, v, g, beta, initial_state)
    if result is None:
        return gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    o, final = result
    return o, (final if output_final_state else None)


def _scalar_decay_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    dtype = common_dtype(q, k, v)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    grad = needs_grad(q, k, v, g, initial_state)
    if not grad and q.shape[1] <= SHORT:
        o, final = fused_recurrent_simple_gla(
            q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
        return o, final

    def run(q, k, v, g, initial_state):
        return chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=True)

    result = _run_chunked(run, q.shape[-1], q, k, v, g, initial_state)
    if result is None:
        return scalar_decay_rule_chunked(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    o, final = result
    return o, (final if output_final_state else None)


def _kimi_delta_fla(
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
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    out_dtype, dtype = q.dtype, common_dtype(q, k, v)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    if initial_state is not None:
        initial_state = initial_state.float()  # chunk_kda asserts a float32 state
    grad = needs_grad(q, k, v, g, beta, initial_state)
    if not grad and q.shape[1] <= SHORT:
        o, final = fused_recurrent_kda(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_gate_in_kernel=False,
        )
        return o.to(out_dtype), final
    # No _run_chunked: chunk_kda's backward is not the guarded one (module docstring), so fla trains it everywhere.
    o, final = chunk_kda(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_gate_in_kernel=False,
    )
    return o.to(out_dtype), final


def _supports(x: Tensor) -> bool:
    # fla's kernels take head dims up to 256 (one key tile per program in the fused recurrent kernels).
    return x.is_cuda and x.dtype in FAST_DTYPES and x.shape[-1] <= 256 and importable("triton", "fla")


dispatch.register("gated_delta_rule", "fla", _gated_delta_fla, supports=_supports, priority=10)
dispatch.register("scalar_decay_rule", "fla", _scalar_decay_fla, supports=_supports, priority=10)
dispatch.register("kimi_delta_rule", "fla", _kimi_delta_fla, supports=_supports, priority=10)
