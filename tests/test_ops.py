"""Tier-1 checks of the token-mixing ops (docs/design.md §9.3 and §9.6).

Every op is compared with a plain per-token loop written here, independently of the library, in float64:
values and gradients, odd lengths, initial and final states, extreme gates. Fresh random inputs every run
(the ``gen`` fixture prints its seed); relative RMS error ≤ 1e-5 in float32 (docs/design.md §12).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from oryx import ops
from oryx.ops import attention

TOL = 1e-5
B, H, K, V = 2, 2, 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# ------------------------------------------------------------------------------------------------------------
# Independent float64 references
# ------------------------------------------------------------------------------------------------------------


def loop_gated_delta(q, k, v, g, beta, scale, initial_state):
    """S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ with explicit K×K matrices; o_t = scale S_tᵀ q_t."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    b, t_len, h, d_k = q.shape
    state = torch.zeros(b, h, d_k, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double()
    eye = torch.eye(d_k, dtype=torch.float64)
    outs = []
    for t in range(t_len):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = g[:, t, :, None, None].exp() * (eye - bt * torch.einsum("bhi,bhj->bhij", kt, kt))
        state = transition @ state + bt * torch.einsum("bhi,bhj->bhij", kt, v[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1), state


def loop_kimi_delta(q, k, v, g, beta, scale, initial_state):
    """S_t = (I − β_t k_t k_tᵀ) Diag(exp(g_t)) S_{t−1} + β_t k_t v_tᵀ, explicit K×K matrices; o_t = scale S_tᵀ q_t."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    b, t_len, h, d_k = q.shape
    state = torch.zeros(b, h, d_k, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double()
    eye = torch.eye(d_k, dtype=torch.float64)
    outs = []
    for t in range(t_len):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = (eye - bt * torch.einsum("bhi,bhj->bhij", kt, kt)) @ torch.diag_embed(g[:, t].exp())
        state = transition @ state + bt * torch.einsum("bhi,bhj->bhij", kt, v[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1), state


def loop_scalar_decay(q, k, v, g, scale, initial_state):
    """S_t = exp(g_t) S_{t−1} + k_t v_tᵀ; o_t = scale S_tᵀ q_t."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    b, t_len, h, d_k = q.shape
    state = torch.zeros(b, h, d_k, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double()
    outs = []
    for t in range(t_len):
        state = g[:, t, :, None, None].exp() * state + torch.einsum("bhi,bhj->bhij", k[:, t], v[:, t])
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1), state


def reference_attention(q, k, v, query_mask, key_mask, scale):
    """Softmax over an explicit [Tq, Tk] causal mask (query i at key position Tk − Tq + i), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    t_q = q.shape[1]
    t_k = k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    weights = torch.where(allowed.any(-1, keepdim=True), weights, 0.0)  # rows without a valid key → 0
    o = torch.einsum("bhij,bjhd->bihd", weights, v)
    if query_mask is not None:
        o = o * query_mask[:, :, None, None]
    return o


def loop_conv(x, weight, initial_state):
    """y_t = Σ_i w_i x_{t−(W−1)+i}, with the W−1 inputs before x taken from initial_state (or zeros)."""
    x, weight = x.double(), weight.double()
    b, t_len, c = x.shape
    w = weight.shape[1]
    history = torch.zeros(b, w - 1, c, dtype=torch.float64)
    if initial_state is not None:
        history = initial_state.double().transpose(1, 2)
    full = torch.cat([history, x], dim=1)
    y = torch.stack([(full[:, t : t + w] * weight.T).sum(1) for t in range(t_len)], dim=1)
    return y, full[:, full.shape[1] - (w - 1) :].transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------
# Inputs and gradient plumbing
# ------------------------------------------------------------------------------------------------------------


def linear_inputs(gen, op, t_len, initial_state=True, gate="mixed", beta="uniform"):
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    g_shape = (B, t_len, H, K) if op == "kimi_delta" else (B, t_len, H)  # KDA: one log-decay per key channel
    gates = {
        "mixed": F.logsigmoid(2 * randn(*g_shape) + 2),
        "near_zero": -1e-4 * rand(*g_shape),
        "very_negative": -30 - rand(*g_shape),
        "zero": torch.zeros(g_shape),
    }
    if op == "kimi_delta":
        # Per channel: about half the channels barely decay, the others forget everything at every step ...
        gates["per_channel"] = torch.where(rand(B, 1, H, K) < 0.5, gates["near_zero"], gates["very_negative"])
        # ... or forget everything until a time of their own, then stop decaying (|G| large, differences small).
        stop = torch.randint(0, t_len + 1, (B, 1, H, K), generator=gen)
        stopped = torch.arange(t_len)[None, :, None, None] >= stop
        gates["switching"] = torch.where(stopped, gates["near_zero"], gates["very_negative"])
    # The delta rules take L2-normalised q, k (the caller's job); SSD takes q = C and k = dt·B as they come.
    delta = op in ("gated_delta", "kimi_delta")
    normalise = (lambda x: F.normalize(x, dim=-1)) if delta else (lambda x: 0.5 * x)
    inputs = {
        "q": normalise(randn(B, t_len, H, K)),
        "k": normalise(randn(B, t_len, H, K)),
        "v": randn(B, t_len, H, V),
        "g": gates[gate],
        "initial_state": randn(B, H, K, V) if initial_state else None,
    }
    if delta:
        betas = {
            "uniform": rand(B, t_len, H),
            "zero": torch.zeros(B, t_len, H),
            "one": torch.ones(B, t_len, H),
            "zero_and_one": (rand(B, t_len, H) < 0.5).float(),
        }
        inputs["beta"] = betas[beta]
    return inputs


IMPLS = {
    "gated_delta": {
        "chunked": ops.gated_delta_rule_chunked,
        "recurrent": ops.gated_delta_rule_recurrent,
        "public": ops.gated_delta_rule,
    },
    "scalar_decay": {
        "chunked": ops.scalar_decay_rule_chunked,
        "recurrent": ops.scalar_decay_rule_recurrent,
        "public": ops.scalar_decay_rule,
    },
    "kimi_delta": {
        "chunked": ops.kimi_delta_rule_chunked,
        "recurrent": ops.kimi_delta_rule_recurrent,
        "public": ops.kimi_delta_rule,
    },
}
STEPS = {"gated_delta": ops.gated_delta_step, "scalar_decay": ops.scalar_decay_step, "kimi_delta": ops.kimi_delta_step}
LINEAR_OPS = list(IMPLS)


def loop_reference(op, inputs, scale):
    x = dict(inputs)
    if op == "gated_delta":
        return loop_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"], scale, x["initial_state"])
    if op == "kimi_delta":
        return loop_kimi_delta(x["q"], x["k"], x["v"], x["g"], x["beta"], scale, x["initial_state"])
    return loop_scalar_decay(x["q"], x["k"], x["v"], x["g"], scale, x["initial_state"])


def with_grads(fn, inputs, cotangents, dtype):
    """Run ``fn(**leaves)`` on fresh ``dtype`` leaves; return (outputs, {name: gradient})."""
    leaves = {n: None if t is None else t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    outputs = fn(**leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o.double() * c).sum() for o, c in zip(outputs, cotangents, strict=True) if c is not None)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return outputs, dict(zip(names, grads, strict=True))


def assert_close(actual, expected, what, tol=TOL):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.2e} > {tol:.0e}"


def check_linear_op(gen, op, impl, inputs, scale, **kwargs):
    """Values, final state and all gradients of ``impl`` (float32) against the float64 loop."""
    t_len = inputs["q"].shape[1]
    cotangents = (
        torch.randn(B, t_len, H, V, generator=gen, dtype=torch.float64),
        torch.randn(B, H, K, V, generator=gen, dtype=torch.float64),
    )
    ref_out, ref_grads = with_grads(lambda **x: loop_reference(op, x, scale), inputs, cotangents, torch.float64)

    def run(**x):
        return IMPLS[op][impl](**x, scale=scale, output_final_state=True, **kwargs)

    out, grads = with_grads(run, inputs, cotangents, torch.float32)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_close(out[0], ref_out[0], f"{impl} output")
    assert_close(out[1], ref_out[1], f"{impl} final state")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"{impl} d{name}")


# ------------------------------------------------------------------------------------------------------------
# Linear recurrences
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", LINEAR_OPS)
@pytest.mark.parametrize("t_len", [1, 7, 63, 130])
@pytest.mark.parametrize("chunk_size", [64, 16])
@pytest.mark.parametrize("initial_state", [True, False])
def test_linear_ops_match_loop(gen, op, t_len, chunk_size, initial_state):
    inputs = linear_inputs(gen, op, t_len, initial_state)
    scale = K**-0.5
    check_linear_op(gen, op, "chunked", inputs, scale, chunk_size=chunk_size)
    check_linear_op(gen, op, "public", inputs, scale, chunk_size=chunk_size)
    if chunk_size == 64:  # the recurrent form has no chunk size: run it once per case
        check_linear_op(gen, op, "recurrent", inputs, scale)


EXTREMES = [
    ("gated_delta", "near_zero", "uniform"),
    ("gated_delta", "very_negative", "uniform"),
    ("gated_delta", "mixed", "zero"),
    ("gated_delta", "mixed", "one"),
    ("gated_delta", "near_zero", "one"),
    ("gated_delta", "mixed", "zero_and_one"),
    ("scalar_decay", "near_zero", None),
    ("scalar_decay", "very_negative", None),
    ("kimi_delta", "near_zero", "uniform"),
    ("kimi_delta", "very_negative", "uniform"),
    ("kimi_delta", "zero", "one"),
    ("kimi_delta", "mixed", "zero"),
    ("kimi_delta", "mixed", "zero_and_one"),
    ("kimi_delta", "per_channel", "uniform"),
    ("kimi_delta", "per_channel", "one"),
    ("kimi_delta", "switching", "uniform"),
]


@pytest.mark.parametrize(("op", "gate", "beta"), EXTREMES)
@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_linear_ops_extreme_gates(gen, op, gate, beta, impl):
    inputs = linear_inputs(gen, op, 130, initial_state=True, gate=gate, beta=beta)
    check_linear_op(gen, op, impl, inputs, scale=0.3)


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_ops_default_scale_and_no_final_state(gen, op):
    inputs = linear_inputs(gen, op, 9)
    o, final = IMPLS[op]["public"](**inputs)
    o_ref, _ = loop_reference(op, inputs, K**-0.5)
    assert final is None
    assert_close(o, o_ref, "default scale K**-0.5")


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_ops_split_calls_equal_one_call(gen, op):
    """Carrying the final state into the next call, in pieces of any size (decode steps included)."""
    t_len = 100
    inputs = linear_inputs(gen, op, t_len)
    fn = IMPLS[op]["public"]
    o_full, s_full = fn(**inputs, output_final_state=True)
    first = int(torch.randint(2, 60, (), generator=gen))
    bounds = [0, first, first + 1, first + 2, first + 5, first + 6, t_len]
    state, pieces = inputs["initial_state"], []
    for lo, hi in itertools.pairwise(bounds):
        part = {n: t[:, lo:hi] for n, t in inputs.items() if n != "initial_state"}
        o, state = fn(**part, initial_state=state, output_final_state=True, chunk_size=16)
        pieces.append(o)
    assert_close(torch.cat(pieces, dim=1), o_full, "split output")
    assert_close(state, s_full, "split final state")


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_ops_step_equals_one_token_call(gen, op):
    inputs = linear_inputs(gen, op, 1)
    o, state = IMPLS[op]["public"](**inputs, output_final_state=True)
    one = {n: t[:, 0] for n, t in inputs.items() if n != "initial_state"}
    o_step, state_step = STEPS[op](**one, state=inputs["initial_state"])
    assert_close(o_step, o[:, 0], "step output")
    assert_close(state_step, state, "step state")


@pytest.mark.parametrize("op", LINEAR_OPS)
def test_linear_ops_low_precision_keeps_float32_state(gen, op):
    inputs = linear_inputs(gen, op, 40)
    low = {n: None if t is None else t.bfloat16() for n, t in inputs.items()}
    low["initial_state"] = inputs["initial_state"]
    o, state = IMPLS[op]["public"](**low, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, s_ref = loop_reference(op, low, K**-0.5)
    assert_close(o, o_ref, "bf16 output", tol=1e-2)
    assert_close(state, s_ref, "bf16 state", tol=1e-2)


@pytest.mark.parametrize("gate", ["mixed", "very_negative"])
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_kimi_delta_with_equal_channels_is_gated_delta(gen, gate, chunk_size):
    """With one log-decay shared by all K channels, KDA is the gated delta rule: values and all gradients (dg summed
    over the channels) against gated_delta_rule in float64."""
    inputs = linear_inputs(gen, "gated_delta", 100, gate=gate)
    cotangents = (
        torch.randn(B, 100, H, V, generator=gen, dtype=torch.float64),
        torch.randn(B, H, K, V, generator=gen, dtype=torch.float64),
    )

    def kimi(g, **x):
        return ops.kimi_delta_rule(
            g=g[..., None].expand(*g.shape, K), **x, output_final_state=True, chunk_size=chunk_size
        )

    ref, ref_grads = with_grads(
        lambda **x: ops.gated_delta_rule(**x, output_final_state=True), inputs, cotangents, torch.float64
    )
    out, grads = with_grads(kimi, inputs, cotangents, torch.float32)
    assert_close(out[0], ref[0], "output")
    assert_close(out[1], ref[1], "final state")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"d{name}")


def test_kimi_delta_chunked_keeps_no_pairwise_decay_tensor(gen):
    """The per-channel pairwise decays never exist as a [B, H, N, C, C, K] tensor: nothing autograd keeps for the
    backward is larger than the [B, H, N, 2, C, C] score pair (the [.., C, C, K] tensor would be K/2 = 8 times that)."""
    t_len, chunk = 130, 64
    inputs = {n: t.requires_grad_() for n, t in linear_inputs(gen, "kimi_delta", t_len).items()}
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = ops.kimi_delta_rule_chunked(**inputs, chunk_size=chunk)
    n_chunks = -(-t_len // chunk)
    assert 0 < largest <= B * H * n_chunks * 2 * chunk * chunk
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values())


# ------------------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_q", [300, 45])
@pytest.mark.parametrize("key_padding", [False, True])
@pytest.mark.parametrize("select", ["all", "some"])
def test_attention_matches_reference(gen, t_q, key_padding, select):
    t_k, d = 300, 16
    inputs = {
        "q": torch.randn(B, t_q, H, d, generator=gen),
        "k": torch.randn(B, t_k, H, d, generator=gen),
        "v": torch.randn(B, t_k, H, d, generator=gen),
    }
    query_mask = None if select == "all" else torch.rand(B, t_q, generator=gen) < 0.3
    key_mask = None
    if key_padding:
        key_mask = torch.rand(B, t_k, generator=gen) < 0.8
        key_mask[1, : t_k - t_q + 3] = False  # left padding: sequence 1's first query rows see no valid key
    scale = 0.2
    cotangent = (torch.randn(B, t_q, H, d, generator=gen, dtype=torch.float64),)

    def run(**x):
        return ops.causal_attention(**x, query_mask=query_mask, key_mask=key_mask, scale=scale)

    (o,), grads = with_grads(run, inputs, cotangent, torch.float32)
    (o_ref,), ref_grads = with_grads(
        lambda **x: reference_attention(**x, query_mask=query_mask, key_mask=key_mask, scale=scale),
        inputs,
        cotangent,
        torch.float64,
    )
    assert_close(o, o_ref, "attention output")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"attention d{name}")
    if query_mask is not None:
        assert (o[~query_mask] == 0).all() and (grads["q"][~query_mask] == 0).all()
    if key_padding:
        assert (o[1, :3] == 0).all()


def test_attention_default_scale(gen):
    q, k, v = (torch.randn(1, 20, 2, 8, generator=gen) for _ in range(3))
    assert_close(ops.causal_attention(q, k, v), reference_attention(q, k, v, None, None, 8**-0.5), "default scale")


def test_attention_work_scales_with_selected_rows(gen):
    """~10% of 128-row chunks selected at T = 2048: at most 15% of the causal score count (docs/design.md §9.6)."""
    t_len, chunk, batch, d = 2048, 128, 16, 8
    q, k, v = (torch.randn(batch, t_len, 1, d, generator=gen) for _ in range(3))
    n_chunks = t_len // chunk
    chosen = torch.randperm(batch * n_chunks, generator=gen)[: round(0.1 * batch * n_chunks)]
    chunk_mask = torch.zeros(batch * n_chunks, dtype=torch.bool)
    chunk_mask[chosen] = True
    query_mask = chunk_mask.view(batch, n_chunks).repeat_interleave(chunk, dim=1)
    causal = batch * t_len * (t_len + 1) // 2

    with ops.count_score_elements() as selected:
        o_sel = ops.causal_attention(q, k, v, query_mask=query_mask)
    with ops.count_score_elements() as every:
        o_all = ops.causal_attention(q, k, v)
    with ops.count_score_elements() as nothing:
        o_none = ops.causal_attention(q, k, v, query_mask=torch.zeros_like(query_mask))

    assert selected.value <= 0.15 * causal, f"{selected.value / causal:.1%} of the causal count"
    assert every.value <= 1.07 * causal, f"all rows: {every.value / causal:.1%} of the causal count"
    assert nothing.value == 0 and (o_none == 0).all()
    assert_close(o_sel[query_mask], o_all[query_mask], "selected rows vs all rows")
    assert (o_sel[~query_mask] == 0).all()


def test_attention_counter_only_counts_inside_its_block(gen):
    q, k, v = (torch.randn(1, 10, 1, 4, generator=gen) for _ in range(3))
    with attention.count_score_elements() as counter:
        ops.causal_attention(q, k, v)
    ops.causal_attention(q, k, v)
    assert counter.value == 10 * 11 // 2  # plain causal self-attention: the fused kernel's lower triangle


# ------------------------------------------------------------------------------------------------------------
# Short causal conv
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_len", [1, 2, 5, 37])
@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("initial_state", [True, False])
def test_conv_matches_loop(gen, t_len, width, initial_state):
    channels = 12
    inputs = {
        "x": torch.randn(B, t_len, channels, generator=gen),
        "weight": torch.randn(channels, width, generator=gen),
        "initial_state": torch.randn(B, channels, width - 1, generator=gen) if initial_state else None,
    }
    cotangents = (
        torch.randn(B, t_len, channels, generator=gen, dtype=torch.float64),
        torch.randn(B, channels, width - 1, generator=gen, dtype=torch.float64),
    )
    out, grads = with_grads(
        lambda **x: ops.causal_conv1d(**x, output_final_state=True), inputs, cotangents, torch.float32
    )
    ref, ref_grads = with_grads(lambda **x: loop_conv(**x), inputs, cotangents, torch.float64)
    assert_close(out[0], ref[0], "conv output")
    assert torch.equal(out[1].double(), ref[1]), "conv final state must be the last W−1 inputs exactly"
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], f"conv d{name}")


def test_conv_pieces_with_carried_state_equal_one_call(gen):
    channels, width = 6, 4
    x = torch.randn(B, 20, channels, generator=gen)
    weight = torch.randn(channels, width, generator=gen)
    y_full, s_full = ops.causal_conv1d(x, weight, output_final_state=True)
    bounds = [0, 1, 3, 6, 7, 12, 20]
    state, pieces = None, []
    for lo, hi in itertools.pairwise(bounds):
        y, state = ops.causal_conv1d(x[:, lo:hi], weight, initial_state=state, output_final_state=True)
        pieces.append(y)
    assert_close(torch.cat(pieces, dim=1), y_full, "conv pieces")
    assert torch.equal(state, s_full)
    state, steps = torch.zeros(B, channels, width - 1), []
    for t in range(20):
        y, state = ops.causal_conv1d_step(x[:, t], weight, state)
        steps.append(y)
    assert_close(torch.stack(steps, dim=1), y_full, "conv steps")
    assert torch.equal(state, s_full)


# ------------------------------------------------------------------------------------------------------------
# Input validation and dispatch
# ------------------------------------------------------------------------------------------------------------


def test_bad_linear_inputs_raise_clear_errors(gen):
    x = linear_inputs(gen, "gated_delta", 8)
    with pytest.raises(ValueError, match=r"beta has shape \[2, 7, 2\] but q has \[2, 8, 2, \.\.\.\]"):
        ops.gated_delta_rule(**{**x, "beta": x["beta"][:, :7]})
    with pytest.raises(ValueError, match=r"g has shape \[2, 8\] but q has"):
        ops.gated_delta_rule(**{**x, "g": x["g"][..., 0]})
    with pytest.raises(ValueError, match=r"k has shape \[2, 8, 2, 8\] but q has \[2, 8, 2, 16\]"):
        ops.scalar_decay_rule(x["q"], x["k"][..., :8], x["v"], x["g"])
    with pytest.raises(ValueError, match=r"v has shape \[2, 8, 3, 32\]"):
        ops.scalar_decay_rule(x["q"], x["k"], torch.randn(2, 8, 3, 32), x["g"])
    with pytest.raises(ValueError, match=r"initial_state has shape \[2, 2, 16, 16\].*\[2, 2, 16, 32\]"):
        ops.scalar_decay_rule(x["q"], x["k"], x["v"], x["g"], initial_state=torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        ops.scalar_decay_rule(x["q"][0], x["k"][0], x["v"][0], x["g"][0])
    with pytest.raises(ValueError, match=r"chunk_size"):
        ops.scalar_decay_rule(x["q"], x["k"], x["v"], x["g"], chunk_size=0)
    with pytest.raises(TypeError, match=r"q has dtype torch.int64"):
        ops.gated_delta_rule(**{**x, "q": x["q"].long()})
    with pytest.raises(ValueError, match=r"backend 'nope' is not available"):
        ops.scalar_decay_rule(x["q"], x["k"], x["v"], x["g"], backend="nope")
    # KDA declares g per key channel: [B, T, H, K]; its other inputs are checked as for the gated delta rule.
    kda = linear_inputs(gen, "kimi_delta", 8)
    with pytest.raises(
        ValueError, match=r"g has shape \[2, 8, 2\] but q has \[2, 8, 2, 16\]; g must be \[B, T, H, K\]"
    ):
        ops.kimi_delta_rule(**{**kda, "g": x["g"]})
    with pytest.raises(ValueError, match=r"g has shape \[2, 8, 2, 8\] but q has \[2, 8, 2, 16\]"):
        ops.kimi_delta_rule(**{**kda, "g": kda["g"][..., :8]})
    with pytest.raises(ValueError, match=r"beta has shape \[2, 8, 2, 16\] but q has \[2, 8, 2, \.\.\.\]"):
        ops.kimi_delta_rule(**{**kda, "beta": kda["g"]})
    with pytest.raises(ValueError, match=r"initial_state has shape \[2, 2, 16, 16\]"):
        ops.kimi_delta_rule(**{**kda, "initial_state": torch.zeros(2, 2, 16, 16)})


def test_bad_attention_and_conv_inputs_raise_clear_errors(gen):
    q = torch.randn(2, 5, 2, 8, generator=gen)
    k = torch.randn(2, 9, 2, 8, generator=gen)
    with pytest.raises(ValueError, match=r"k has shape \[2, 3, 2, 8\] but q has \[2, 5, 2, 8\].*Tk ≥ Tq"):
        ops.causal_attention(q, k[:, :3], k[:, :3])
    with pytest.raises(ValueError, match=r"k has shape \[2, 9, 2, 4\] but q has \[2, 5, 2, 8\]"):
        ops.causal_attention(q, k[..., :4], k)
    with pytest.raises(ValueError, match=r"v has shape \[2, 8, 2, 8\] but k has \[2, 9, 2, 8\]"):
        ops.causal_attention(q, k, k[:, :8])
    with pytest.raises(ValueError, match=r"key_mask has shape \[2, 5\] but expected \[2, 9\]"):
        ops.causal_attention(q, k, k, key_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"query_mask has dtype torch.int64"):
        ops.causal_attention(q, k, k, query_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"q has dtype torch.int64"):
        ops.causal_attention(q.long(), k, k)
    with pytest.raises(ValueError, match=r"at least one query row"):
        ops.causal_attention(q[:, :0], k, k)
    x, w = torch.randn(2, 7, 6, generator=gen), torch.randn(6, 4, generator=gen)
    with pytest.raises(ValueError, match=r"weight has shape \[5, 4\] but x has \[2, 7, 6\]"):
        ops.causal_conv1d(x, w[:5])
    with pytest.raises(ValueError, match=r"initial_state has shape \[2, 6, 2\].*\[2, 6, 3\]"):
        ops.causal_conv1d(x, w, initial_state=torch.zeros(2, 6, 2))
    with pytest.raises(TypeError, match=r"x has dtype torch.int64"):
        ops.causal_conv1d(x.long(), w)


def test_attention_blocks_shared_across_calls_follow_mask_changes(gen):
    """The torch backend derives its blocks once per mask tensor (every layer of a forward passes the same one): an
    in-place change or a new tensor at a recycled address must never reuse stale blocks."""
    B, T, H, D = 3, 300, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))

    every_row = ops.causal_attention(q, k, v, backend="torch")  # no query mask: nothing derived, nothing shared

    def fresh(mask):
        return every_row * mask[..., None, None]

    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 140:150] = True
    assert_close(ops.causal_attention(q, k, v, query_mask=mask, backend="torch"), fresh(mask), "first call")
    mask[1, 5] = True  # in place: block 0 now needed for sequence 1
    mask[2, 290] = True
    assert_close(ops.causal_attention(q, k, v, query_mask=mask, backend="torch"), fresh(mask), "after in-place change")
    for _ in range(3):  # freed and reallocated masks (same size, likely the same address), different rows
        del mask
        mask = torch.rand(B, T, generator=gen) < 0.05
        assert_close(ops.causal_attention(q, k, v, query_mask=mask, backend="torch"), fresh(mask), "new mask")
