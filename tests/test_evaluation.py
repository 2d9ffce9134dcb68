"""`oryx eval ppl` against a direct computation, bits per byte, the unigram floor, and the switching curve."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oryx import ATTN, LINEAR, OryxConfig, OryxForCausalLM
from oryx.cli import main
from oryx.data import byte_tokenizer, load_documents, load_tokens, train_bpe
from oryx.eval import evaluate, switching_curves, unigram_nll
from oryx.eval.perplexity import token_bytes
from oryx.eval.switching import curve_name
from oryx.schedule import parse


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder of a random tiny Oryx-TG with the byte tokenizer, a validation text file)."""
    folder = tmp_path_factory.mktemp("eval")
    os.environ["ORYX_CACHE_DIR"] = str(folder / "cache")
    text = "naïve café — ünïcödé\n" + load_documents("validation")[0].text[:6000]  # multi-byte characters too
    (folder / "val.txt").write_text(text)
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    config = OryxConfig(
        variant="tg",
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        head_dim=32,
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = OryxForCausalLM(config)
    tokenizer.save_pretrained(folder / "ckpt")  # first: the model's save writes the manifest over both
    model.save_pretrained(folder / "ckpt")
    return folder / "ckpt", folder / "val.txt"


def spread(tokens, seq_len: int, n: int) -> list[np.ndarray]:
    """n windows (window i = tokens[i*T : i*T+T+1]) spread evenly over the stream, first and last included."""
    total = (len(tokens) - 1) // seq_len
    starts = [round(k * (total - 1) / (n - 1)) * seq_len for k in range(n)]
    return [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]


def direct_nll(model, windows: list[np.ndarray], modes: torch.Tensor) -> float:
    """Mean NLL of the windows' targets computed plainly, one window at a time."""
    total = 0.0
    for i, window in enumerate(windows):
        ids = torch.from_numpy(window)[None]
        logits = model(ids[:, :-1], modes=modes[i : i + 1]).logits
        total += F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="sum").item()
    return total / sum(len(w) - 1 for w in windows)


@pytest.mark.parametrize("schedule", ["attn", "linear", "chunks:size=8,p_attn=0.5", "tail:attn=5"])
def test_eval_ppl_equals_a_direct_computation(saved, tmp_path, schedule):
    ckpt, val = saved
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(ckpt), "--data", str(val), "--seq-len", "24", "--max-tokens", "240"]
    assert main([*argv, "--batch-size", "4", "--schedule", schedule, "--seed", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    model = OryxForCausalLM.from_pretrained(ckpt).eval()
    tokens = load_tokens(val, byte_tokenizer())
    modes = parse(schedule).modes(10, 24, generator=torch.Generator().manual_seed(3), prompt_length=24)
    windows = spread(tokens, 24, 10)
    with torch.no_grad():
        expected = direct_nll(model, windows, modes)
    assert result["tokens"] == 240
    assert result["nll"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert result["bytes"] == sum(int((w[1:] < 256).sum()) for w in windows)  # byte tokens; 256 = <|endoftext|>
    assert result["bits_per_byte"] == pytest.approx(expected * 240 / math.log(2) / result["bytes"], rel=1e-6)


def test_bits_per_byte_counts_utf8_bytes_of_multibyte_text(saved):
    ckpt, val = saved
    model = OryxForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = byte_tokenizer()
    tokens = load_tokens(val, tokenizer)
    result = evaluate(model, tokens, 16, "linear", tokenizer=tokenizer)  # every window: the targets tokens[1 : N*T+1]
    text = tokenizer.decode(np.asarray(tokens[1 : result.tokens + 1]).tolist(), skip_special_tokens=True)
    assert "ü" in text and result.bytes == len(text.encode("utf-8")) > len(text)


def test_token_bytes_of_a_trained_bpe_match_its_decoding():
    tokenizer = train_bpe(["naïve café — ünïcödé, the quick brown fox " * 20, "jumps over the lazy dog"], 300)
    ids = tokenizer("Über naïve foxes — café <|endoftext|> lazy dogs").input_ids
    table = token_bytes(tokenizer)
    assert int(table[ids].sum()) == len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    assert token_bytes(object()) is None


def test_unigram_floor():
    train = np.array([0, 0, 1, 2, 2, 2])
    # counts + 1 = [3, 2, 4, 1] over 10
    expected = -(math.log(0.3) + math.log(0.1)) / 2
    assert unigram_nll(train, np.array([0, 3]), vocab_size=4) == pytest.approx(expected)


def test_switching_curves_match_full_forwards_with_switches(saved):
    ckpt, val = saved
    model = OryxForCausalLM.from_pretrained(ckpt).eval()
    tokens = load_tokens(val, byte_tokenizer())
    length, points = 40, [13, 27]
    curves = switching_curves(model, tokens, length, [27, 13], windows=5, batch_size=2)
    expected_names = {"attn", "linear"} | {curve_name(a, b, p) for p in points for a, b in ((0, 1), (1, 0))}
    assert set(curves.nll) == expected_names and curves.switch_at == points and curves.windows == 5
    assert all(v.shape == (length,) and np.isfinite(v).all() for v in curves.nll.values())
    # The cached branches equal plain full-sequence forwards with the switch in the modes.
    with torch.no_grad():
        for first, second in ((ATTN, LINEAR), (LINEAR, ATTN)):
            for at in points:
                modes = torch.full((1, length), first)
                modes[:, at:] = second
                per_position = np.zeros(length)
                for window in spread(tokens, length, 5):
                    ids = torch.from_numpy(window)[None]
                    logits = model(ids[:, :-1], modes=modes).logits
                    per_position += F.cross_entropy(logits[0], ids[0, 1:], reduction="none").numpy() / 5
                got = curves.nll[curve_name(first, second, at)]
                np.testing.assert_allclose(got, per_position, rtol=1e-4, atol=1e-5)
                np.testing.assert_array_equal(got[:at], curves.nll[curve_name(first)][:at])
    smoothed = curves.smoothed_perplexity(4)
    assert smoothed["attn"][3] == pytest.approx(math.exp(curves.nll["attn"][:4].mean()))


def test_schedule_curves_match_full_forwards_and_their_excess_the_single_mode_runs(saved):
    ckpt, val = saved
    model = OryxForCausalLM.from_pretrained(ckpt).eval()
    tokens = load_tokens(val, byte_tokenizer())
    length, windows = 36, 4
    several = "spans:linear@0,attn@7,linear@19,attn@30"  # several switches, none at a multiple of anything
    chunks = "chunks:size=5,p_attn=0.5"
    curves = switching_curves(model, tokens, length, [11], windows=windows, batch_size=3, schedules=[several, chunks])
    assert set(curves.schedules) == set(curves.excess) == {several, chunks}
    assert not set(curves.schedules) & set(curves.nll)
    # Reference: plain full forwards of every window, with the spans' modes and with each single mode.
    modes = torch.ones(1, length, dtype=torch.long)
    modes[:, 7:19] = ATTN
    modes[:, 30:] = ATTN
    want, want_excess = np.zeros(length), np.zeros(length)
    with torch.no_grad():
        for window in spread(tokens, length, windows):
            ids = torch.from_numpy(window)[None]

            def nll(m, ids=ids):
                return F.cross_entropy(model(ids[:, :-1], modes=m).logits[0], ids[0, 1:], reduction="none").numpy()

            mixed, attn, linear = nll(modes), nll(torch.zeros_like(modes)), nll(torch.ones_like(modes))
            want += mixed / windows
            want_excess += (mixed - np.where(modes[0].numpy() == ATTN, attn, linear)) / windows
    np.testing.assert_allclose(curves.schedules[several], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(curves.excess[several], want_excess, atol=2e-5)
    assert np.abs(curves.excess[several][:7]).max() < 1e-5, "before the first switch it is the linear run itself"
    summary = curves.schedule_summary(4)
    assert set(summary[several]["after_switch"]) == {"7", "19", "30"}
    after = summary[several]["after_switch"]["19"]
    assert after["switch"] == pytest.approx(math.exp(want[19:23].mean()), rel=1e-4)
    assert after["no_switch"] == pytest.approx(math.exp((want - want_excess)[19:23].mean()), rel=1e-4)
    assert "after_switch" not in summary[chunks] and np.isfinite(curves.excess[chunks]).all()


def test_eval_switching_cli_writes_png_and_json(saved, tmp_path, capsys):
    ckpt, val = saved
    out = tmp_path / "sw"
    argv = ["eval", "switching", str(ckpt), "--data", str(val), "--seq-len", "32", "--switch-at", "8", "20"]
    assert main([*argv, "--windows", "3", "--smooth", "4", "--out", str(out)]) == 0
    data = json.loads((out / "switching.json").read_text())
    assert data["positions"] == list(range(32)) and data["switch_at"] == [8, 20]
    assert len(data["perplexity_smoothed"]["attn->linear@20"]) == 32
    assert set(data["after_switch"]) == {"attn->linear@8", "linear->attn@8", "attn->linear@20", "linear->attn@20"}
    assert (out / "switching.png").read_bytes()[:4] == b"\x89PNG"
    assert "linear->attn@20" in capsys.readouterr().out
    spec = "spans:attn@0,linear@9,attn@21"
    assert main([*argv, "--windows", "3", "--smooth", "4", "--out", str(out), "--schedule", spec]) == 0
    data = json.loads((out / "switching.json").read_text())
    assert set(data["schedules"]) == {spec} and set(data["schedules"][spec]["after_switch"]) == {"9", "21"}
    assert len(data["schedules"][spec]["excess"]) == 32 and (out / "schedules.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{spec}: perplexity" in capsys.readouterr().out
    assert main([*argv, "--schedule", "spans:attn@3"]) == 2
    assert "oryx eval switching: error:" in capsys.readouterr().err


def test_eval_refuses_a_single_mode_model_for_switching(tmp_path, capsys):
    tokenizer = byte_tokenizer()
    model = OryxForCausalLM(
        OryxConfig(variant="transformer", vocab_size=257, hidden_size=64, num_hidden_layers=1, head_dim=32)
    )
    tokenizer.save_pretrained(tmp_path / "t")
    model.save_pretrained(tmp_path / "t")
    (tmp_path / "v.txt").write_text("hello world " * 50)
    assert main(["eval", "switching", str(tmp_path / "t"), "--data", str(tmp_path / "v.txt"), "--seq-len", "16"]) == 2
    assert "both modes" in capsys.readouterr().err
