"""Model-level semantics (docs/design.md §9): switching, cached continuation, padding, references, generation,
errors."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from transformers import AutoModelForCausalLM

import oryx
from oryx import ATTN, OryxCache, OryxConfig, OryxForCausalLM
from oryx.ops.attention import count_score_elements

ORYX_VARIANTS = oryx.variants.oryx_variants()
ALL_VARIANTS = list(oryx.variants.VARIANTS)
RECURRENT_VARIANTS = [name for name, row in oryx.variants.VARIANTS.items() if row.recurrence is not None]


def tiny_config(variant: str, **overrides) -> OryxConfig:
    """Two layers, 2 heads of 32, chunk 16 so that short sequences cross chunk boundaries; a larger init so every
    mixer contributes visibly to the logits."""
    fields = dict(
        variant=variant,
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        head_dim=32,
        chunk_size=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        mamba_head_dim=16,
        mamba_d_state=32,
        gdn_num_heads=2,
        gdn_head_dim_v=48,
    )
    fields.update(overrides)
    return OryxConfig(**fields)


def tiny_model(variant: str, gen: torch.Generator, **overrides) -> OryxForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = OryxForCausalLM(tiny_config(variant, **overrides)).eval()
    with torch.no_grad():  # random, non-trivial decay/step parameters rather than the init's
        for module in model.modules():
            if hasattr(module, "A_log"):
                module.A_log.uniform_(-1.0, 1.5, generator=gen)
                module.dt_bias.uniform_(-3.0, 1.0, generator=gen)
    return model


def random_modes(batch: int, length: int, gen: torch.Generator, variant: str) -> torch.Tensor:
    """Random spans of 1–20 tokens alternating modes (short spans included), or the baseline's only mode."""
    if variant not in ORYX_VARIANTS:
        return torch.full((batch, length), OryxConfig._check_default_mode(variant, None))
    modes = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        pos, mode = 0, int(torch.randint(0, 2, (1,), generator=gen))
        while pos < length:
            span = (
                int(torch.randint(1, 4, (1,), generator=gen))
                if torch.rand(1, generator=gen) < 0.4
                else int(torch.randint(4, 21, (1,), generator=gen))
            )
            modes[b, pos : pos + span] = mode
            pos, mode = pos + span, 1 - mode
    return modes


def random_pieces(total: int, gen: torch.Generator) -> list[int]:
    sizes, left = [], total
    choices = [1, 2, 3, 17, 5, 1, 31, 2]
    while left > 0:
        size = min(left, choices[int(torch.randint(0, len(choices), (1,), generator=gen))])
        sizes.append(size)
        left -= size
    return sizes


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_full_forward_equals_prefill_plus_pieces(variant, gen):
    model = tiny_model(variant, gen)
    B, T = 2, 70
    ids = torch.randint(0, 97, (B, T), generator=gen)
    modes = random_modes(B, T, gen, variant)
    with torch.no_grad():
        full = model(ids, modes=modes).logits
        prefix = int(torch.randint(1, 40, (1,), generator=gen))
        cache = OryxCache(model.config)
        pieces = [model(ids[:, :prefix], modes=modes[:, :prefix], cache=cache).logits]
        pos = prefix
        for size in random_pieces(T - prefix, gen):
            pieces.append(
                model(ids[:, pos : pos + size], modes=modes[:, pos : pos + size], past_key_values=cache).logits
            )
            pos += size
    assert cache.get_seq_length() == T
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-4


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_switch_at_every_kind_of_boundary(variant, gen):
    """Switches both ways, one-token spans, at and across chunk boundaries (chunk 16), decoded token by token."""
    model = tiny_model(variant, gen)
    T = 50
    modes = torch.ones(1, T, dtype=torch.long)
    for start, stop in [(15, 16), (16, 17), (20, 23), (31, 34), (47, 50)]:
        modes[:, start:stop] = ATTN
    ids = torch.randint(0, 97, (1, T), generator=gen)
    with torch.no_grad():
        full = model(ids, modes=modes).logits
        cache = OryxCache(model.config)
        steps = [model(ids[:, t : t + 1], modes=modes[:, t : t + 1], cache=cache).logits for t in range(T)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_modes_change_the_output_only_where_selected(variant, gen):
    """Flipping the mode of one token changes that token's output and (through later layers) later tokens, never
    earlier ones; and the two modes really differ."""
    model = tiny_model(variant, gen)
    ids = torch.randint(0, 97, (1, 40), generator=gen)
    modes = random_modes(1, 40, gen, variant)
    flipped = modes.clone()
    flipped[0, 25] = 1 - flipped[0, 25]
    with torch.no_grad():
        a, b = model(ids, modes=modes).logits, model(ids, modes=flipped).logits
    assert torch.equal(a[:, :25], b[:, :25])
    assert rel_err(a[:, 25], b[:, 25]) > 1e-3


def _mixer_inputs(model, ids):
    """The normalised hidden input of layer 0's mixer."""
    return model.model.layers[0].mixer_norm(model.model.embed_tokens(ids))


def _shared_kv(mixer, x):
    """Independent recomputation of the shared keys/values: projections, causal depthwise conv (loop), TG SiLU."""
    B, T, _ = x.shape
    kv = torch.cat([x @ mixer.k_proj.weight.T, x @ mixer.v_proj.weight.T], -1).double()
    W = mixer.conv_weight.shape[1]
    padded = torch.cat([kv.new_zeros(B, W - 1, kv.shape[-1]), kv], 1)
    conv = torch.stack([(padded[:, t : t + W] * mixer.conv_weight.double().T).sum(1) for t in range(T)], 1)
    if mixer.recurrence.feature_silu:  # Gated DeltaNet style (Oryx-TG)
        conv = F.silu(conv)
    H, d = mixer.num_heads, mixer.head_dim
    k, v = conv.view(B, T, 2, H, d).unbind(2)
    return k, v


def _rope64(x, theta):
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def _finish(mixer, x, o):
    """Shared gated norm + output projection, in float64."""
    B, T = x.shape[:2]
    gate = F.silu(x.double() @ mixer.g_proj.weight.double().T)
    w = mixer.norm_weight.double()
    if mixer.recurrence.output_norm == "full":  # Mamba-2 style (Oryx-TM)
        y = o.reshape(B, T, -1) * gate
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + mixer.eps) * w
    else:
        y = (o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mixer.eps) * w).reshape(B, T, -1) * gate
    return y @ mixer.o_proj.weight.double().T


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_all_attention_equals_plain_softmax_attention(variant, gen):
    model = tiny_model(variant, gen)
    mixer = model.model.layers[0].mixer
    ids = torch.randint(0, 97, (2, 37), generator=gen)
    with torch.no_grad():
        x = _mixer_inputs(model, ids)
        got = mixer(x, model.model._context(torch.zeros_like(ids), None, None, 2, 37, x.device))
        k, v = _shared_kv(mixer, x)
        q = (x.double() @ mixer.q_attn.weight.double().T).view(k.shape)
        if mixer.recurrence.feature_silu:  # Gated DeltaNet style pairing (TG, TK): SiLU on both queries
            q = F.silu(q)
        q, k = _rope64(q, mixer.rope_theta), _rope64(k, mixer.rope_theta)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(k.shape[-1])
        scores = scores.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
        want = _finish(mixer, x, o)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_all_linear_equals_plain_recurrence(variant, gen):
    model = tiny_model(variant, gen)
    mixer = model.model.layers[0].mixer
    B, T = 2, 37
    ids = torch.randint(0, 97, (B, T), generator=gen)
    with torch.no_grad():
        x = _mixer_inputs(model, ids)
        got = mixer(x, model.model._context(torch.ones_like(ids), None, None, B, T, x.device))
        k, v = _shared_kv(mixer, x)
        xd = x.double()
        q = (xd @ mixer.q_linear.weight.double().T).view(k.shape)
        A = -mixer.recurrence.A_log.double().exp()
        H, d = mixer.num_heads, mixer.head_dim
        S = torch.zeros(B, H, d, d, dtype=torch.float64)
        outs = []
        if variant in ("tg", "tk"):  # delta rules: per-head (TG) or per-key-channel (TK) decay
            q = F.normalize(F.silu(q), dim=-1, eps=0)
            k = F.normalize(k, dim=-1, eps=0)
            rec = mixer.recurrence
            beta = torch.sigmoid(xd @ rec.b_proj.weight.double().T)
            if variant == "tg":
                decay = torch.exp(A * F.softplus(xd @ rec.a_proj.weight.double().T + rec.dt_bias.double()))
                decay = decay[..., None].expand(B, T, H, d)
            else:
                logits = (xd @ rec.a_down.weight.double().T @ rec.a_up.weight.double().T).view(B, T, H, d)
                decay = torch.exp(A[:, None] * F.softplus(logits + rec.dt_bias.double().view(H, d)))
            for t in range(T):
                kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
                S = decay[:, t, :, :, None] * S  # decay each key row, then the delta-rule write
                S = S + bt * kt[..., :, None] * (vt[..., None, :] - kt[..., None, :] @ S)
                outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) / math.sqrt(d))
            o = torch.stack(outs, 1)
        else:
            dt = F.softplus(xd @ mixer.recurrence.dt_proj.weight.double().T + mixer.recurrence.dt_bias.double())
            q, k = _rope64(q, mixer.rope_theta), _rope64(k, mixer.rope_theta)
            for t in range(T):
                S = (
                    torch.exp(dt[:, t] * A)[..., None, None] * S
                    + (dt[:, t, :, None] * k[:, t])[..., :, None] * v[:, t][..., None, :]
                )
                outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
            o = torch.stack(outs, 1) + mixer.recurrence.D.double()[:, None] * v
        want = _finish(mixer, x, o)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_left_padding_changes_nothing(variant, gen):
    model = tiny_model(variant, gen)
    lengths = [23, 15]
    T = max(lengths)
    rows = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    row_modes = [random_modes(1, n, gen, variant) for n in lengths]
    ids = torch.zeros(2, T, dtype=torch.long)
    modes = torch.full((2, T), model.config.default_mode)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n :], modes[b, T - n :], mask[b, T - n :] = rows[b], row_modes[b], 1
        ids[b, : T - n] = torch.randint(0, 97, (T - n,), generator=gen)  # garbage under the padding
    with torch.no_grad():
        batch_cache = OryxCache(model.config)
        batch = model(ids, modes=modes, attention_mask=mask, cache=batch_cache).logits
        # continue both rows by a few tokens: the padded row must keep matching
        more = torch.randint(0, 97, (2, 4), generator=gen)
        more_modes = random_modes(2, 4, gen, variant)
        mask2 = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
        batch_next = model(more, modes=more_modes, attention_mask=mask2, cache=batch_cache).logits
        for b, n in enumerate(lengths):
            cache = OryxCache(model.config)
            alone = model(rows[b], modes=row_modes[b], cache=cache).logits
            assert rel_err(batch[b : b + 1, T - n :], alone) <= 1e-4
            alone_next = model(more[b : b + 1], modes=more_modes[b : b + 1], cache=cache).logits
            assert rel_err(batch_next[b : b + 1], alone_next) <= 1e-4
            for padded_state, own_state in zip(batch_cache.layers, cache.layers, strict=False):
                if own_state.recurrent is not None:
                    assert rel_err(padded_state.recurrent[b : b + 1], own_state.recurrent) <= 1e-5
                    assert rel_err(padded_state.conv[b : b + 1], own_state.conv) <= 1e-5
                if own_state.key is not None:
                    real = mask2[b].bool()
                    assert rel_err(padded_state.key[b, real], own_state.key[0]) <= 1e-5


@pytest.mark.parametrize("variant", ORYX_VARIANTS)
def test_generate_with_switching_schedule_equals_manual_stepping(variant, gen):
    model = tiny_model(variant, gen)
    prompt = torch.randint(0, 97, (2, 12), generator=gen)
    spec = "spans:linear@0,attn@9,linear@15,attn@17"
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            schedule=spec,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
        )
        sched = oryx.schedule.parse(spec)
        cache = OryxCache(model.config)
        logits = model(prompt, modes=sched.modes(2, 12), cache=cache).logits[:, -1]
        tokens = []
        for pos in range(12, 22):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = model(nxt, modes=sched.modes(2, 1, offset=pos), cache=cache).logits[:, -1]
    assert torch.equal(out[:, 12:], torch.cat(tokens, 1))


def test_generate_tail_schedule_and_sampling(gen):
    model = tiny_model("tg", gen)
    prompt = torch.randint(0, 97, (1, 20), generator=gen)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(prompt, schedule="tail:attn=4", max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(0)
        b = model.generate(prompt, schedule="tail:attn=4", max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert a.shape == (1, 26) and torch.equal(a, b)


def test_beam_search_reorders_both_states(gen):
    model = tiny_model("tg", gen)
    prompt = torch.randint(0, 97, (2, 10), generator=gen)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        schedule="spans:linear@0,attn@12",
        max_new_tokens=6,
        num_beams=3,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_save_load_round_trip_and_auto_class(tmp_path, gen):
    model = tiny_model("tm", gen)
    ids = torch.randint(0, 97, (2, 19), generator=gen)
    modes = random_modes(2, 19, gen, "tm")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = OryxForCausalLM.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, OryxForCausalLM)
    with torch.no_grad():
        want = model(ids, modes=modes).logits
        assert torch.equal(loaded(ids, modes=modes).logits, want)
        assert torch.equal(auto(ids, modes=modes).logits, want)


def test_loss_shifts_labels(gen):
    model = tiny_model("tg", gen)
    ids = torch.randint(0, 97, (2, 16), generator=gen)
    out = model(ids, labels=ids)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - want.item()) < 1e-6


def test_gradient_checkpointing_gives_same_gradients(gen):
    model = tiny_model("tg", gen).train()
    ids = torch.randint(0, 97, (2, 24), generator=gen)
    modes = random_modes(2, 24, gen, "tg")
    model(ids, modes=modes, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, modes=modes, labels=ids).loss.backward()
    for want, p in zip(plain, model.parameters(), strict=False):
        assert rel_err(p.grad, want) <= 1e-5


def test_attention_work_scales_with_attention_rows(gen):
    """10% of tokens in attention (2 of 20 128-token chunks): the model computes ≤ 15% of full causal attention's
    scores (≈ 10.5% expected; 8 sequences so that one unlucky draw of late chunks cannot decide the test)."""
    config = tiny_config("tg", num_hidden_layers=1, max_position_embeddings=4096)
    model = OryxForCausalLM(config).eval()
    B, T = 8, 2560
    modes = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        for c in torch.randperm(T // 128, generator=gen)[:2].tolist():
            modes[b, c * 128 : (c + 1) * 128] = ATTN
    assert (modes == ATTN).float().mean() == 0.1
    ids = torch.randint(0, 97, (B, T), generator=gen)
    with torch.no_grad(), count_score_elements() as counter:
        model(ids, modes=modes)
    full = B * config.num_heads * T * (T + 1) // 2
    assert 0 < counter.value <= 0.15 * full


def test_bad_inputs_raise_clear_errors(gen):
    model = tiny_model("tg", gen)
    ids = torch.randint(0, 97, (2, 8), generator=gen)
    with pytest.raises(ValueError, match=r"modes has shape \[2, 7\] but input_ids has \[2, 8\]"):
        model(ids, modes=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(ids, modes=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="modes contains 2"):
        model(ids, modes=torch.full((2, 8), 2))
    with pytest.raises(ValueError, match="accepts only"):
        tiny_model("transformer", gen)(ids, modes=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="schedule"):
        model.generate(ids, schedule="chunk:size=128", max_new_tokens=2)
    other = OryxCache(tiny_config("tm"))
    with pytest.raises(ValueError, match="different model"):
        model(ids, cache=other)
    cache = OryxCache(model.config)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="holds 2 rows"):
        model(ids[:1], cache=cache)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.randint(0, 97, (1, 257), generator=gen))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="unknown preset"):
        OryxConfig.from_preset("oryx-tx-130m")


def test_small_config_with_defaults_builds_and_runs(gen):
    model = OryxForCausalLM(OryxConfig(variant="tg", vocab_size=512, hidden_size=256, num_hidden_layers=2))
    ids = torch.randint(0, 512, (1, 9), generator=gen)
    out = model(ids, modes=torch.randint(0, 2, (1, 9), generator=gen), labels=ids)
    assert out.logits.shape == (1, 9, 512) and torch.isfinite(out.loss)
    out.loss.backward()


PAPER_SIZES = {"130m": 130.6e6, "380m": 378.6e6, "810m": 813.3e6, "1.4b": 1411.5e6}


@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_param_report_matches_paper_labels(size):
    with torch.device("meta"):
        models = {
            fam: OryxForCausalLM(OryxConfig.from_preset(f"{fam}-{size}"))
            for fam in ["oryx-tg", "oryx-tm", "transformer", "mamba2", "gdn"]
        }
    reports = {fam: oryx.param_report(m, verbose=False) for fam, m in models.items()}
    for fam in ("oryx-tg", "oryx-tm"):
        r = reports[fam]
        assert r["shared_fraction"] >= 0.90
        assert abs(r["active_attention_with_embedding"] / PAPER_SIZES[size] - 1) < 0.01
    target = reports["oryx-tg"]["active_attention"]
    for fam in ("transformer", "mamba2", "gdn"):  # baselines: MLPs widened to Oryx's active parameters
        assert abs(reports[fam]["active_attention" if fam == "transformer" else "active_linear"] / target - 1) < 0.01


@pytest.mark.parametrize("variant", RECURRENT_VARIANTS)
def test_config_chunk_size_reaches_the_recurrence(variant, gen, monkeypatch):
    """The tests above rely on chunk 16 so that short sequences cross chunk boundaries: check it is really used."""
    from oryx.ops import dispatch

    seen = []
    resolve = dispatch.resolve

    def recording(op, x, backend="auto"):
        chosen = resolve(op, x, backend)
        if op == "causal_conv1d" or op == "causal_attention":
            return chosen
        return dataclasses.replace(chosen, fn=lambda *a, **kw: seen.append(kw["chunk_size"]) or chosen.fn(*a, **kw))

    monkeypatch.setattr(dispatch, "resolve", recording)
    model = tiny_model(variant, gen)
    model(torch.randint(0, 97, (1, 40), generator=gen), modes=torch.full((1, 40), oryx.LINEAR))
    assert seen == [16] * model.config.num_hidden_layers
