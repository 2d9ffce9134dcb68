"""`oryx generate` end to end on a tiny saved checkpoint: streaming, schedules, the attention fraction and memory."""

import json
import os

import pytest
import torch

from oryx import OryxConfig, OryxForCausalLM
from oryx.cli import main
from oryx.data import byte_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    os.environ["ORYX_CACHE_DIR"] = str(folder / "cache")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = OryxConfig(
        variant="tg",
        vocab_size=320,  # padded past the tokenizer's 257 ids, as training pads it
        hidden_size=64,
        num_hidden_layers=2,
        head_dim=32,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(folder / "ckpt")  # first: the model's save writes the manifest over both
    OryxForCausalLM(config).save_pretrained(folder / "ckpt")
    return folder / "ckpt"


def test_generate_streams_and_reports_fraction_and_memory(checkpoint, tmp_path, capsys):
    out = tmp_path / "g.json"
    prompt = "To be, or not"  # 13 byte tokens
    argv = ["generate", str(checkpoint), "--prompt", prompt, "--schedule", "tail:attn=3", "--max-new-tokens", "9"]
    assert main([*argv, "--seed", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert printed.startswith(prompt)  # streamed: the prompt, then the new text as it comes
    assert "attention for" in printed and "KV cache" in printed and "recurrent" in printed
    new = result["new_tokens"]
    assert result["prompt_tokens"] == 13 and 1 <= new <= 9
    assert result["processed_tokens"] == 13 + new - 1  # the last token is never fed back
    # tail:attn=3: the last 3 prompt tokens and every generated one that was processed use attention
    assert result["attention_fraction"] == pytest.approx((3 + new - 1) / (13 + new - 1))
    memory = result["memory_bytes"]
    layers, width = 2, 64
    assert result["kv_bytes_in_use"] == layers * 2 * result["processed_tokens"] * width * 4  # K, V of every token
    assert memory["kv"] >= result["kv_bytes_in_use"]  # the buffers grow geometrically
    assert memory["recurrent"] == layers * 2 * 32 * 32 * 4  # [H, K, V] per layer, fp32
    assert memory["conv"] > 0


def test_generate_greedy_is_deterministic_and_reads_a_prompt_file(checkpoint, tmp_path, capsys):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("Once upon a time")
    texts = []
    for schedule in ("linear", "linear", "attn"):
        out = tmp_path / "g.json"
        argv = ["generate", str(checkpoint), "--prompt-file", str(prompt_file), "--greedy", "--no-stream"]
        assert main([*argv, "--schedule", schedule, "--max-new-tokens", "6", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        texts.append(result["text"])
        assert result["attention_fraction"] == (1.0 if schedule == "attn" else 0.0)
    assert texts[0] == texts[1]
    assert "Once upon a time" in capsys.readouterr().out
    # The static-cache decoding steps of --cuda-graphs (eager without CUDA) produce the same greedy text.
    out = tmp_path / "g.json"
    argv = ["generate", str(checkpoint), "--prompt-file", str(prompt_file), "--greedy", "--no-stream", "--cuda-graphs"]
    assert main([*argv, "--schedule", "linear", "--max-new-tokens", "6", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["text"] == texts[0]


def test_generate_rejects_a_bad_schedule(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "hi", "--schedule", "tail:attention=3"]) == 2
    assert "tail" in capsys.readouterr().err
