"""The benchmark runners: MQAR training and its protocols, greedy generation and log-likelihoods under mode rules,
the retrieval and zero-shot runners on a checkpoint, and the report files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import oryx
from oryx.cli import main as oryx_main
from oryx.data import load_tokenizer
from oryx.eval import mqar_run, protocol_schedule
from oryx.eval.inference import ModeRule, continuation_logliks, greedy_generate
from oryx.eval.mqar_run import MQARSweepConfig, evaluate_mqar, protocol_modes_for, train_mqar
from oryx.eval.tasks.mqar import IGNORE_INDEX, MQARConfig, make_mqar
from oryx.modeling import OryxForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("byte")


def _tiny(variant: str = "tg", vocab: int = 320, seed: int = 0) -> OryxForCausalLM:
    torch.manual_seed(seed)
    config = oryx.OryxConfig(variant=variant, vocab_size=vocab, hidden_size=64, num_hidden_layers=2, head_dim=32)
    return OryxForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """Saved tiny random Oryx-TG and Transformer models with the byte tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    for name, variant in (("tg", "tg"), ("transformer", "transformer")):
        model = _tiny(variant)
        model.config.eos_token_id = tokenizer.eos_token_id
        tokenizer.save_pretrained(root / name)  # first: the model's save writes the manifest over both
        model.save_pretrained(root / name)
    return root


# --- MQAR ---------------------------------------------------------------------------------------------------------
def test_mqar_learns_above_chance():
    """A 1-layer Oryx-TG learns MQAR (64 tokens, 4 pairs, 64 values) well above chance in 250 CPU steps."""
    config = MQARSweepConfig(
        families=("oryx-tg",),
        hidden_size=64,
        num_layers=1,
        head_dim=32,
        vocab=128,
        train_mix=(MQARConfig(64, 4, 32 * 250),),
        test_grid=(MQARConfig(64, 4, 256),),
        epochs=1,
        batch_size=32,
        warmup_ratio=0.05,
        log_every=125,
    )
    result = train_mqar("oryx-tg", 3e-3, config)
    accuracy = {r["protocol"]: r["accuracy"] for r in result["results"]}
    chance = 1 / 64  # values are drawn from [V/2, V)
    print(f"MQAR (64, 4), V=128, after {result['steps']} steps: {accuracy} (chance {chance:.3f})")
    assert result["steps"] == 250
    assert accuracy["linear"] > 4 * chance
    assert accuracy["attn"] > 2 * chance
    fractions = {r["protocol"]: r["attention_tokens"] / r["tokens"] for r in result["results"]}
    assert fractions == {"attn": 1.0, "linear": 0.0, "cross": (64 - 8) / 64, "queries": 4 / 64}


def test_mqar_time_budget_shortens_the_schedule():
    """A timed probe fits the cosine schedule to --train-minutes before training (here 0.1 s for 40 planned steps)."""
    config = MQARSweepConfig(
        hidden_size=32, num_layers=1, head_dim=16, vocab=128, train_mix=(MQARConfig(64, 4, 16 * 40),),
        test_grid=(MQARConfig(64, 4, 8),), epochs=1, batch_size=16, protocols=("attn",), train_minutes=0.1 / 60,
    )  # fmt: skip
    result = train_mqar("transformer", 1e-3, config, log=lambda line: None)
    assert result["planned_steps"] == 40
    assert 1 <= result["steps"] <= result["schedule_steps"] < 40


def _budget_config(**kw) -> MQARSweepConfig:
    return MQARSweepConfig(
        families=("transformer", "oryx-tg"), hidden_size=32, num_layers=1, head_dim=16, vocab=128,
        train_mix=(MQARConfig(64, 4, 16 * 40),), test_grid=(MQARConfig(64, 4, 8),), epochs=1, batch_size=16,
        protocols=("attn",), **kw,
    )  # fmt: skip


def test_mqar_time_budget_gives_every_family_the_same_steps(monkeypatch, tmp_path, capsys):
    """Under --train-minutes every family trains the same number of steps: the slowest family's probe sets it. Here
    the probe (faked: no timing) reads Oryx at twice the Transformer's time per step, 2 s against 1 s, and the budget
    of 0.5 min fits 30 Transformer steps and 15 Oryx steps of the 40 planned: both train 15 (before, the Transformer
    trained 30 and the Oryx run 15)."""

    def probe(model, train, config, draw_modes, barrier=None):
        return [2.0 if model.config.is_oryx else 1.0] * len(train)

    monkeypatch.setattr(mqar_run, "_probe_seconds", probe)
    mqar_run.run_sweep(_budget_config(train_minutes=0.5), tmp_path)
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").iterdir()}
    assert {name: (run["steps"], run["schedule_steps"], run["planned_steps"]) for name, run in runs.items()} == {
        "transformer-lr0.003": (15, 15, 40),
        "oryx-tg-lr0.003": (15, 15, 40),
    }
    out = capsys.readouterr().out
    assert "every run trains 15 of 40 planned steps (what oryx-tg, the slowest, fits into 0.5 min)" in out
    assert "FAILED" not in out and "FAILED" not in (tmp_path / "mqar.md").read_text()


def test_the_probe_times_real_training_steps_after_every_probe_has_warmed_up(monkeypatch):
    """The probe runs the training step itself (the optimizer moves the weights) and waits at the barrier after
    PROBE_WARMUP steps of every setting and before any timed step; its seconds are one median per setting."""
    config = dataclasses.replace(_budget_config(), train_mix=(MQARConfig(64, 4, 32), MQARConfig(32, 4, 32)))
    model = mqar_run.build_model("oryx-tg", config)
    before = [p.detach().clone() for p in model.parameters()]
    steps, events = [], []
    real_step = mqar_run._train_step

    def counted(*args, **kwargs):
        steps.append(1)
        return real_step(*args, **kwargs)

    class Recorder:
        def wait(self, timeout=None):
            events.append(len(steps))

    monkeypatch.setattr(mqar_run, "_train_step", counted)
    train = mqar_run._train_data(config)
    draw = mqar_run._mode_drawer(model, config, torch.device("cpu"))
    seconds = mqar_run._probe_seconds(model, train, config, draw, Recorder())
    assert events == [mqar_run.PROBE_WARMUP * len(train)]
    assert len(steps) == (mqar_run.PROBE_WARMUP + mqar_run.PROBE_STEPS) * len(train)
    assert len(seconds) == len(train) and all(s > 0 for s in seconds)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_probes_in_worker_processes_meet_at_their_barrier_and_set_one_step_count(tmp_path, capsys):
    """--jobs 2 under --train-minutes: the two probes run in spawned workers, wait for each other at a manager's
    barrier (a hang here would be a deadlock) and give one shared step count that both runs train."""
    mqar_run.run_sweep(_budget_config(train_minutes=0.5), tmp_path, jobs=2)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 2 and runs[0]["steps"] == runs[1]["steps"] == runs[0]["schedule_steps"] > 0
    assert "probe (ms/step): transformer" in capsys.readouterr().out


def test_mqar_run_cut_by_the_budget_is_a_failure(monkeypatch):
    """A run the hard stop (1.25x the budget) cuts below its schedule says FAILED, and a sweep that holds it lists it
    as a failed equal-steps comparison under the table. A fake clock, one second per reading, stands in for slow
    steps."""
    config = _budget_config(train_minutes=4 / 60)  # a 5 s hard stop
    clock = iter(range(1_000_000))
    monkeypatch.setattr(mqar_run.time, "perf_counter", lambda: float(next(clock)))
    lines = []
    cut = train_mqar("oryx-tg", 3e-3, config, log=lines.append, steps=20)
    monkeypatch.undo()
    assert 1 <= cut["steps"] < 20 == cut["schedule_steps"]
    assert any(line.startswith(f"FAILED: oryx-tg lr 0.003 stopped at step {cut['steps']} of 20") for line in lines)
    full = {**cut, "family": "transformer", "steps": 20}
    failed = mqar_run.unequal_steps([full, cut])
    assert failed == [
        f"FAILED: oryx-tg-lr0.003 trained {cut['steps']} steps, fewer than transformer-lr0.003's 20 (stopped at 1.25x "
        "--train-minutes): not an equal-steps comparison"
    ]
    assert mqar_run.unequal_steps([full, {**cut, "steps": 20}]) == []
    best = {"transformer": full, "oryx-tg": cut}
    assert f"**{failed[0]}**" in mqar_run._training_notes(config, [full, cut], best)


def test_mqar_protocols_give_the_expected_modes(monkeypatch):
    batch = make_mqar(6, 64, 4, vocab=128, seed=1)
    cross = protocol_modes_for(batch, "cross")
    assert (cross[:, :8] == oryx.LINEAR).all() and (cross[:, 8:] == oryx.ATTN).all()
    queries = protocol_modes_for(batch, "queries")
    assert ((queries == oryx.ATTN) == (batch.labels != IGNORE_INDEX)).all()
    assert ((queries == oryx.ATTN).sum(1) == 4).all()
    # Every key of the context is queried exactly once, at an attention position.
    keys = batch.input_ids[:, 0:8:2]
    for row in range(6):
        assert sorted(batch.input_ids[row][queries[row] == oryx.ATTN].tolist()) == sorted(keys[row].tolist())

    model = _tiny(vocab=128)
    seen = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **kw: seen.append(kw["modes"].clone()) or forward(*a, **kw))
    results = evaluate_mqar(model, [batch], ["attn", "linear", "cross", "queries"], batch_size=6, precision="fp32")
    assert [r["protocol"] for r in results] == ["attn", "linear", "cross", "queries"]
    assert (seen[0] == oryx.ATTN).all() and (seen[1] == oryx.LINEAR).all()
    assert torch.equal(seen[2], cross) and torch.equal(seen[3], queries)
    # A baseline runs only its own mode.
    transformer = _tiny("transformer", vocab=128)
    only = evaluate_mqar(transformer, [batch], ["attn", "linear", "cross", "queries"], 6, "fp32")
    assert [r["protocol"] for r in only] == ["attn"]


def test_mqar_command_writes_results_and_report(tmp_path):
    out = tmp_path / "mqar"
    argv = ["mqar", "--out", str(out), "--families", "transformer", "oryx-tg", "--hidden-size", "32", "--head-dim",
            "16", "--layers", "1", "--vocab", "256", "--train-mix", "64:4:16", "128:8:16", "--test-grid", "64:4:8",
            "128:8:8", "--epochs", "1", "--batch-size", "16", "--lrs", "1e-3", "3e-3", "--device", "cpu"]  # fmt: skip
    assert oryx_main(["eval", *argv]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"{f}-lr{lr}.json" for f in ("oryx-tg", "transformer") for lr in ("0.001", "0.003")]
    data = json.loads((out / "mqar.json").read_text())
    rows = {(r["model"], r["protocol"], r["setting"]) for r in data["rows"]}
    assert ("transformer", "attn", "128x8") in rows and ("oryx-tg", "queries", "64x4") in rows
    assert not any(m == "transformer" and p != "attn" for m, p, _ in rows)
    assert set(data["meta"]["chosen_lr"]) == {"transformer", "oryx-tg"}
    table = (out / "mqar.md").read_text()
    assert "| oryx-tg | cross |" in table and "attn %" in table and "64x4" in table
    assert (out / "mqar.png").stat().st_size > 0
    # The report command (here through `oryx eval`) rebuilds the same files elsewhere.
    assert oryx_main(["eval", "report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "mqar.md").read_text() == table


# --- inference under mode rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["attn", "linear", "cross", "tail:attn=3"])
def test_greedy_generate_matches_model_generate(tokenizer, spec):
    """A batch of prompts of different lengths, each at its own switch point, generates what model.generate does
    one prompt at a time under the equivalent schedule."""
    model = _tiny()
    prompts = [tokenizer.encode(t) for t in ("hello there, general", "abc def", "the quick brown fox jumps")]
    contexts = [10, 3, 12]
    generations = greedy_generate(model, tokenizer, prompts, ModeRule(spec), contexts, max_new_tokens=6, batch_size=3)
    for prompt, context, generation in zip(prompts, contexts, generations, strict=True):
        schedule = protocol_schedule(context, spec) if spec in ("attn", "linear", "cross") else spec
        suppress = list(range(len(tokenizer), model.config.vocab_size))
        out = model.generate(
            torch.tensor([prompt]), schedule=schedule, max_new_tokens=6, do_sample=False, suppress_tokens=suppress
        )
        new = out[0, len(prompt) :].tolist()
        assert generation.text == tokenizer.decode(new).split("\n")[0]
        if spec == "cross" and "\n" not in generation.text:
            assert generation.tokens == len(prompt) + 6
            assert generation.attention_tokens == len(prompt) - context + 6


def test_continuation_logliks_equal_a_forward_by_hand(tokenizer):
    model = _tiny()
    texts = ["hello there, general kenobi", "abc def ghi", "the quick brown fox"]
    requests = [(tokenizer.encode(t[:7]), tokenizer.encode(t[7:])) for t in texts]
    for spec in ("attn", "linear", "cross", "tail:attn=2"):
        rule = ModeRule(spec)
        batched = continuation_logliks(model, requests, rule, batch_size=2)
        for i, (context, continuation) in enumerate(requests):
            ids = torch.tensor([context + continuation[:-1]])
            modes = rule.modes(ids.shape[1], prompt_len=len(context), context_len=len(context))[None]
            logprobs = model(ids, modes=modes).logits.log_softmax(-1)[0]
            scored = logprobs[len(context) - 1 :]
            expected = sum(scored[j, t].item() for j, t in enumerate(continuation))
            assert batched.logliks[i] == pytest.approx(expected, rel=1e-5)
            assert batched.greedy[i] == all(scored[j].argmax().item() == t for j, t in enumerate(continuation))
    attn, linear = (continuation_logliks(model, requests, ModeRule(s)) for s in ("attn", "linear"))
    assert attn.attention_fraction == 1.0 and linear.attention_fraction == 0.0
    assert attn.logliks != linear.logliks


def test_mode_rules_check_specs_and_models():
    assert str(ModeRule("tail: attn = 4")) == "tail:attn=4"
    with pytest.raises(ValueError, match="schedule kind"):
        ModeRule("crosss")
    assert ModeRule("cross").supported_by([oryx.ATTN, oryx.LINEAR])
    assert not ModeRule("cross").supported_by([oryx.ATTN])
    assert ModeRule("attn").supported_by([oryx.ATTN])
    assert not ModeRule("tail:attn=4").supported_by([oryx.LINEAR])


# --- retrieval and zero-shot runners ------------------------------------------------------------------------------
def test_retrieval_command(checkpoints, tmp_path):
    out = tmp_path / "retrieval"
    argv = ["retrieval", str(checkpoints / "tg"), str(checkpoints / "transformer"), "--tasks", "niah_1", "records_kv",
            "--lengths", "400", "--n", "2", "--max-new-tokens", "4", "--modes", "attn", "linear", "cross",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert oryx_main(["eval", *argv]) == 0
    data = json.loads((out / "tg" / "retrieval.json").read_text())
    rows = {(r["task"], r["protocol"]): r for r in data["rows"]}
    assert set(rows) == {(t, p) for t in ("niah_1", "records_kv") for p in ("attn", "linear", "cross")}
    for row in rows.values():
        assert 0.0 <= row["metrics"]["recall"] <= 1.0 and row["n"] == 2
    assert rows["niah_1", "attn"]["attention_fraction"] == 1.0
    assert rows["niah_1", "linear"]["attention_fraction"] == 0.0
    assert 0.0 < rows["niah_1", "cross"]["attention_fraction"] < 0.5  # the question (~150 bytes) and 4 tokens
    assert 390 <= rows["niah_1", "attn"]["seq_len"] <= 400
    baseline = json.loads((out / "transformer" / "retrieval.json").read_text())
    assert {r["protocol"] for r in baseline["rows"]} == {"attn"}
    table = (out / "retrieval.md").read_text()
    assert "| tg | cross |" in table and "| transformer | attn |" in table and "niah_1 400" in table
    assert not (out / "retrieval.png").exists()  # one NIAH length: no line to draw


def test_zeroshot_command_writes_next_to_the_checkpoint(checkpoints):
    argv = ["zeroshot", str(checkpoints / "tg"), "--n", "4", "--modes", "attn", "linear", "cross", "--device", "cpu"]
    assert oryx_main(["eval", *argv]) == 0
    out = checkpoints / "tg" / "eval"
    data = json.loads((out / "zeroshot.json").read_text())
    rows = {(r["task"], r["protocol"]): r for r in data["rows"]}
    assert set(rows) == {(t, p) for t in ("lambada", "next_sentence") for p in ("attn", "linear", "cross")}
    for (task, _), row in rows.items():
        metrics = row["metrics"]
        assert row["n"] == 4
        assert 0.0 <= metrics["acc"] <= 1.0
        if task == "lambada":
            assert metrics["ppl"] > 1.0
        else:
            assert 0.0 <= metrics["acc_norm"] <= 1.0
    assert rows["lambada", "linear"]["metrics"]["ppl"] != rows["lambada", "attn"]["metrics"]["ppl"]
    assert 0.0 < rows["lambada", "cross"]["attention_fraction"] < 0.2
    assert "### zeroshot: ppl" in (out / "zeroshot.md").read_text()


def test_runner_errors_are_reported(checkpoints, capsys):
    assert oryx_main(["eval", "zeroshot", str(checkpoints / "transformer"), "--modes", "linear", "--n", "2"]) == 2
    assert "none of the modes" in capsys.readouterr().err
    assert oryx_main(["eval", "retrieval", str(checkpoints / "tg"), "--modes", "tail:atn=3"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert (
        oryx_main(["eval", "retrieval", str(checkpoints / "tg"), "--tasks", "niah_1", "--lengths", "2040", "--n", "1"])
        == 2
    )
    assert "use lengths <= 2000" in capsys.readouterr().err
