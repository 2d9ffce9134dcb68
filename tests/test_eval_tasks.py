"""Evaluation task generators checked against their definitions (docs/data.md §7), and scoring by hand."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from oryx import ATTN, LINEAR
from oryx.data import load_documents
from oryx.eval.scoring import (
    contains,
    cut_at_stop,
    exact_word_match,
    mc_accuracy,
    mc_predictions,
    target_perplexity,
)
from oryx.eval.tasks import (
    ATTRIBUTES,
    IGNORE_INDEX,
    MQAR_TEST_GRID,
    MQAR_TEST_SEED,
    MQAR_TRAIN_MIX,
    MQAR_TRAIN_SEED,
    NIAH_TASKS,
    PROTOCOLS,
    STOPWORDS,
    attention_fraction,
    make_lambada,
    make_mqar,
    make_mqar_suite,
    make_next_sentence,
    make_niah,
    make_records,
    mqar_accuracy,
    mqar_hits,
    mqar_leakage,
    mqar_modes,
    protocol_modes,
    protocol_schedule,
    split_sentences,
    write_jsonl,
)
from oryx.eval.tasks.niah import NEEDLE, NOISE_SENTENCES, PREAMBLE
from oryx.schedule import parse


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, for properties that must hold for any seed; printed on failure."""
    value = random.SystemRandom().randrange(2**31)
    print(f"seed: {value}")
    return value


@pytest.fixture(scope="module")
def docs() -> list:
    return load_documents("test")


@pytest.fixture(scope="module")
def tokenizer(docs):
    """A small byte-level BPE (GPT-2 style) trained here on held-out text, as a Hugging Face tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([d.text for d in docs[:3]], vocab_size=600, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize(("seq_len", "num_kv", "random_fill"), [(64, 4, True), (128, 32, False), (256, 16, True)])
def test_mqar_labels_are_the_values_bound_in_the_context(seq_len, num_kv, random_fill, seed):
    vocab, n = 8192, 200
    b = make_mqar(n, seq_len, num_kv, vocab=vocab, random_fill=random_fill, seed=seed)
    assert b.input_ids.shape == b.labels.shape == (n, seq_len) and b.context_len == 2 * num_kv == b.num_kv * 2
    half = vocab // 2
    for x, y in zip(b.input_ids.tolist(), b.labels.tolist(), strict=True):
        keys, values = x[0 : 2 * num_kv : 2], x[1 : 2 * num_kv : 2]
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
        assert len(set(keys)) == len(set(values)) == num_kv
        bound = dict(zip(keys, values, strict=True))
        supervised = [t for t in range(seq_len) if y[t] != IGNORE_INDEX]
        assert len(supervised) == num_kv
        assert all(t >= 2 * num_kv and (t - 2 * num_kv) % 2 == 0 for t in supervised)  # slot starts
        assert sorted(x[t] for t in supervised) == sorted(keys)  # each key queried exactly once
        assert all(y[t] == bound[x[t]] for t in supervised)
        if not random_fill:  # nothing but the queries after the context block: the value must be recalled
            rest = [x[t] for t in range(2 * num_kv, seq_len) if t not in supervised]
            assert set(rest) <= {0}


def test_mqar_causal_lm_labels_give_the_same_loss(seed):
    b = make_mqar(8, 64, 4, vocab=128, seed=seed)
    logits = torch.randn(8, 64, 128, generator=torch.Generator().manual_seed(seed))
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100)
    hf = b.causal_lm_labels  # what a model that shifts internally (HF, OryxForCausalLM) computes from it:
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), hf[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(direct, shifted) and (hf != IGNORE_INDEX).sum() == 8 * 4


def test_mqar_slots_follow_the_power_law(seed):
    b = make_mqar(4000, 64, 4, random_fill=False, seed=seed)
    occupied = (b.labels[:, 8::2] != IGNORE_INDEX).sum(dim=0)  # [28 slots]
    # Inclusion probabilities fall with the slot index (p(j) ∝ (j+1)^-0.99): compare well-separated slots.
    assert occupied[0] > occupied[3] > occupied[12] > occupied[27] > 0


def test_mqar_is_deterministic_and_train_test_differ():
    assert MQAR_TRAIN_SEED != MQAR_TEST_SEED
    a, b = make_mqar(50, 64, 4, seed=3), make_mqar(50, 64, 4, seed=3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    train = make_mqar_suite(MQAR_TRAIN_MIX, MQAR_TRAIN_SEED, max_n=300)
    test = make_mqar_suite(MQAR_TEST_GRID, MQAR_TEST_SEED, max_n=300)
    assert mqar_leakage(train[0].input_ids, test[0].input_ids) == 0.0  # both (64, 4)
    assert mqar_leakage(train[0].input_ids, train[0].input_ids[:10]) == 1.0
    # Settings that share L draw from their own streams.
    assert not torch.equal(train[2].input_ids[:, :4], train[3].input_ids[:, :4])


def test_mqar_standard_settings_are_valid():
    for c in MQAR_TRAIN_MIX + MQAR_TEST_GRID:
        assert c.seq_len % 2 == 0 and 4 * c.num_kv <= c.seq_len < 8192
    suite = make_mqar_suite(MQAR_TEST_GRID, MQAR_TEST_SEED, max_n=2)
    assert [(b.seq_len, b.num_kv) for b in suite] == [(c.seq_len, c.num_kv) for c in MQAR_TEST_GRID]
    with pytest.raises(ValueError, match="4\\*num_kv"):
        make_mqar(1, 64, 17)
    with pytest.raises(ValueError, match="even"):
        make_mqar(1, 63, 4)


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_mqar_modes_per_protocol(protocol):
    n, seq_len, num_kv = 3, 64, 8
    modes = mqar_modes(n, seq_len, num_kv, protocol)
    ctx_mode, prompt_mode = PROTOCOLS[protocol]
    assert modes.shape == (n, seq_len) and modes.dtype == torch.long
    assert (modes[:, : 2 * num_kv] == ctx_mode).all() and (modes[:, 2 * num_kv :] == prompt_mode).all()
    expected = {"attn": 1.0, "linear": 0.0, "cross": (64 - 16) / 64, "cross_reverse": 16 / 64}[protocol]
    assert attention_fraction(modes) == pytest.approx(expected)


def test_cross_and_reverse_attention_fractions_add_up(seed):
    rng = random.Random(seed)
    lens = [rng.randrange(1, 100) for _ in range(5)]
    cross, reverse = protocol_modes(lens, 100, "cross"), protocol_modes(lens, 100, "cross_reverse")
    assert attention_fraction(cross) + attention_fraction(reverse) == pytest.approx(1.0)
    assert attention_fraction(cross) == pytest.approx(sum(100 - c for c in lens) / 500)
    assert ((cross == ATTN) == (reverse == LINEAR)).all()


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_protocol_schedule_matches_protocol_modes(protocol):
    spec = protocol_schedule(37, protocol)
    assert torch.equal(parse(spec).modes(2, 50), protocol_modes([37, 37], 50, protocol))


def test_unknown_protocol_is_an_error():
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_modes([1], 4, "hybrid")


def test_mqar_accuracy_by_hand(seed):
    b = make_mqar(6, 64, 4, seed=seed)
    logits = torch.zeros(6, 64, 8192)
    supervised = b.labels != IGNORE_INDEX
    logits[supervised, b.labels[supervised]] = 1.0
    assert mqar_hits(logits, b.labels) == (24, 24) and mqar_accuracy(logits, b.labels) == 1.0
    row, pos = supervised.nonzero()[0].tolist()
    logits[row, pos, b.labels[row, pos]] = -1.0  # one wrong prediction out of 24
    assert mqar_hits(logits, b.labels) == (23, 24)
    assert mqar_accuracy(logits, b.labels) == pytest.approx(23 / 24)


# ---------------------------------------------------------------------------------------------------- NIAH


@pytest.mark.parametrize("task", list(NIAH_TASKS))
def test_niah_needle_depth_length_and_boundary(task, tokenizer, seed):
    rng = random.Random(seed)
    target = rng.randrange(300, 900)
    depths = [0.0, 1.0, *(rng.random() for _ in range(4))]
    samples = make_niah(task, len(depths), target, tokenizer, depths=depths, seed=seed)
    kinds = "uuids" if task == "niah_3" else "numbers"
    preamble_len = len(tokenizer.encode(PREAMBLE.format(kinds=kinds)))
    for s in samples:
        # Filled to the target but for the next word (and a token or two where pieces meet).
        longest_word = max(len(tokenizer.encode(" " + w)) for w in s.context.split())
        assert target - longest_word - 3 <= len(s.input_ids) <= target
        assert tokenizer.decode(s.input_ids) == s.context + s.question
        assert tokenizer.decode(s.input_ids[: s.context_len]) == s.context  # switch point for "cross"
        assert tokenizer.decode(s.input_ids[s.context_len :]) == s.question
        assert s.question.startswith("\nWhat is the special magic") and s.question.endswith("text is")
        assert tokenizer.decode(s.answer_ids) == " " + s.answer
        needle = NEEDLE.format(kinds=kinds, key=s.key, value=s.answer)
        assert tokenizer.decode(s.input_ids[slice(*s.needle_span)]).strip() == needle
        assert s.context.count(s.answer) == 1 and s.key in s.question
        if task == "niah_3":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answer)
        else:
            assert re.fullmatch(r"[1-9]\d{6}", s.answer)
        # Depth: the needle starts at the sentence boundary nearest depth × haystack tokens.
        start, end = s.needle_span
        haystack_tokens = s.context_len - preamble_len - (end - start)
        haystack = s.context[len(PREAMBLE.format(kinds=kinds)) :].replace(needle, " ")
        longest = max(len(tokenizer.encode(" " + u)) for u in split_sentences(haystack))
        assert abs((start - preamble_len) - s.depth * haystack_tokens) <= longest + 1


def test_niah_1_haystack_is_the_noise(tokenizer, seed):
    (s,) = make_niah("niah_1", 1, 400, tokenizer, depths=[0.5], seed=seed)
    needle = NEEDLE.format(kinds="numbers", key=s.key, value=s.answer)
    haystack = s.context[len(PREAMBLE.format(kinds="numbers")) :].replace(needle, " ")
    sentences = split_sentences(haystack)
    assert set(sentences[:-1]) == set(NOISE_SENTENCES)
    assert any(noise.startswith(sentences[-1]) for noise in NOISE_SENTENCES)  # the last may be cut short


def test_niah_prose_comes_from_the_documents_and_is_seeded(tokenizer, docs, seed):
    texts = [flat(d.text) for d in docs]
    a = make_niah("niah_2", 2, 500, tokenizer, seed=seed)  # default: the held-out split
    b = make_niah("niah_2", 2, 500, tokenizer, documents=[d.text for d in docs], seed=seed)
    assert a == b
    needle = NEEDLE.format(kinds="numbers", key=a[0].key, value=a[0].answer)
    body = flat(a[0].context[len(PREAMBLE.format(kinds="numbers")) :].replace(needle, "|"))
    for part in body.split("|"):
        assert not part.strip() or any(part.strip()[:60] in t for t in texts)


def test_niah_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="unknown NIAH task"):
        make_niah("niah_4", 1, 500, tokenizer)
    with pytest.raises(ValueError, match="shorter than"):
        make_niah("niah_1", 1, 20, tokenizer)
    with pytest.raises(ValueError, match="depths"):
        make_niah("niah_1", 2, 500, tokenizer, depths=[0.5])


# ---------------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("fmt", ["kv", "html"])
def test_record_prompt_gold_is_the_attribute_value(fmt, tokenizer, seed):
    for s in make_records(30, fmt=fmt, seed=seed):
        fields = dict(s.fields)
        assert len(fields) == len(s.fields) and 10 <= len(fields) <= 50
        assert s.answer == fields[s.attribute] and s.prompt == f"{s.attribute}:"
        line = f"{s.attribute}: {s.answer}\n" if fmt == "kv" else f"<tr><td>{s.attribute}</td><td>{s.answer}</td>"
        assert s.context.count(line) == 1 and s.context.endswith("\n")
        for attribute, value in s.fields:  # copying any other field never passes `contains`
            assert contains(f" {value}", s.answer) == (attribute == s.attribute)
        ids, context_len = s.encode(tokenizer)
        assert tokenizer.decode(ids[:context_len]) == s.context and tokenizer.decode(ids[context_len:]) == s.prompt


def test_records_field_range_and_errors(seed):
    assert {len(s.fields) for s in make_records(20, num_fields=(3, 3), seed=seed)} == {3}
    every = (len(ATTRIBUTES), len(ATTRIBUTES))  # the longest records: every attribute once
    assert all(len(dict(s.fields)) == len(ATTRIBUTES) for s in make_records(10, num_fields=every, seed=seed))
    assert make_records(5, seed=seed) == make_records(5, seed=seed)
    with pytest.raises(ValueError, match="format"):
        make_records(1, fmt="csv")
    with pytest.raises(ValueError, match="num_fields"):
        make_records(1, num_fields=(10, 500))


# ---------------------------------------------------------------------------------------------------- LAMBADA


def test_lambada_targets_need_the_context(docs, seed):
    texts = [flat(d.text) for d in docs]
    samples = make_lambada([d.text for d in docs], n=150, seed=seed)
    assert len(samples) == 150
    for s in samples:
        words = s.context.split()
        assert 50 <= len(words) + 1 <= 120
        assert s.target.isalpha() and s.target.lower() not in STOPWORDS
        assert s.target.lower() in {w.strip("\"'“”‘’()[]{}.,;:!?-—_*").lower() for w in words}
        assert any(f"{s.context} {s.target}" in t for t in texts)  # a real window of one document


def test_lambada_on_a_hand_made_document():
    filler = " ".join(f"w{i}" for i in range(60))  # no alphabetic word qualifies before "lantern."
    doc = f"the lantern {filler} and then the lantern. of"
    (s,) = make_lambada([doc])
    assert s.target == "lantern" and s.context == f"the lantern {filler} and then the"
    assert make_lambada([doc.replace("lantern.", "which")]) == []  # stopword final word


# ---------------------------------------------------------------------------------------------------- next sentence


def test_next_sentence_gold_is_the_true_next_sentence(docs, seed):
    texts = [flat(d.text) for d in docs]
    sources = [d.source for d in docs]
    samples = make_next_sentence([d.text for d in docs], sources, n=120, seed=seed)
    assert len(samples) == 120 and len({s.gold for s in samples}) > 1
    for s in samples:
        assert len(s.choices) == len(set(s.choices)) == 4
        home = [i for i, t in enumerate(texts) if f"{s.context} {s.choices[s.gold]}" in t]
        assert home, "the gold choice does not follow the context in any document"
        same_source = [i for i, src in enumerate(sources) if src == sources[home[0]]]
        for c, choice in enumerate(s.choices):
            assert 4 <= len(choice.split()) <= 40
            if c != s.gold:  # other documents of the source, or (single-document source) the same one
                others = [i for i in same_source if i != home[0]] or same_source
                assert any(choice in texts[i] for i in others)


def test_next_sentence_default_data_and_small_pool():
    samples = make_next_sentence(n=5, seed=1)
    assert len(samples) == 5 and samples == make_next_sentence(n=5, seed=1)
    tiny = ["One two three four. Five six seven eight. Nine ten eleven twelve. Thirteen fourteen fifteen sixteen."]
    with pytest.raises(ValueError, match="too small"):
        make_next_sentence(tiny, min_distance=1000)


# ---------------------------------------------------------------------------------------------------- export


def test_jsonl_export(tmp_path, tokenizer):
    rows = {
        "records": [s.to_json() for s in make_records(3)],
        "lambada": [s.to_json() for s in make_lambada(n=3)],
        "next_sentence": [s.to_json() for s in make_next_sentence(n=3)],
        "niah": [s.to_json() for s in make_niah("niah_1", 2, 300, tokenizer)],
    }
    fields = {
        "records": {"text", "value"},
        "lambada": {"text", "context", "target"},
        "next_sentence": {"context", "choices", "gold"},
        "niah": {"context", "question", "answer"},
    }
    for name, data in rows.items():
        path = tmp_path / f"{name}.jsonl"
        assert write_jsonl(data, path) == len(data)
        back = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert back == data and all(fields[name] <= set(r) for r in back)
    lam = rows["lambada"][0]
    assert lam["text"] == f"{lam['context']} {lam['target']}"
    rec = rows["records"][0]
    assert rec["text"].endswith(":") and rec["value"] in rec["text"]


# ---------------------------------------------------------------------------------------------------- scoring


def test_contains_is_case_insensitive_and_literal():
    assert contains(" PARIS, France", "paris")
    assert contains("it costs $4.99 (net)", "$4.99 (net)")  # regex metacharacters are literal
    assert not contains("it costs $4X99", "$4.99")
    assert not contains("abc", "a.c") and contains("a.c", "A.C")
    assert contains("answer: 42", ["17", "42"]) and not contains("answer: 42", ["17", "43"])
    assert cut_at_stop(" Oslo\nname: x") == " Oslo" and cut_at_stop("no stop") == "no stop"


def test_exact_word_match():
    assert exact_word_match(" lantern. And", "lantern")
    assert exact_word_match('"lantern," she', "lantern")
    assert not exact_word_match(" Lantern", "lantern")  # case matters, as LAMBADA's greedy match
    assert not exact_word_match(" lanterns", "lantern")
    assert not exact_word_match("  ", "lantern")


def test_mc_accuracy_by_hand():
    loglik = [[-1.0, -2.0, -3.0, -4.0], [-10.0, -5.0, -6.0, -7.0], [-2.0, -2.0, -9.0, -9.0]]
    lengths = [[1, 1, 1, 1], [100, 10, 10, 1], [4, 4, 4, 4]]
    gold = [0, 0, 1]
    # acc: argmax picks 0, 1, 0 (tie -> first): 1 of 3. acc_norm: -0.1 beats -0.5, -0.6, -7 in item 2: 2 of 3.
    assert mc_predictions(loglik) == [0, 1, 0]
    assert mc_predictions(loglik, lengths) == [0, 0, 0]
    result = mc_accuracy(loglik, lengths, gold)
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        mc_accuracy(loglik, lengths, gold[:2])


def test_target_perplexity_by_hand():
    assert target_perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    assert target_perplexity([0.0]) == 1.0
