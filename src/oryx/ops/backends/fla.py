"""The linear recurrences on CUDA through fla-core's Triton kernels (``pip install fla-core``), as custom ops.

    op                 chunked (training, prefill)             fused recurrent (inference calls of ≤ 64 tokens)
    gated_delta_rule   fla.ops.gated_delta_rule.chunk_...       fused_recurrent_gated_delta_rule
    scalar_decay_rule  fla.ops.simple_gla.chunk_simple_gla      fused_recurrent_simple_gla (same recurrence:
                                                                S_t = exp(g_t) S_{t−1} + k_t v_tᵀ, o_t = scale·S_tᵀ q_t)
    kimi_delta_rule    fla.ops.kda.chunk_kda                    fused_recurrent_kda (our precomputed log-decays:
                                                                use_gate_in_kernel=False)

All follow our conventions already: [B, T, H, D], log-space g [B, T, H] ([B, T, H, K] for KDA), state [B, H, K, V]
float32. fla uses its own chunk length (64); ``chunk_size`` is a detail of the torch reference and is ignored here.

**Custom ops, so that torch.compile sees through them.** fla's functions are opaque to the compiler (they are
``torch.compiler.disable``d), which breaks a compiled model's graph at every layer. Here they run inside
``torch.library`` custom ops with fake (shape-only) implementations: ``oryx::fla_chunk`` (its autograd formula calls
``oryx::fla_chunk_backward``, which recomputes fla's chunked forward with autograd and backpropagates through it: one
extra forward of the recurrence per backward, and no intermediate kept between forward and backward) and
``oryx::fla_recurrent``. Inside a custom op the dispatcher has autograd switched off; ``_autograd_inside_op`` switches
it back on for that recomputation only.

**The Hopper trap** (docs/design.md §11, fla issue #640): Triton ≥ 3.4, < 3.7.1 miscompiles fla's gated
``chunk_bwd_dqkwg`` on sm_90 for a key tile of 64 (BK = next_pow2(K) capped at 128, so 32 < K ≤ 64), and fla-core
≥ 0.5 refuses that backward there outright. Gated DeltaNet and simple_gla use it; at our head dim 128 (tile 128) it
computes correctly, so on that card and Triton ``oryx::fla_chunk_backward`` lifts fla's guard for tiles other than 64
(checked against float64 by tests/test_gpu.py; the measurements are in benchmarks/RESULTS.md).
``ORYX_FLA_HOPPER_BACKWARD`` chooses: unset = bf16 only (float32 and float16 train on the torch reference there),
``1`` = every dtype, ``0`` = never. K ≤ 64 training on that card always runs the torch reference. KDA's backward
(``fla/ops/kda/chunk_bwd.py``) never calls the guarded kernel, so it trains on fla everywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from oryx.ops import dispatch
from oryx.ops.backends._common import FAST_DTYPES, common_dtype, importable, needs_grad
from oryx.ops.backends.autotune_choices import restore_shipped_choices
from oryx.ops.gated_delta import gated_delta_rule_chunked
from oryx.ops.scalar_decay import scalar_decay_rule_chunked

Tensor = torch.Tensor

SHORT = 64  # inference calls up to this many tokens use the fused recurrent kernels (no chunk set-up)
HOPPER_BACKWARD_ENV = "ORYX_FLA_HOPPER_BACKWARD"  # guarded backward on Hopper: unset = bf16, 1 = all, 0 = none
GUARDED_OPS = ("gated_delta_rule", "scalar_decay_rule")  # their backward runs fla's guarded chunk_bwd_dqkwg


# --- fla's kernels: (q, k, v, g, beta, scale, initial_state) -> (o, final_state) -------------------------------------
def _gdn_chunk(q, k, v, g, beta, scale, h0):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)


def _gdn_recurrent(q, k, v, g, beta, scale, h0):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    return fused_recurrent_gated_delta_rule(
        q, k, v, g, beta=beta, scale=scale, initial_state=h0, output_final_state=True
    )


def _ssd_chunk(q, k, v, g, beta, scale, h0):
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=True)


def _ssd_recurrent(q, k, v, g, beta, scale, h0):
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    return fused_recurrent_simple_gla(q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=True)


def _kda_chunk(q, k, v, g, beta, scale, h0):
    from fla.ops.kda import chunk_kda

    return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True, use_gate_in_kernel=False)


def _kda_recurrent(q, k, v, g, beta, scale, h0):
    from fla.ops.kda import fused_recurrent_kda

    return fused_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True, use_gate_in_kernel=False
    )


Kernel = Callable[..., tuple[Tensor, Tensor]]
# op -> (chunked, fused recurrent); the tests swap in the torch reference to check the custom ops on the CPU.
KERNELS: dict[str, tuple[Kernel, Kernel]] = {
    "gated_delta_rule": (_gdn_chunk, _gdn_recurrent),
    "scalar_decay_rule": (_ssd_chunk, _ssd_recurrent),
    "kimi_delta_rule": (_kda_chunk, _kda_recurrent),
}


def _kernel(op: str, form: int, x: Tensor) -> Kernel:
    """``KERNELS[op][form]`` (0 chunked, 1 fused recurrent), once the shipped autotune choices for x's card are in
    Triton's cache (``autotune_choices``: the first call of a process copies those it lacks)."""
    if x.is_cuda:
        restore_shipped_choices(x.device)
    return KERNELS[op][form]


# --- the custom ops ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Autograd on again inside a custom op's implementation (where the dispatcher excludes it), for the backward's
    recomputation: the dispatch-key guard drops the autograd key from this thread's excluded set until it exits."""
    C = torch._C
    excluded = C._dispatch_tls_local_exclude_set().remove(C.DispatchKey.AutogradFunctionality)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _outputs_like(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Empty o [B, T, H, V] in q's dtype and final state [B, H, K, V] float32."""
    B, T, H, K = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("oryx::fla_chunk", mutates_args=())
def fla_chunk(
    op: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, initial_state: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """fla's chunked form of ``op``: (o, final state)."""
    with torch.no_grad():
        o, final = _kernel(op, 0, q)(q, k, v, g, beta, scale, initial_state)
    return o.to(q.dtype).contiguous(), final.contiguous()


@fla_chunk.register_fake
def _(op, q, k, v, g, beta, initial_state, scale):
    return _outputs_like(q, v)


@torch.library.custom_op("oryx::fla_chunk_backward", mutates_args=())
def fla_chunk_backward(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor | None,
    initial_state: Tensor | None,
    scale: float,
    grad_o: Tensor,
    grad_final: Tensor,
) -> list[Tensor]:
    """Gradients of ``fla_chunk`` for q, k, v, g, then beta and initial_state where given."""
    inputs = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    guarded = op in GUARDED_OPS and q.is_cuda and _guarded_backward(q.device.index or 0)
    guard = _lift_hopper_guard() if guarded else None
    with _autograd_inside_op(), guard or contextlib.nullcontext():
        leaves = [x.detach().requires_grad_() for x in inputs]
        it = iter(leaves)
        q_, k_, v_, g_ = (next(it) for _ in range(4))
        beta_ = next(it) if beta is not None else None
        h0 = next(it) if initial_state is not None else None
        o, final = KERNELS[op][0](q_, k_, v_, g_, beta_, scale, h0)
        grads = torch.autograd.grad((o, final), leaves, (grad_o.to(o.dtype), grad_final), allow_unused=True)
    return [
        x.new_zeros(x.shape) if d is None else d.to(x.dtype).contiguous() for x, d in zip(inputs, grads, strict=True)
    ]


@fla_chunk_backward.register_fake
def _(op, q, k, v, g, beta, initial_state, scale, grad_o, grad_final):
    return [x.new_empty(x.shape) for x in (q, k, v, g, beta, initial_state) if x is not None]


def _setup_chunk(ctx, inputs, output) -> None:
    op, q, k, v, g, beta, initial_state, scale = inputs
    ctx.op, ctx.scale, ctx.has = op, scale, (beta is not None, initial_state is not None)
    ctx.save_for_backward(q, k, v, g, beta, initial_state)


def _backward_chunk(ctx, grad_o: Tensor | None, grad_final: Tensor | None):
    q, k, v, g, beta, initial_state = ctx.saved_tensors
    if grad_o is None or grad_final is None:  # an output that took no part in the loss
        empty_o, empty_final = _outputs_like(q, v)
        grad_o = empty_o.zero_() if grad_o is None else grad_o
        grad_final = empty_final.zero_() if grad_final is None else grad_final
    grads = iter(fla_chunk_backward(ctx.op, q, k, v, g, beta, initial_state, ctx.scale, grad_o, grad_final))
    dq, dk, dv, dg = (next(grads) for _ in range(4))
    dbeta = next(grads) if ctx.has[0] else None
    dh0 = next(grads) if ctx.has[1] else None
    return None, dq, dk, dv, dg, dbeta, dh0, None


fla_chunk.register_autograd(_backward_chunk, setup_context=_setup_chunk)


@torch.library.custom_op("oryx::fla_recurrent", mutates_args=())
def fla_recurrent(
    op: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, initial_state: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """fla's fused recurrent form of ``op`` (inference only): (o, final state)."""
    with torch.no_grad():
        o, final = _kernel(op, 1, q)(q, k, v, g, beta, scale, initial_state)
    return o.to(q.dtype).contiguous(), final.contiguous()


@fla_recurrent.register_fake
def _(op, q, k, v, g, beta, initial_state, scale):
    return _outputs_like(q, v)


# --- the Hopper guard -----------------------------------------------------------------------------------------------
_GUARDED: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def _guarded_backward(device_index: int) -> bool:
    """Whether this card and Triton are in the range where fla refuses its gated backward (Hopper, [3.4, 3.7.1)).
    Asked once per card; a constant to torch.compile (see ``importable``)."""
    if device_index not in _GUARDED:
        import triton
        from packaging.version import Version

        hopper = torch.cuda.get_device_capability(device_index)[0] == 9
        in_range = Version("3.4.0") <= Version(triton.__version__.split("+")[0]) < Version("3.7.1")
        _GUARDED[device_index] = hopper and in_range
    return _GUARDED[device_index]


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


def _hopper_backward_allowed(dtype: torch.dtype) -> bool:
    """Whether fla's guarded backward may run for inputs of ``dtype`` (see the module docstring)."""
    choice = os.environ.get(HOPPER_BACKWARD_ENV, "")
    if choice not in ("", "0", "1"):
        raise ValueError(f"{HOPPER_BACKWARD_ENV}={choice!r}; use 1 (every dtype), 0 (never) or leave it unset (bf16)")
    return choice == "1" or (choice == "" and dtype == torch.bfloat16)


def _fla_trains(op: str, q: Tensor) -> bool:
    """Whether fla's chunked backward is right for these inputs on this card (else the torch reference trains)."""
    if op not in GUARDED_OPS or not q.is_cuda or not _guarded_backward(q.device.index or 0):
        return True
    return not _miscompiled_tile(q.shape[-1]) and _hopper_backward_allowed(q.dtype)


# --- the backends -----------------------------------------------------------------------------------------------------
REFERENCES: dict[str, Callable] = {
    "gated_delta_rule": gated_delta_rule_chunked,
    "scalar_decay_rule": lambda q, k, v, g, beta, *rest: scalar_decay_rule_chunked(q, k, v, g, *rest),
}


def _run(
    op: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """One of the recurrences on fla: the fused recurrent kernel for a short inference call, the chunked one
    otherwise, or the torch reference where fla's backward cannot be trusted (the Hopper trap)."""
    out_dtype, dtype = q.dtype, common_dtype(q, k, v)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    beta = None if beta is None else beta.to(dtype)
    if initial_state is not None:
        initial_state = initial_state.float()  # fla's kernels keep a float32 state
    grad = needs_grad(q, k, v, g, beta, initial_state)
    if grad and not _fla_trains(op, q):
        return REFERENCES[op](q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    form = fla_recurrent if not grad and q.shape[1] <= SHORT else fla_chunk
    o, final = form(op, q, k, v, g, beta, initial_state, scale)
    return o.to(out_dtype), (final if output_final_state else None)


def _gated_delta_fla(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    return _run("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


def _scalar_decay_fla(q, k, v, g, scale, initial_state, output_final_state, chunk_size):
    return _run("scalar_decay_rule", q, k, v, g, None, scale, initial_state, output_final_state, chunk_size)


def _kimi_delta_fla(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size):
    return _run("kimi_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


def _supports(x: Tensor) -> bool:
    # fla's kernels take head dims up to 256 (one key tile per program in the fused recurrent kernels).
    return x.is_cuda and x.dtype in FAST_DTYPES and x.shape[-1] <= 256 and importable("triton", "fla")


dispatch.register("gated_delta_rule", "fla", _gated_delta_fla, supports=_supports, priority=10)
dispatch.register("scalar_decay_rule", "fla", _scalar_decay_fla, supports=_supports, priority=10)
dispatch.register("kimi_delta_rule", "fla", _kimi_delta_fla, supports=_supports, priority=10)
