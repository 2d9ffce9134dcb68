"""lm-evaluation-harness end to end on a tiny random Oryx model: exported local tasks, the `oryx` model type (its
schedule in log-likelihoods and in generation) and the `hf` route."""

from __future__ import annotations

import logging
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HF model needs it (the `lm-eval[hf]` extra)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import oryx  # noqa: E402
from oryx.data import load_tokenizer  # noqa: E402
from oryx.eval.harness import OryxLM  # noqa: E402
from oryx.eval.inference import ModeRule, greedy_generate  # noqa: E402
from oryx.eval.lm_eval_tasks import export_lm_eval_tasks  # noqa: E402
from oryx.eval.zeroshot import run_zeroshot  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, task folder): a tiny random Oryx-TG with the byte tokenizer, and our tasks exported small."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = load_tokenizer("byte")
    torch.manual_seed(0)
    config = oryx.OryxConfig(
        variant="tg", vocab_size=320, hidden_size=64, num_hidden_layers=2, head_dim=32,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    oryx.OryxForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    names = export_lm_eval_tasks(
        root / "tasks", tokenizer, niah_lengths=(), records_n=2, lambada_n=4, next_sentence_n=4
    )
    assert names == ["oryx_lambada", "oryx_next_sentence", "oryx_records_kv", "oryx_records_html"]
    return root / "model", root / "tasks"


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    """No hub; one intra-op thread (tiny tensors: more threads only add barrier overhead on a busy machine)."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_simple_evaluate_end_to_end(setup):
    """One real lm-eval run of three local tasks under the cross-mode schedule; its numbers equal our runner's."""
    model_dir, task_dir = setup
    results = lm_eval.simple_evaluate(
        model="oryx",
        model_args={"pretrained": str(model_dir), "schedule": "tail:attn=0", "device": "cpu", "batch_size": 4},
        tasks=["oryx_lambada", "oryx_next_sentence", "oryx_records_kv"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    assert results["n-samples"] == {
        "oryx_lambada": {"original": 4, "effective": 4},
        "oryx_next_sentence": {"original": 4, "effective": 4},
        "oryx_records_kv": {"original": 2, "effective": 2},
    }
    scores = results["results"]
    for task, metric in (("oryx_lambada", "acc"), ("oryx_next_sentence", "acc"),
                         ("oryx_next_sentence", "acc_norm"), ("oryx_records_kv", "contains")):  # fmt: skip
        assert 0.0 <= scores[task][f"{metric},none"] <= 1.0
    assert scores["oryx_lambada"]["perplexity,none"] > 1.0

    model = oryx.OryxForCausalLM.from_pretrained(model_dir).eval()
    ours = {
        row.task: row.metrics
        for row in run_zeroshot(model, load_tokenizer(model_dir), "tiny", n=4, rules=[ModeRule("tail:attn=0")])
    }
    assert scores["oryx_lambada"]["acc,none"] == ours["lambada"]["acc"]
    assert scores["oryx_lambada"]["perplexity,none"] == pytest.approx(ours["lambada"]["ppl"], rel=1e-4)
    assert scores["oryx_next_sentence"]["acc,none"] == ours["next_sentence"]["acc"]
    assert scores["oryx_next_sentence"]["acc_norm,none"] == ours["next_sentence"]["acc_norm"]


def _hand_loglik(lm: OryxLM, context: str, continuation: str, mode: int) -> float:
    """log P(continuation | context) from one forward in ``mode``, tokenised as lm-eval does."""
    context_ids = lm.tok_encode(context)
    continuation_ids = lm.tok_encode(context + continuation)[len(context_ids) :]
    ids = torch.tensor([context_ids + continuation_ids[:-1]])
    logprobs = lm.model(ids, modes=torch.full_like(ids, mode)).logits.log_softmax(-1)[0, len(context_ids) - 1 :]
    return sum(logprobs[j, t].item() for j, t in enumerate(continuation_ids))


def test_oryx_model_applies_the_schedule_to_logliks(setup):
    model_dir, _ = setup
    request = Instance("loglikelihood", {}, ("The grass is green and the", " sky is blue."), 0)
    logliks = {}
    for schedule, mode in (("attn", oryx.ATTN), ("linear", oryx.LINEAR)):
        lm = OryxLM(pretrained=str(model_dir), schedule=schedule, device="cpu", batch_size=2)
        logliks[schedule] = lm.loglikelihood([request])[0][0]
        assert logliks[schedule] == pytest.approx(_hand_loglik(lm, *request.arguments, mode), rel=1e-5)
    assert logliks["attn"] != pytest.approx(logliks["linear"], rel=1e-3)
    # `--model hf` (after `import oryx`) is the model's default mode, attention.
    hf = lm_eval.models.huggingface.HFLM(pretrained=str(model_dir), device="cpu", batch_size=2)
    assert hf.loglikelihood([request])[0][0] == pytest.approx(logliks["attn"], rel=1e-5)


def test_oryx_model_applies_the_schedule_to_generation(setup):
    model_dir, _ = setup
    prompt = "Some special magic numbers are hidden here: 1234567. The special magic number is"
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), 0)
    for schedule in ("tail:attn=5", "spans:linear@0;attn@20", "linear"):
        lm = OryxLM(pretrained=str(model_dir), schedule=schedule, device="cpu", batch_size=1)
        generated = lm.generate_until([request])[0]
        ours = greedy_generate(lm.model, lm.tokenizer, [lm.tok_encode(prompt)], lm.rule, max_new_tokens=6)[0]
        assert generated == ours.text


def test_oryx_model_runs_adaptive_schedules(setup):
    """An adaptive schedule decides the modes in generation as greedy_generate does; a router schedule on a
    checkpoint without a router is refused at once, naming oryx train-router."""
    model_dir, _ = setup
    prompt = "Some special magic numbers are hidden here: 1234567. The special magic number is"
    request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}), 0)
    lm = OryxLM(pretrained=str(model_dir), schedule="entropy:threshold=5.5;budget=0.3", device="cpu", batch_size=1)
    ours = greedy_generate(lm.model, lm.tokenizer, [lm.tok_encode(prompt)], lm.rule, max_new_tokens=6)[0]
    assert lm.generate_until([request])[0] == ours.text
    with pytest.raises(ValueError, match="oryx train-router"):
        OryxLM(pretrained=str(model_dir), schedule="router:budget=0.1", device="cpu", batch_size=1)


def test_oryx_model_reports_the_realised_attention_fraction(setup, caplog):
    """The tokens the model read and those in attention, counted by hand: a log-likelihood request read in linear
    mode except its continuation, and generations from left-padded prompts (padding not counted; every generated
    token fed back is read in attention under tail:attn=5)."""
    model_dir, _ = setup
    context, continuation = "The grass is green and the", " sky is blue."
    lm = OryxLM(pretrained=str(model_dir), schedule="tail:attn=0", device="cpu", batch_size=2)
    assert math.isnan(lm.attention_fraction)
    ctx, cont = lm._encode_pair(context, continuation)
    with caplog.at_level(logging.INFO, logger="lm_eval.models.oryx"):
        lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert (lm.attention_tokens, lm.tokens_read) == (len(cont) - 1, len(ctx) + len(cont) - 1)
    assert f"attention for {100 * lm.attention_fraction:.1f} % of the {lm.tokens_read} tokens" in caplog.text

    prompts = ["Some special magic numbers are hidden here: 1234567. The number is", "A short prompt:"]
    arguments = {"until": ["never appears"], "max_gen_toks": 5, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, arguments), i) for i, p in enumerate(prompts)]
    prompt_tokens = sum(len(lm.tok_encode(p)) for p in prompts)
    for schedule in ("linear", "attn", "tail:attn=5"):
        lm = OryxLM(pretrained=str(model_dir), schedule=schedule, device="cpu", batch_size=2)
        lm.generate_until(requests)
        fed_back = lm.tokens_read - prompt_tokens  # generated tokens read again, in both rows
        assert 0 < fed_back <= 2 * (arguments["max_gen_toks"] - 1) and fed_back % 2 == 0
        expected = {"linear": 0, "attn": lm.tokens_read, "tail:attn=5": 2 * 5 + fed_back}[schedule]
        assert lm.attention_tokens == expected


def test_oryx_model_refuses_a_mode_the_model_lacks():
    config = oryx.OryxConfig(variant="transformer", vocab_size=320, hidden_size=64, num_hidden_layers=1, head_dim=32)
    model = oryx.OryxForCausalLM(config)
    with pytest.raises(ValueError, match="does not have"):
        OryxLM(pretrained=model, tokenizer=load_tokenizer("byte"), schedule="linear", batch_size=1)


def test_oryx_model_type_is_registered():
    assert lm_eval.api.registry.get_model("oryx") is OryxLM
