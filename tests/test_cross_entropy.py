"""`linear_cross_entropy` (oryx.ops.cross_entropy): the loss and gradients of F.cross_entropy on the full logits,
chunk by chunk, without ever creating the [N, V] logits; through the model (tied head) and the trainer."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import tiny
from torch.utils._python_dispatch import TorchDispatchMode

import oryx
from oryx.ops.cross_entropy import linear_cross_entropy
from oryx.schedule import parse
from oryx.training import train
from oryx.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
V, D = 97, 24


def _inputs(N: int, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.2] = -100
    return hidden, weight, targets


def _float64_reference(hidden, weight, targets):
    """(loss, grad_hidden, grad_weight) of F.cross_entropy on the full float64 logits."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    return loss, *torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize(("N", "chunk"), [(37, 8), (40, 8), (37, 37), (37, 100)])
def test_loss_and_gradients_equal_float64_cross_entropy(N, chunk, gen):
    """A chunk that does not divide N, one that does, exactly N and more than N."""
    hidden, weight, targets = _inputs(N, gen)
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want, *want_grads = _float64_reference(hidden, weight, targets)
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) < 1e-6
    for got, expected in zip(grads, want_grads, strict=True):
        assert rel_err(got, expected) < 1e-5


def test_bf16_autocast_and_bf16_inputs(gen):
    """Under autocast the matmuls run in bf16 and the logits are upcast, as in the plain loss: the same loss and
    gradients (fp32 parameters get fp32 gradients). bf16 tensors without autocast get bf16 gradients."""
    hidden, weight, targets = _inputs(53, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 16)
        plain = F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100)
    grads = torch.autograd.grad(loss, (hidden, weight))
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    assert rel_err(loss, plain) < 1e-6
    for got, expected in zip(grads, plain_grads, strict=True):
        assert got.dtype == torch.float32
        assert rel_err(got, expected) < 1e-2  # bf16 policy (docs/design.md §12); the weight's sums round per chunk

    hidden, weight, targets = _inputs(53, gen, torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, 16)
    grads = torch.autograd.grad(loss, (hidden, weight))
    want, *want_grads = _float64_reference(hidden, weight, targets)
    assert rel_err(loss, want) < 1e-2
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, expected) < 1e-2


def test_all_targets_ignored_gives_nan_and_zero_gradients_as_cross_entropy(gen):
    hidden, weight, _ = _inputs(20, gen)
    targets = torch.full((20,), -100)
    loss = linear_cross_entropy(hidden, weight, targets, 8)
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    assert loss.isnan() and plain.isnan()
    for got, expected in zip(
        torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)), strict=True
    ):
        assert torch.equal(got, expected)  # zeros


def _chunked_loss(hidden, weight, targets):
    return linear_cross_entropy(hidden, weight, targets, 8)


def _compiled_equals_eager(gen: torch.Generator, backend: str) -> None:
    hidden, weight, targets = _inputs(37, gen)
    eager = _chunked_loss(hidden, weight, targets)
    eager_grads = torch.autograd.grad(eager, (hidden, weight))
    torch._dynamo.reset()
    compiled = torch.compile(_chunked_loss, backend=backend, fullgraph=True)(hidden, weight, targets)
    compiled_grads = torch.autograd.grad(compiled, (hidden, weight))
    assert rel_err(compiled, eager) < 1e-6
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        assert rel_err(got, expected) < 1e-5


def test_compiles_into_one_graph_equal_to_eager(gen):
    """Dynamo unrolls the loop over the (static) chunks: no graph break. aot_eager_decomp_partition traces forward
    and backward as inductor does, without code generation (inductor itself: the slow test below)."""
    hidden, weight, targets = _inputs(37, gen)
    explained = torch._dynamo.explain(_chunked_loss)(hidden, weight, targets)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    _compiled_equals_eager(gen, "aot_eager_decomp_partition")


@pytest.mark.slow
def test_inductor_compiled_equals_eager(gen):
    _compiled_equals_eager(gen, "inductor")


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any new tensor (not a view or an in-place result) whose last dimension is the
    vocabulary: logits, or anything of their size."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V:
                self.largest = max(self.largest, t.numel())
        return out


def _tiny_model(gen: torch.Generator) -> oryx.OryxForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = oryx.OryxConfig(variant="tg", vocab_size=V, hidden_size=32, num_hidden_layers=1, head_dim=16)
    return oryx.OryxForCausalLM(config)


def test_model_loss_and_tied_gradients_equal_the_plain_loss_without_the_logits(gen):
    """Through the model: the tied head/embedding gets the same gradient, no logits come back, and no op in the
    forward or backward creates a tensor larger than one chunk's logits (the plain loss creates [B·T, V])."""
    model = _tiny_model(gen)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.bias is None
    ids = torch.randint(0, V, (2, 30), generator=gen)
    modes = parse("chunks:size=8,p_attn=0.5").modes(2, 30, generator=gen)
    modes[0, :8], modes[1, :8] = 0, 1  # both mixers, whatever the draw: every parameter has a gradient
    plain_meter, chunked_meter = _LargestVocabTensor(), _LargestVocabTensor()
    with plain_meter:
        plain = model(ids, modes=modes, labels=ids)
        plain.loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with chunked_meter:
        out = model(ids, modes=modes, labels=ids, loss_chunk_tokens=16)
        out.loss.backward()
    assert out.logits is None
    assert rel_err(out.loss, plain.loss) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want[name]) < 1e-5, name
    assert plain_meter.largest == 60 * V
    assert chunked_meter.largest == 16 * V


def test_chunked_loss_refuses_a_head_with_bias(gen):
    """The chunked loss reads the head's weight only: a biased head (set_output_embeddings) is refused, not dropped."""
    model = _tiny_model(gen)
    model.set_output_embeddings(torch.nn.Linear(32, V, bias=True))
    ids = torch.randint(0, V, (2, 12), generator=gen)
    with pytest.raises(ValueError, match="without bias"):
        model(ids, labels=ids, loss_chunk_tokens=8)
    assert torch.isfinite(model(ids, labels=ids).loss)  # the plain loss uses the bias


def test_shift_labels_are_the_shifted_labels(gen):
    model = _tiny_model(gen)
    ids = torch.randint(0, V, (2, 12), generator=gen)
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
    assert torch.equal(model(ids, labels=ids).loss, model(ids, shift_labels=shifted).loss)
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, shift_labels=shifted)


def test_training_with_the_chunked_loss_repeats_the_plain_losses(corpus, tmp_path):
    """`oryx train` (tied embedding, gradient accumulation, AdamW): 64 tokens per micro-step in chunks of 24."""
    losses = {}
    for chunk in (0, 24):
        config = tiny(corpus, tmp_path / str(chunk), steps=3, eval_every=3, save_every=3, loss_chunk_tokens=chunk)
        train(config)
        losses[chunk] = [r["loss"] for r in read_metrics(config.out_dir) if r["kind"] == "train"]
    assert len(losses[0]) == 3
    assert losses[24] == pytest.approx(losses[0], rel=1e-5)
