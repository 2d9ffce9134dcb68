"""Short depthwise causal convolution over time (the "ShortConv" on Oryx's shared keys and values).

    y[b, t, c] = Σ_{i<W} weight[c, i] · x[b, t − (W−1) + i, c]

(causal-conv1d's convention: the last tap multiplies the current input). Inputs before the first token come
from ``initial_state`` [B, C, W−1], the last W−1 inputs of the previous call, or are zeros. No bias and no
activation: callers add SiLU where the design wants it.

The torch backend is registered with ``dispatch`` as op ``"causal_conv1d"``; a backend function is called as
``fn(x, weight, initial_state=, output_final_state=)`` on checked inputs.
"""

from __future__ import annotations

import torch

from oryx.ops import dispatch
from oryx.ops.common import check_floating

Tensor = torch.Tensor


def causal_conv1d_step(x: Tensor, weight: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token: x [B, C], weight [C, W], state [B, C, W−1] -> (y [B, C], new state [B, C, W−1])."""
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # [B, C, W]
    return (window * weight.to(x.dtype)).sum(-1), window[..., 1:]


def _torch_backend(
    x: Tensor, weight: Tensor, initial_state: Tensor | None, output_final_state: bool
) -> tuple[Tensor, Tensor | None]:
    B, T, C = x.shape
    W = weight.shape[-1]
    history = x.new_zeros(B, W - 1, C) if initial_state is None else initial_state.to(x.dtype).transpose(1, 2)
    # Prepend the history so the window of every output is complete, then sum the W shifted, weighted copies:
    # for the short widths used here this is much faster than a grouped conv1d, whose CPU backward is slow.
    xp = torch.cat([history, x], dim=1)  # [B, W − 1 + T, C]
    w = weight.to(x.dtype)
    y = sum(xp[:, i : i + T] * w[:, i] for i in range(W))
    # The last W−1 inputs, reaching into the history when T < W − 1 (sliced from the start: W = 1 is empty).
    final_state = xp[:, xp.shape[1] - (W - 1) :].transpose(1, 2) if output_final_state else None
    return y, final_state


dispatch.register("causal_conv1d", "torch", _torch_backend)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Depthwise causal convolution of width W over time.

    Args:
        x: [B, T, C], any T ≥ 1.
        weight: [C, W].
        initial_state: [B, C, W−1], the last W−1 inputs before x, or None (zeros).
        output_final_state: also return the last W−1 inputs (older ones from initial_state when T < W−1).
        backend: "auto", "torch" or a registered fast backend (see ``oryx.ops.dispatch``).

    Returns:
        y [B, T, C] in x's dtype, and the final state [B, C, W−1] (or None).
    """
    check_floating(x=x, weight=weight, initial_state=initial_state)
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"x must be [B, T, C] with T ≥ 1, got shape {list(x.shape)}")
    B, _, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] == 0:
        raise ValueError(f"weight has shape {list(weight.shape)} but x has {list(x.shape)}; weight must be [C, W]")
    expected = [B, C, weight.shape[1] - 1]
    if initial_state is not None and list(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state has shape {list(initial_state.shape)} but x and weight give [B, C, W-1] = {expected}"
        )
    impl = dispatch.resolve("causal_conv1d", x, backend).fn
    return impl(x, weight, initial_state=initial_state, output_final_state=output_final_state)
