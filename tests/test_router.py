"""Dynamic mode selection (issue 14): the budget rule, router-driven forwards against explicit modes, prefill + decode,
causality, training that leaves the language model bit-identical, bad specs, and the router's file in the manifest."""

from __future__ import annotations

import hashlib
import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import error_line, run_cli, tiny

import oryx
from oryx import ATTN, LINEAR
from oryx.checkpoint import CheckpointError, load_pretrained, read
from oryx.data import load_tokenizer
from oryx.eval.budget import POLICIES, SCHEDULE_POLICIES, placement
from oryx.eval.inference import ModeRule, greedy_generate
from oryx.eval.mqar_run import MQARSweepConfig, build_model, load_mqar_model, save_mqar_model
from oryx.eval.perplexity import evaluate
from oryx.eval.tasks.mqar import MQARConfig
from oryx.manifest import MANIFEST
from oryx.modeling import CACHE_FIELD
from oryx.routing import ROUTER_FILE, Router, RouterConfig, RoutingState, calibrate_threshold, decide, load_router
from oryx.routing.budget import OWN, PREVIOUS, realised_fraction
from oryx.routing.router import store_router
from oryx.routing.training import RouterTraining, SoftRoute, gains, train_router, train_router_straight_through
from oryx.schedule import parse
from oryx.training import train
from oryx.variants import variant

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

VOCAB, T = 320, 48  # the byte tokenizer's ids fit the vocabulary


def tiny_model(variant_name: str = "tg", seed: int = 0) -> oryx.OryxForCausalLM:
    torch.manual_seed(seed)
    config = oryx.OryxConfig(variant=variant_name, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32)
    return oryx.OryxForCausalLM(config).eval()


def random_router(model: oryx.OryxForCausalLM, gen: torch.Generator, seen_before: bool = True) -> Router:
    """A router with random weights, calibrated on the scores of random windows (so every budget has a threshold)."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    config = RouterConfig(hidden_size=model.config.hidden_size, variant=model.config.variant, seen_before=seen_before)
    router = Router(config).eval()
    ids = torch.randint(VOCAB, (8, T), generator=gen)
    batches = [(ids, torch.full_like(ids, -100))]
    router.set_calibration(_scores(model, router, batches))
    return router


def _scores(model, router, batches) -> torch.Tensor:
    _, features = gains(model, *batches[0], seen=router.config.seen_before)
    with torch.no_grad():
        return router.score_features(features)


@pytest.fixture(params=[True, False], ids=["seen-before", "no-seen-before"])
def model_with_router(gen, request):
    """A tiny Oryx-TG model with a random router: one that reads the seen-before bits, and one from before them."""
    model = tiny_model()
    model.attach_router(random_router(model, gen, seen_before=request.param))
    return model


def seen_reference(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The seen-before bits as a plain loop: a set of the ids each row has read, padding skipped."""
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(ids.shape[0]):
        met: set[int] = set()
        for t in range(ids.shape[1]):
            if mask is None or mask[b, t]:
                out[b, t] = int(ids[b, t]) in met
                met.add(int(ids[b, t]))
    return out


# --- the budget rule ----------------------------------------------------------------------------------------------
def reference_modes(scores, threshold: float, budget: float, chunk: int, score_from: str) -> np.ndarray:
    """The rule of oryx.routing.budget as a plain loop in exact arithmetic, one row at a time, from position 0."""
    out = np.full(scores.shape, LINEAR)
    for b, row in enumerate(scores):
        count, mode = 0, LINEAR
        for p in range(len(row)):
            if p % chunk == 0:
                previous = float(np.mean(row[p - chunk : p])) if p else -math.inf
                score = row[p] if score_from == OWN else previous
                cap = math.ceil(Fraction(str(budget)) * (p + chunk)) + chunk
                mode = ATTN if budget > 0 and score >= threshold and count + chunk <= cap else LINEAR
            count += mode == ATTN
            out[b, p] = mode
    return out


@pytest.mark.parametrize("chunk, score_from", [(1, OWN), (8, OWN), (8, PREVIOUS)])
@pytest.mark.parametrize("budget", [0.0, 0.03, 0.1, 0.5, 1.0])
def test_budget_rule_never_exceeds_the_budget_plus_one_unit(gen, chunk, score_from, budget):
    """At every prefix, attention tokens ≤ ceil(budget · (t + 1)) + one unit, for random scores decided in random
    pieces (the counts carried in a RoutingState); the modes equal a plain loop of the rule over the whole rows."""
    scores = torch.randn(4, 300, generator=gen).double().numpy()
    threshold = float(np.quantile(scores, float(torch.rand((), generator=gen)) * 0.8))
    state, parts, start = RoutingState.new(4), [], 0
    while start < scores.shape[1]:
        n = int(torch.randint(1, 40, (1,), generator=gen))
        positions = np.broadcast_to(np.arange(start, start + n), (4, n))[:, : scores.shape[1] - start]
        piece = scores[:, start : start + positions.shape[1]]
        real = np.ones(piece.shape, bool)
        parts.append(decide(piece, positions, real, state, threshold=threshold, budget=budget, chunk=chunk,
                            score_from=score_from))  # fmt: skip
        start += positions.shape[1]
    modes = np.concatenate(parts, axis=1)
    counts = (modes == ATTN).cumsum(1)
    bound = np.array([math.ceil(Fraction(str(budget)) * (t + 1)) + chunk for t in range(scores.shape[1])])
    assert (counts <= bound).all()
    if budget == 0:
        assert not counts.any()
    np.testing.assert_array_equal(modes, reference_modes(scores, threshold, budget, chunk, score_from))


def test_budget_rule_skips_padding_and_counts_real_positions(gen):
    """Padded positions are never attention and do not count: a left-padded row decides as the row alone does."""
    scores = torch.randn(1, 50, generator=gen).double().numpy()
    alone = decide(scores, np.arange(50)[None], np.ones((1, 50), bool), RoutingState.new(1), threshold=0.0,
                   budget=0.2, chunk=1)  # fmt: skip
    padded_scores = np.concatenate([np.full((1, 7), 9.0), scores], axis=1)  # high scores at the padding
    positions = np.concatenate([np.zeros((1, 7), int), np.arange(50)[None]], axis=1)
    real = np.concatenate([np.zeros((1, 7), bool), np.ones((1, 50), bool)], axis=1)
    padded = decide(padded_scores, positions, real, RoutingState.new(1), threshold=0.0, budget=0.2, chunk=1)
    assert (padded[:, :7] == LINEAR).all()
    np.testing.assert_array_equal(padded[:, 7:], alone)


@pytest.mark.parametrize("chunk, score_from", [(1, OWN), (8, PREVIOUS)])
def test_calibrated_threshold_realises_the_budget(gen, chunk, score_from):
    """τ(budget) from calibration rows realises about the budget on them, also when high scores cluster early."""
    rows = [torch.randn(256, generator=gen).double().numpy() + np.linspace(1, 0, 256) for _ in range(24)]
    for budget in (0.05, 0.1, 0.25):
        threshold = calibrate_threshold(rows, budget, chunk, score_from)
        assert abs(realised_fraction(rows, threshold, budget, chunk, score_from) - budget) < 0.02
    assert calibrate_threshold(rows, 0.0, chunk) == math.inf and calibrate_threshold(rows, 1.0, chunk) == -math.inf


# --- routed forwards ----------------------------------------------------------------------------------------------
ROUTED = ["router:budget=0.2", "router:budget=0.3,chunk=8", "random:budget=0.25,chunk=4,seed=3",
          "entropy:threshold=5.0,budget=0.3"]  # fmt: skip


@pytest.mark.parametrize("spec", ROUTED)
def test_a_routed_forward_equals_the_forward_given_its_modes(model_with_router, gen, spec):
    """model(ids, schedule=spec) computes exactly what model(ids, modes=out.modes) computes, left padding included;
    the routing is deterministic."""
    model = model_with_router
    ids = torch.randint(VOCAB, (3, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model(ids, schedule=spec, attention_mask=mask)
    assert out.modes.shape == (3, T) and (out.modes == ATTN).any() and (out.modes == LINEAR).any()
    assert (out.modes[1, :5] == LINEAR).all() or not (mask[1, :5]).any()
    again = model(ids, schedule=spec, attention_mask=mask)
    assert torch.equal(again.modes, out.modes)
    explicit = model(ids, modes=out.modes, attention_mask=mask)
    assert torch.equal(explicit.logits, out.logits)


@pytest.mark.parametrize("spec", ROUTED)
def test_the_chunked_loss_under_a_routed_schedule(model_with_router, gen, spec):
    """The chunked loss (no logits) routes as the plain one does, and equals it; a schedule whose budget rule reads
    the forward's logits (entropy) refuses it instead of losing its state."""
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    plain = model_with_router(ids, labels=ids, schedule=spec)
    if spec.startswith("entropy"):
        with pytest.raises(ValueError, match="loss_chunk_tokens=0"):
            model_with_router(ids, labels=ids, schedule=spec, loss_chunk_tokens=8)
        return
    chunked = model_with_router(ids, labels=ids, schedule=spec, loss_chunk_tokens=8)
    assert torch.equal(chunked.modes, plain.modes) and chunked.logits is None
    assert abs(chunked.loss.item() - plain.loss.item()) < 1e-5


@pytest.mark.parametrize("spec", ["router:budget=0.2", "router:budget=0.3,chunk=8", "entropy:threshold=5.0"])
def test_a_row_is_routed_as_it_is_alone(model_with_router, gen, spec):
    ids = torch.randint(VOCAB, (3, T), generator=gen)
    together = model_with_router(ids, schedule=spec).modes
    for row in range(3):
        assert torch.equal(model_with_router(ids[row : row + 1], schedule=spec).modes[0], together[row])


@pytest.mark.parametrize("spec, unit", [("router:budget=0.3", 1), ("router:budget=0.3,chunk=8", 8)])
def test_a_mode_depends_only_on_earlier_tokens(model_with_router, gen, spec, unit):
    """Changing token q changes no mode before q (token units) and none of a chunk that starts at or before q."""
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    modes = model_with_router(ids, schedule=spec).modes
    for q in (5, 17, 30, 41):
        changed = ids.clone()
        changed[:, q:] = torch.randint(VOCAB, changed[:, q:].shape, generator=gen)
        fixed = q if unit == 1 else (q // unit + 1) * unit
        assert torch.equal(model_with_router(changed, schedule=spec).modes[:, :fixed], modes[:, :fixed])


@pytest.mark.parametrize("spec", ROUTED)
def test_prefill_and_decode_equal_the_full_forward_with_the_modes_chosen(model_with_router, gen, spec):
    """A prefill and then one token at a time from the cache equals one forward over the whole sequence with the
    modes the routed pieces chose (1e-4); the router and random schedules choose exactly the full forward's modes."""
    from conftest import rel_err

    model = model_with_router
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    prefill = 29
    out = model(ids[:, :prefill], schedule=spec, use_cache=True)
    cache, logits, modes = getattr(out, CACHE_FIELD), [out.logits], [out.modes]
    for t in range(prefill, T):
        step = model(ids[:, t : t + 1], schedule=spec, cache=cache)
        logits.append(step.logits)
        modes.append(step.modes)
    modes = torch.cat(modes, dim=1)
    assert torch.equal(cache.modes, modes)
    full = model(ids, modes=modes)
    assert rel_err(torch.cat(logits, dim=1), full.logits) < 1e-4
    if not spec.startswith("entropy"):  # entropy decodes from the distributions produced, not a linear look-ahead
        assert torch.equal(model(ids, schedule=spec).modes, modes)


def test_generate_under_a_router_equals_stepping_by_hand(model_with_router, gen):
    model = model_with_router
    prompt = torch.randint(VOCAB, (1, 20), generator=gen)
    out = model.generate(prompt, schedule="router:budget=0.3", max_new_tokens=8, do_sample=False,
                         return_dict_in_generate=True)  # fmt: skip
    ids, step = prompt, model(prompt, schedule="router:budget=0.3", use_cache=True)
    cache = getattr(step, CACHE_FIELD)
    for _ in range(8):
        ids = torch.cat([ids, step.logits[:, -1:].argmax(-1)], dim=1)
        step = model(ids[:, -1:], schedule="router:budget=0.3", cache=cache)
    assert torch.equal(out.sequences, ids)
    generated = getattr(out, CACHE_FIELD)
    assert torch.equal(generated.modes, cache.modes[:, : generated.modes.shape[1]])


@pytest.mark.parametrize("pieces", [[T], [7, 1, 20, 1, 1, 18]])
def test_seen_before_bits_equal_a_plain_loop_across_forwards(gen, pieces):
    """Ids from a small range (many repeats), left padding in one row, the sequence cut into forwards that carry the
    table: the bits equal the plain loop's over the whole rows."""
    from oryx.routing import seen_before

    ids = torch.randint(12, (3, T), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, :9] = False
    table, got, start = torch.zeros(3, 12, dtype=torch.bool), [], 0
    for length in pieces:
        part = slice(start, start + length)
        got.append(seen_before(ids[:, part], mask[:, part], table if len(pieces) > 1 else None))
        start += length
    expected = seen_reference(ids, mask)
    assert expected.any() and torch.equal(torch.cat(got, dim=1), expected)
    worked = torch.tensor([[3, 1, 3, 2, 1, 3], [5, 5, 5, 0, 1, 0]])  # by hand
    want = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(seen_before(worked), want)


def seen_only_router(model: oryx.OryxForCausalLM, monkeypatch) -> Router:
    """A seen-before router whose score is GELU(r_t) (0.84 for a repeated id, 0 otherwise), with τ = 0.5 at every
    budget: at budget 1 it puts exactly the repeated ids in attention."""
    D = model.config.hidden_size
    router = Router(RouterConfig(hidden_size=D, variant=model.config.variant, width=1, seen_before=True)).eval()
    with torch.no_grad():
        router.net[0].weight.zero_()
        router.net[0].weight[0, 2 * D] = 1.0
        router.net[0].bias.zero_()
        router.net[2].weight.fill_(1.0)
        router.net[2].bias.zero_()
    monkeypatch.setattr(router, "threshold", lambda budget, chunk=1: 0.5)
    return router


def test_a_seen_before_router_attends_at_repeated_ids_through_prefill_decode_and_beams(gen, monkeypatch):
    """The modes are the plain loop's seen-before bits in one forward (left padding included), in a prefill followed
    by decoding (the cache keeps the ids read), and after the cache's rows are reordered (beam search); a routed
    forward of inputs_embeds is refused, naming input_ids."""
    model = tiny_model()
    model.attach_router(seen_only_router(model, monkeypatch))
    spec = "router:budget=1.0"
    ids = torch.randint(10, (2, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    out = model(ids, schedule=spec, attention_mask=mask)
    repeated = seen_reference(ids, mask.bool())
    assert repeated.any() and torch.equal(out.modes, torch.where(repeated, ATTN, LINEAR))

    prefill = 21
    step = model(ids[:, :prefill], schedule=spec, use_cache=True)
    cache, modes = getattr(step, CACHE_FIELD), [step.modes]
    cache.reorder_cache(torch.tensor([1, 0]))  # the rows swap: the continuation is the other row's
    swapped = ids.flip(0)
    for t in range(prefill, T):
        modes.append(model(swapped[:, t : t + 1], schedule=spec, cache=cache).modes)
    mixed = torch.cat([ids[:, :prefill].flip(0), swapped[:, prefill:]], dim=1)
    expected = torch.where(seen_reference(mixed), ATTN, LINEAR)
    assert torch.equal(torch.cat([modes[0].flip(0), *modes[1:]], dim=1), expected)

    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(ids), schedule=spec)


def test_entropy_modes_follow_the_linear_entropy_of_the_position_before(gen):
    """Without a budget, position t is attention iff the all-linear forward's next-token entropy at t − 1 is above the
    threshold (computed here from its logits)."""
    model = tiny_model()
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    logp = model(ids, modes=torch.full_like(ids, LINEAR)).logits.detach().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    threshold = float(entropy.median())
    modes = model(ids, schedule=f"entropy:threshold={threshold}").modes
    expected = torch.full_like(ids, LINEAR)
    expected[:, 1:] = torch.where(entropy[:, :-1] >= threshold, ATTN, LINEAR)
    assert torch.equal(modes, expected)


def test_perplexity_reports_the_realised_fraction_of_a_routed_schedule(model_with_router, gen):
    tokens = torch.randint(VOCAB, (4 * T + 1,), generator=gen).numpy()
    result = evaluate(model_with_router, tokens, T, "router:budget=0.2", batch_size=2)
    modes = torch.cat([model_with_router(torch.from_numpy(tokens[i * T : i * T + T][None]).long(),
                                         schedule="router:budget=0.2").modes for i in range(4)])  # fmt: skip
    assert result.attention_fraction == pytest.approx(float((modes == ATTN).float().mean()))
    positions = torch.arange(1, T + 1).expand_as(modes)
    assert result.attention_scores == int(positions[modes == ATTN].sum())


def test_greedy_generate_under_an_adaptive_rule_counts_the_modes_used(gen):
    tokenizer = load_tokenizer("byte")
    model = tiny_model()
    prompts = [tokenizer.encode(t) for t in ("hello there, general", "abc def")]
    rule = ModeRule("entropy:threshold=5.7,budget=0.4")  # a rule that routes a row as it routes it alone
    generations = greedy_generate(model, tokenizer, prompts, rule, max_new_tokens=5, batch_size=2)
    for prompt, generation in zip(prompts, generations, strict=True):
        suppress = list(range(len(tokenizer), VOCAB))
        out = model.generate(torch.tensor([prompt]), schedule=rule.schedule, max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True, suppress_tokens=suppress)  # fmt: skip
        read = getattr(out, CACHE_FIELD).modes[0, : generation.tokens]
        assert generation.attention_tokens == int((read == ATTN).sum())


# --- training ----------------------------------------------------------------------------------------------------
def test_gains_are_the_difference_of_two_plain_forwards(gen):
    model = tiny_model()
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    labels = torch.randint(VOCAB, (2, T), generator=gen)
    labels[0, :10] = -100
    delta, features = gains(model, ids, labels)

    def nll(mode: int) -> torch.Tensor:
        logp = model(ids, modes=torch.full_like(ids, mode)).logits.double().log_softmax(-1)
        return -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]

    expected = torch.where(labels == -100, 0.0, nll(LINEAR) - nll(ATTN))
    torch.testing.assert_close(delta.double(), expected, rtol=1e-4, atol=1e-4)
    assert features.shape == (2, T, 2 * model.config.hidden_size + 1)
    assert torch.equal(features[..., -1].bool(), seen_reference(ids))
    _, without = gains(model, ids, labels, seen=False)
    assert torch.equal(without, features[..., :-1])


@pytest.mark.parametrize("method", ["regression", "straight-through"])
def test_training_a_router_leaves_every_lm_weight_bit_identical(gen, method):
    model = tiny_model()
    ids = torch.randint(VOCAB, (4, T + 1), generator=gen)
    batches = [(ids[:2, :-1], ids[:2, 1:]), (ids[2:, :-1], ids[2:, 1:])]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    settings = RouterTraining(steps=6, batch_tokens=64, budget=0.25)
    trainer = train_router if method == "regression" else train_router_straight_through
    router = trainer(model, batches, settings, log=lambda line: None)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert router.calibration.shape == (4, T) and router.config.method == method
    if method == "straight-through":  # the same step with the LM joint does change it: the check above can fail
        joint = train_router_straight_through(model, batches, RouterTraining(steps=2, joint=True), log=lambda _: None)
        assert joint is not None and not all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_the_soft_select_is_the_hard_selection_forward_and_trains_the_router(gen):
    model = tiny_model()
    router = Router(RouterConfig(hidden_size=64, variant="tg"))
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    route = SoftRoute(router, budget=0.25)
    out = model.model(ids, route=route)
    hard = model.model(ids, modes=out.modes)
    torch.testing.assert_close(out.last_hidden_state, hard.last_hidden_state, rtol=1e-5, atol=1e-5)
    out.last_hidden_state.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.net.parameters())


# --- bad specs, missing routers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, needle",
    [("router:budget=2", "budget must be a fraction"), ("entropy:threshold=-1", "entropy threshold"),
     ("router:budget=0.1,chunk=0", "chunk must be a positive"), ("random:seed=1", "random needs budget")],
)  # fmt: skip
def test_bad_adaptive_specs_are_refused(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse(spec)


@pytest.mark.parametrize("family", ["gdn", "transformer"])
def test_a_baseline_refuses_adaptive_schedules(gen, family):
    model = tiny_model(variant(family).name)
    ids = torch.randint(VOCAB, (1, 8), generator=gen)
    for spec in ("router:budget=0.1", "random:budget=0.1", "entropy:threshold=2"):
        with pytest.raises(ValueError, match="chooses between attention and the linear mode"):
            model(ids, schedule=spec)
    with pytest.raises(ValueError, match="trained for a 'tg' model"):
        model.attach_router(Router(RouterConfig(hidden_size=64, variant="tg")))


def test_a_model_without_a_router_refuses_router_schedules_naming_the_command(gen):
    model = tiny_model()
    ids = torch.randint(VOCAB, (1, 8), generator=gen)
    with pytest.raises(ValueError, match="oryx train-router"):
        model(ids, schedule="router:budget=0.1")
    with pytest.raises(ValueError, match="oryx train-router"):
        model.generate(ids, schedule="router:budget=0.1", max_new_tokens=2)
    model.attach_router(random_router(model, gen))
    with pytest.raises(ValueError, match="cuda_graphs"):
        model.generate(ids, schedule="router:budget=0.1", max_new_tokens=2, cuda_graphs=True)


# --- the router's file ---------------------------------------------------------------------------------------------
def test_the_router_is_saved_and_loaded_through_the_manifest(model_with_router, tmp_path, gen):
    tokenizer = load_tokenizer("byte")
    folder = tmp_path / "model"
    tokenizer.save_pretrained(folder)
    model_with_router.save_pretrained(folder)
    assert ROUTER_FILE in json.loads((folder / MANIFEST).read_text())
    loaded, _, _ = load_pretrained(folder)
    assert loaded.router is not None and loaded.router.config == model_with_router.router.config
    for name, tensor in model_with_router.router.state_dict().items():
        torch.testing.assert_close(loaded.router.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True)
    ids = torch.randint(VOCAB, (2, T), generator=gen)
    routed = (m(ids, schedule="router:budget=0.2").modes for m in (loaded, model_with_router))
    assert torch.equal(*routed)
    assert "router" not in " ".join(loaded.state_dict())  # the LM's weights are the LM's alone

    # A router written after the manifest is refused as an unlisted weight file; store_router records it.
    bare = tmp_path / "bare"
    tokenizer.save_pretrained(bare)
    tiny_model().save_pretrained(bare)
    lm_sum = hashlib.sha256((bare / "model.safetensors").read_bytes()).hexdigest()
    load_router(folder / ROUTER_FILE)  # a router file reads on its own too
    (bare / ROUTER_FILE).write_bytes((folder / ROUTER_FILE).read_bytes())
    with pytest.raises(CheckpointError, match=ROUTER_FILE):
        load_pretrained(bare)
    store_router(load_router(folder / ROUTER_FILE), bare)
    assert load_pretrained(bare)[0].router is not None
    assert hashlib.sha256((bare / "model.safetensors").read_bytes()).hexdigest() == lm_sum
    (bare / ROUTER_FILE).write_bytes((bare / ROUTER_FILE).read_bytes()[:-8] + b"changed!")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_pretrained(bare)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny(corpus, out, steps=2, save_every=2, eval_every=2))
    return out


def test_train_router_command_stores_a_router_and_leaves_the_checkpoint(run, corpus, capsys):
    checkpoint = run / "checkpoints" / "step-00000002"
    error_line(capsys, ["eval", "ppl", str(run), "--schedule", "router:budget=0.1"], "oryx train-router",
               command="eval ppl")  # fmt: skip
    weights = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file() and p.name != MANIFEST}
    argv = ["train-router", str(run), "--steps", "4", "--windows", "4", "--batch-size", "2", "--device", "cpu"]
    assert run_cli(argv) == 0
    assert "router (" in capsys.readouterr().out
    assert all((checkpoint / name).read_bytes() == data for name, data in weights.items())
    assert ROUTER_FILE in json.loads((checkpoint / MANIFEST).read_text())
    assert not any("router" in key or "net." in key for key in read(checkpoint).model_state)  # resuming ignores it
    assert run_cli(["eval", "ppl", str(run), "--schedule", "router:budget=0.25", "--max-tokens", "64"]) == 0
    assert "router:budget=0.25" in capsys.readouterr().out
    error_line(capsys, ["train-router", str(run), "--joint"], "--joint", command="train-router")


# --- the budget evaluation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["head", "tail", "even"])
@pytest.mark.parametrize("budget, length", [(0.025, 512), (0.1, 512), (0.25, 100), (0.5, 64)])
def test_fixed_placements_hold_their_share_of_the_positions(kind, budget, length):
    modes = parse(placement(kind, budget, length, span=16)).modes(1, length, prompt_length=length)[0]
    attention = (modes == ATTN).nonzero().flatten()
    assert len(attention) == round(budget * length)
    if kind == "head":
        assert attention.max() == len(attention) - 1
    elif kind == "tail":
        assert attention.min() == length - len(attention)
    else:  # spans of at most 16, their centres spread over the whole sequence
        starts = [int(p) for i, p in enumerate(attention) if i == 0 or attention[i - 1] != p - 1]
        assert len(starts) == math.ceil(len(attention) / 16)
        assert attention.min() < length / 2 <= attention.max() or len(starts) == 1


def test_the_budget_command_compares_every_policy_at_equal_budgets(run, capsys, tmp_path):
    checkpoint = run / "checkpoints" / "step-00000002"
    if not (checkpoint / ROUTER_FILE).is_file():
        assert run_cli(["train-router", str(run), "--steps", "2", "--windows", "4", "--batch-size", "2"]) == 0
    out = tmp_path / "budget"
    argv = ["eval", "budget", str(run), "--budgets", "0", "0.25", "1", "--max-tokens", "128", "--chunk", "8",
            "--calibration-windows", "2", "--batch-size", "2", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert run_cli(argv) == 0
    capsys.readouterr()
    result = json.loads((out / "budget-ppl.json").read_text())
    cells = {(r["protocol"], r["setting"]): r for r in result["rows"]}
    assert {p for p, _ in cells} == set(POLICIES)
    assert cells["oracle", "25%"]["attention_fraction"] == 0.25  # the top quarter of every window by its gain
    for policy in set(POLICIES) - {"oracle"}:  # the endpoints are the two modes, whatever the policy
        assert cells[policy, "0%"]["attention_fraction"] == 0 and cells[policy, "100%"]["attention_fraction"] == 1
        assert cells[policy, "0%"]["metrics"]["ppl"] == cells["tail", "0%"]["metrics"]["ppl"]
        assert 0 < cells[policy, "25%"]["attention_fraction"] < 0.5
    table = (out / "budget-ppl.md").read_text()
    assert "| router |" in table and "budget-ppl: attention (%)" in table
    assert (out / "budget-ppl.png").stat().st_size > 0


def test_the_budget_command_on_niah_and_records_runs_every_schedule_policy(run, capsys, tmp_path):
    """NIAH and record recall under the default policies: every schedule policy at every budget, the endpoints the
    two modes; the oracle (ppl only) left out, and asked for alone an error. Regression: the default policies held
    the oracle, and the retrieval tasks stopped on it with "unknown budget policy 'oracle'"."""
    checkpoint = run / "checkpoints" / "step-00000002"
    if not (checkpoint / ROUTER_FILE).is_file():
        assert run_cli(["train-router", str(run), "--steps", "2", "--windows", "4", "--batch-size", "2"]) == 0
    out = tmp_path / "recall"
    argv = ["eval", "budget", str(run), "--tasks", "niah_1", "records_kv", "--budgets", "0", "0.25", "1", "--n", "2",
            "--niah-length", "512", "--chunk", "8", "--calibration-windows", "2", "--batch-size", "2",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert run_cli(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    rows = json.loads((out / "budget-retrieval.json").read_text())["rows"]
    for task in ("niah_1", "records_kv"):
        cells = {(r["protocol"], r["setting"]): r for r in rows if r["task"] == task}
        assert {p for p, _ in cells} == set(SCHEDULE_POLICIES)
        for policy in SCHEDULE_POLICIES:
            assert cells[policy, "0%"]["attention_fraction"] == 0
            assert cells[policy, "0%"]["metrics"]["recall"] == cells["tail", "0%"]["metrics"]["recall"]
            assert cells[policy, "25%"]["attention_fraction"] > 0
    error_line(capsys, [*argv, "--policies", "oracle"], "ppl only", command="eval budget")


def test_the_budget_command_refuses_what_it_cannot_compare(corpus, capsys, tmp_path):
    """Router policies asked for by name on a checkpoint without a router: an error naming oryx train-router (by
    default they are left out, with a note); a baseline, with one mode, has no budget to place."""
    plain = tmp_path / "plain"
    train(tiny(corpus, plain, steps=2, save_every=2, eval_every=2))
    argv = ["eval", "budget", str(plain), "--budgets", "0.25", "--max-tokens", "64", "--calibration-windows", "2",
            "--batch-size", "2", "--out", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    error_line(capsys, [*argv, "--policies", "router", "tail"], "oryx train-router", str(plain), command="eval budget")
    error_line(capsys, [*argv, "--policies", "router-chunk"], "oryx train-router", command="eval budget")
    assert run_cli([*argv, "--policies", "tail", "random"]) == 0
    assert run_cli(argv) == 0
    assert "has no router" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "budget-ppl.json").read_text())["rows"]
    assert {r["protocol"] for r in rows} == set(POLICIES) - {"router", "router-chunk"}
    baseline = tmp_path / "gdn"
    train(tiny(corpus, baseline, preset="gdn-tiny", schedule=None, steps=2, save_every=2, eval_every=2))
    error_line(capsys, ["eval", "budget", str(baseline), "--device", "cpu"], "'gdn' baseline", command="eval budget")


def test_an_mqar_model_is_saved_with_its_settings_and_loaded(tmp_path):
    config = MQARSweepConfig(families=("oryx-tg",), hidden_size=64, head_dim=32, vocab=128,
                             train_mix=(MQARConfig(64, 4, 64),), test_grid=(MQARConfig(64, 4, 8),))  # fmt: skip
    model = build_model("oryx-tg", config)
    save_mqar_model(model, config, tmp_path / "m")
    loaded, settings = load_mqar_model(tmp_path / "m")
    assert settings == config
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_the_budget_command_on_mqar_puts_the_router_beside_the_oracle(tmp_path, capsys):
    """A saved MQAR model with a router (oryx train-router on MQAR rows): every policy, the oracle alone and under the
    budget rule (never more than K/L + one token at any prefix), and the router at the oracle's fraction."""
    config = MQARSweepConfig(families=("oryx-tg",), hidden_size=64, head_dim=32, vocab=128,
                             train_mix=(MQARConfig(64, 4, 64),), test_grid=(MQARConfig(64, 8, 16),))  # fmt: skip
    folder = save_mqar_model(build_model("oryx-tg", config), config, tmp_path / "m")
    argv = ["train-router", str(folder), "--steps", "3", "--windows", "16", "--batch-size", "8", "--device", "cpu"]
    assert run_cli(argv) == 0
    argv = ["eval", "budget", str(folder), "--tasks", "mqar", "--budgets", "0", "0.25", "1", "--device", "cpu"]
    assert run_cli(argv) == 0
    capsys.readouterr()
    rows = {r["protocol"]: r for r in json.loads((folder / "eval" / "budget-mqar.json").read_text())["rows"]}
    assert rows["queries"]["attention_fraction"] == 8 / 64
    assert {"router 25%", "entropy 25%", "random 25%", "head 25%", "tail 25%", "even 25%", "router K/L"} <= set(rows)
    assert rows["queries capped"]["attention_fraction"] <= 8 / 64 + 1 / 64
    assert rows["router 0%"]["metrics"]["accuracy"] == rows["even 0%"]["metrics"]["accuracy"]


def test_a_jointly_trained_mqar_model_stays_an_mqar_model(tmp_path, capsys):
    """`train-router --joint` on an MQAR model writes a new MQAR model folder (its settings, changed weights and its
    router), which `oryx eval budget --tasks mqar` takes as it took the original."""
    config = MQARSweepConfig(families=("oryx-tg",), hidden_size=64, head_dim=32, vocab=128,
                             train_mix=(MQARConfig(64, 4, 64),), test_grid=(MQARConfig(64, 8, 16),))  # fmt: skip
    folder = save_mqar_model(build_model("oryx-tg", config), config, tmp_path / "m")
    argv = ["train-router", str(folder), "--method", "straight-through", "--joint", "--out", str(tmp_path / "j"),
            "--steps", "2", "--windows", "8", "--batch-size", "8", "--budget", "0.25", "--device", "cpu"]  # fmt: skip
    assert run_cli(argv) == 0
    joint, settings = load_mqar_model(tmp_path / "j")
    original, _ = load_mqar_model(folder)
    assert settings == config and joint.router is not None
    assert not all(torch.equal(t, original.state_dict()[k]) for k, t in joint.state_dict().items())
    argv = ["eval", "budget", str(tmp_path / "j"), "--tasks", "mqar", "--budgets", "0.25", "--policies", "router",
            "--device", "cpu"]  # fmt: skip
    assert run_cli(argv) == 0
    capsys.readouterr()
    rows = {r["protocol"]: r for r in json.loads((tmp_path / "j" / "eval" / "budget-mqar.json").read_text())["rows"]}
    assert rows["router 25%"]["attention_fraction"] <= 0.25 + 1 / 64


def test_routing_cost_times_both_forwards_and_counts_the_attention_work():
    """`routing_cost` on the CPU: both forwards timed (CPU time), and the ideal work of the modes it chose equal to
    the causal query-key pairs of their attention rows counted by a plain loop, relative to all-attention's; the
    reference kernel computes whole 128-row blocks, never less than the ideal."""
    from oryx.eval.budget import _clock, routing_cost

    model = tiny_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(5))
    cost = routing_cost(model, ids, "random:budget=0.1,seed=3", repeats=2)
    with torch.no_grad():
        modes = model(ids, schedule="random:budget=0.1,seed=3").modes
    pairs = sum(t + 1 for b in range(2) for t in range(300) if modes[b, t] == ATTN)
    assert cost["ideal_work"] == pytest.approx(pairs / (2 * sum(t + 1 for t in range(300))))
    assert 0 < cost["ideal_work"] <= cost["computed_work"]  # scattered rows: whole blocks, can exceed all-attention
    assert cost["routed_s"] > 0 and cost["explicit_s"] > 0 and math.isfinite(cost["share"])
    assert _clock(torch.device("cpu")) is time.process_time


def test_the_mqar_budget_evaluates_the_settings_asked_for(tmp_path, capsys):
    """`--settings L:K ...` evaluates those settings of the model's test grid and no others; one outside the grid is a
    usage error that lists the grid, and so is `--settings` on a text task."""
    config = MQARSweepConfig(families=("oryx-tg",), hidden_size=64, head_dim=32, vocab=128,
                             train_mix=(MQARConfig(64, 4, 64),),
                             test_grid=(MQARConfig(64, 4, 8), MQARConfig(64, 8, 8), MQARConfig(32, 4, 8)))  # fmt: skip
    folder = save_mqar_model(build_model("oryx-tg", config), config, tmp_path / "m")
    capsys.readouterr()  # the save's progress bar, shown unless an earlier command turned them off
    argv = ["eval", "budget", str(folder), "--tasks", "mqar", "--budgets", "0.25", "--policies", "random", "tail",
            "--device", "cpu"]  # fmt: skip
    assert run_cli([*argv, "--settings", "64:8", "32:4"]) == 0
    rows = json.loads((folder / "eval" / "budget-mqar.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"64x8", "32x4"}
    error_line(capsys, [*argv, "--settings", "64:16"], "--settings 64:16", "64:4 64:8 32:4", command="eval budget")
    error_line(capsys, ["eval", "budget", str(folder), "--settings", "64:8", "--device", "cpu"], "--tasks mqar",
               command="eval budget")  # fmt: skip
