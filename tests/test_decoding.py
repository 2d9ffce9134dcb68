"""Static-cache decoding (oryx.decoding): the fixed-buffer step equals the ordinary cache, token by token.

On CPU the static step runs eagerly; tests/test_gpu.py replays it from CUDA graphs against the same reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import oryx
from oryx import OryxConfig, OryxForCausalLM
from oryx.cache import OryxCache, static_kv_buffer
from oryx.configuration import ATTN, LINEAR
from oryx.decoding import StaticDecoder

VARIANTS = list(oryx.variants.VARIANTS)


def small_model(variant: str, seed: int) -> OryxForCausalLM:
    torch.manual_seed(seed)
    config = OryxConfig(variant=variant, vocab_size=300, hidden_size=64, num_hidden_layers=2, head_dim=32)
    return OryxForCausalLM(config).eval()


def step_modes(model: OryxForCausalLM, B: int, t: int) -> torch.Tensor:
    """Per-step modes: switches every few tokens, and rows in different modes at some steps (Oryx)."""
    supported = model.config.supported_modes
    if len(supported) == 1:
        return torch.full((B, 1), supported[0])
    modes = torch.full((B, 1), ATTN if (t // 3) % 2 else LINEAR)
    if t % 4 == 1:
        modes[0] = 1 - modes[0]
    return modes


def test_static_kv_buffer_keeps_each_position_of_every_row_contiguous(gen):
    """The static KV buffer is [B, capacity, H, d] with the prompt's positions copied and zeros after them, stored
    position-major: the one position a decoding step writes, for all rows, is one contiguous block."""
    B, T, H, d, capacity = 3, 7, 2, 5, 12
    keys = torch.randn(B, T, H, d, generator=gen)
    static = static_kv_buffer(keys, T, capacity)
    assert static.shape == (B, capacity, H, d)
    assert torch.equal(static[:, :T], keys) and torch.equal(static[:, T:], torch.zeros(B, capacity - T, H, d))
    assert static[:, T].is_contiguous()
    static.index_copy_(1, torch.tensor([T]), keys[:, :1])
    assert torch.equal(static[:, T], keys[:, 0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_steps_equal_the_growing_cache(variant, gen):
    model = small_model(variant, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    B, prompt, steps = 3, 21, 12
    ids = torch.randint(0, 300, (B, prompt + steps), generator=gen)
    mask = torch.ones(B, prompt, dtype=torch.long)
    mask[1, :6] = 0  # a left-padded row: its padding must stay invalid as keys in the static buffers
    prompt_modes = step_modes(model, B, 0).expand(B, prompt)
    reference, static = OryxCache(model.config), OryxCache(model.config)
    with torch.no_grad():
        for cache in (reference, static):
            model(ids[:, :prompt], modes=prompt_modes, attention_mask=mask, cache=cache)
        decoder = StaticDecoder(model, capacity=prompt + steps, cache=static)
        for t in range(steps):
            token, modes = ids[:, prompt + t : prompt + t + 1], step_modes(model, B, t)
            expected = model(token, modes=modes, cache=reference).logits
            got = decoder.step(token, modes)
            assert rel_err(got, expected) < 1e-5, f"step {t}: {rel_err(got, expected):.2e}"
    for ref_layer, static_layer in zip(reference.layers, static.layers, strict=True):
        if ref_layer.recurrent is not None:
            assert rel_err(static_layer.recurrent, ref_layer.recurrent) < 1e-5
        if ref_layer.key is not None:
            assert rel_err(static_layer.key, ref_layer.key) < 1e-6 and static_layer.key.shape == ref_layer.key.shape
    assert static.seq_len == reference.seq_len and torch.equal(static.num_real, reference.num_real)


def test_generate_with_cuda_graphs_flag_scores_like_plain_generate(gen):
    model = small_model("tg", 3)
    ids = torch.randint(0, 300, (2, 17), generator=gen)
    common = dict(schedule="tail:attn=4", max_new_tokens=9, do_sample=False, output_scores=True)
    plain = model.generate(ids, return_dict_in_generate=True, **common)
    static = model.generate(ids, return_dict_in_generate=True, cuda_graphs=True, **common)
    assert torch.equal(plain.sequences, static.sequences)
    for a, b in zip(plain.scores, static.scores, strict=True):
        assert rel_err(b, a) < 1e-5


def test_static_cache_errors_name_the_fix(gen):
    model = small_model("tg", 0)
    with pytest.raises(ValueError, match="prefilled cache"):
        StaticDecoder(model, capacity=8, cache=OryxCache(model.config))
    cache = OryxCache(model.config)
    ids = torch.randint(0, 300, (1, 6), generator=gen)
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="leaves no room"):
            StaticDecoder(model, capacity=6, cache=cache)
        decoder = StaticDecoder(model, capacity=7, cache=cache)
        decoder.step(ids[:, :1], None)
        with pytest.raises(ValueError, match="full"):
            decoder.step(ids[:, :1], None)
        with pytest.raises(ValueError, match="one token per row"):
            model(ids[:, :2], cache=cache)
        with pytest.raises(ValueError, match="cannot reorder"):
            cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, cuda_graphs=True)
    with pytest.raises(ValueError, match="need a CUDA device"):
        fresh = OryxCache(model.config)
        model(ids, cache=fresh)
        StaticDecoder(model, capacity=9, cache=fresh, use_graphs=True)
    assert not fresh.is_static  # refused before anything changed
