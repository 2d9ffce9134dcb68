"""`torch.compile` sees the whole model: a training forward (loss) of every family, with switching modes, is one graph
on the reference ops, and the compiled forward and backward equal the eager ones."""

import pytest
import torch
from conftest import rel_err

import oryx
from oryx.schedule import parse

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(oryx.variants.VARIANTS)


def _model_and_batch(variant: str, gen: torch.Generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    # One layer and three chunks of the recurrence: tracing unrolls the loop over chunks, so this keeps the graphs
    # (and the suite) small.
    shape = dict(hidden_size=64, num_hidden_layers=1, head_dim=32, chunk_size=64)
    baseline_shape = dict(mamba_head_dim=16, mamba_d_state=32, gdn_num_heads=2, gdn_head_dim_v=48)
    config = oryx.OryxConfig(variant=variant, vocab_size=97, **shape, **baseline_shape)
    model = oryx.OryxForCausalLM(config)
    ids = torch.randint(0, 97, (2, 160), generator=gen)
    # 128-token mode chunks cut by a second switch inside the first chunk: both mixers and token-level switches
    modes = None
    if config.is_oryx:
        modes = parse("chunks:size=128,p_attn=0.5").modes(2, 160, generator=gen)
        modes[:, 50:60] = 1 - modes[:, 50:60]
    return model, ids, modes


def _loss(model, ids, modes):
    return model(ids, modes=modes, labels=ids).loss


@pytest.mark.parametrize("variant", FAMILIES)
def test_training_forward_has_no_graph_break(variant, gen):
    model, ids, modes = _model_and_batch(variant, gen)
    explained = torch._dynamo.explain(_loss)(model, ids, modes)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", FAMILIES)
def test_compiled_loss_and_gradients_equal_eager(variant, gen):
    """fullgraph=True: any graph break is an error. aot_eager_decomp_partition traces forward and backward with the
    decompositions and the partitioner inductor uses, without code generation (inductor itself: the slow test below).
    (Plain aot_eager fails in torch 2.13's backward on a strided view that the decompositions handle.)"""
    model, ids, modes = _model_and_batch(variant, gen)
    eager = _loss(model, ids, modes)
    eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(_loss, backend="aot_eager_decomp_partition", fullgraph=True)(model, ids, modes)
    compiled.backward()
    assert rel_err(compiled, eager) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name]) < 1e-4, name  # model-level policy (docs/design.md §12)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tg", "tm", "gdn"])
def test_inductor_compiled_training_step_equals_eager(variant, gen):
    model, ids, modes = _model_and_batch(variant, gen)
    eager = _loss(model, ids, modes)
    eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True)(model, ids, modes)
    compiled.backward()
    assert rel_err(compiled, eager) < 1e-5
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name]) < 1e-4, name


def test_regional_compilation_equals_eager_and_compiles_one_block(gen):
    """compile_blocks (what `oryx train` does on a GPU): the loss and every gradient of the eager model, from one
    compiled graph serving all of the identical blocks."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = oryx.OryxConfig(variant="tg", vocab_size=97, hidden_size=64, num_hidden_layers=3, head_dim=32)
    model = oryx.OryxForCausalLM(config)
    ids = torch.randint(0, 97, (2, 160), generator=gen)
    modes = parse("chunks:size=32,p_attn=0.5").modes(2, 160, generator=gen)
    eager = _loss(model, ids, modes)
    eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    model.compile_blocks(backend="aot_eager_decomp_partition")
    compiled = _loss(model, ids, modes)
    compiled.backward()
    assert rel_err(compiled, eager) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(p.grad, expected[name]) < 1e-4, name  # model-level policy (docs/design.md §12)
    assert len(_debug_get_cache_entry_list(type(model.model.layers[0]).forward.__code__)) == 1
