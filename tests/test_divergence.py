"""Issue 11, items 6, 7 and 12 (memory): a loss beyond exp's range is perplexity inf (and divergence in training), a
divergence leaves `latest` on a checkpoint a lower learning rate can start from and its advice works, and a
sequence length far beyond the machine's memory is refused before any work."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import cli_args, error_line, make_corpus, run_cli, tiny

from oryx import OryxConfig, OryxForCausalLM
from oryx import checkpoint as ckpt
from oryx.data import byte_tokenizer
from oryx.eval.perplexity import PerplexityResult
from oryx.training import TrainConfig
from oryx.training.metrics import read_metrics


def poison(monkeypatch, *, training: bool, after: int, scale: float) -> dict:
    """Multiply the logits of the model's forwards (training or evaluation ones) by `scale` after `after` calls."""
    forward = OryxForCausalLM.forward
    count = {"calls": 0, "after": after}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training == training:
            count["calls"] += 1
            if count["calls"] > count["after"]:
                out.logits = out.logits * scale
        return out

    monkeypatch.setattr(OryxForCausalLM, "forward", poisoned)
    return count


# --- item 6 -----------------------------------------------------------------------------------------------------
def test_perplexity_beyond_exp_range_is_inf():
    for nll in (1.0, 300.5, 709.0):
        assert PerplexityResult("attn", 10, nll).perplexity == math.exp(nll)
    for nll in (709.8, 1e4, math.inf):
        assert PerplexityResult("attn", 10, nll).perplexity == math.inf
    assert math.isnan(PerplexityResult("attn", 10, math.nan).perplexity)


def test_eval_ppl_reports_inf_for_a_loss_above_709(tmp_path, capsys):
    make_corpus(tmp_path)
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = OryxForCausalLM(OryxConfig(variant="tg", vocab_size=320, hidden_size=64, num_hidden_layers=1, head_dim=32))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e4)  # the tied head: logits in the 10^5s
    tokenizer.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(tmp_path / "model"), "--data", str(tmp_path / "val.txt"), "--max-tokens", "64"]
    assert run_cli([*argv, "--seq-len", "32", "--json", str(out)]) == 0
    assert "inf" in capsys.readouterr().out
    for result in json.loads(out.read_text())["results"]:
        assert result["nll"] > 709 and result["perplexity"] == math.inf


def test_validation_loss_above_709_is_a_divergence_in_training(corpus, tmp_path, monkeypatch, capsys):
    config = tiny(corpus, tmp_path / "run", steps=8, save_every=2, eval_every=8)
    evals = poison(monkeypatch, training=False, after=0, scale=1.0)
    assert run_cli(["train", *cli_args(config)]) == 0  # unpoisoned: count the validation forwards of one run
    per_run = evals["calls"]
    config = tiny(corpus, tmp_path / "run2", steps=8, save_every=2, eval_every=8)
    poison(monkeypatch, training=False, after=per_run // 4 * 2, scale=1e6)  # from the third validation (step 6) on
    capsys.readouterr()
    assert run_cli(["train", *cli_args(config)]) == 1
    err = capsys.readouterr().err
    assert "diverged at step 6: validation perplexity attn inf" in err and "step-00000004" in err
    assert ckpt.latest(config.out_dir) == ckpt.step_dir(config.out_dir, 4)
    assert not ckpt.step_dir(config.out_dir, 6).exists()
    (last,) = [r for r in read_metrics(config.out_dir) if r["step"] == 6 and r["kind"] == "eval"]
    assert last["val_ppl_attn"] == math.inf and last["val_loss_attn"] > 709


# --- item 7 -----------------------------------------------------------------------------------------------------
def lr_at(step: int, peak: float, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based), from the recipe's definition: linear warm-up over
    round(warmup_ratio·total) steps, then a half cosine from peak to min_ratio·peak at the last step."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return peak * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_divergence_leaves_a_checkpoint_a_lower_lr_resumes_from(corpus, tmp_path, monkeypatch, capsys):
    config = tiny(corpus, tmp_path / "run", steps=10, save_every=1, eval_every=10, keep_checkpoints=3)
    poison(monkeypatch, training=True, after=5 * config.grad_accum, scale=math.nan)  # step 6's loss is NaN
    assert run_cli(["train", *cli_args(config)]) == 1
    err = capsys.readouterr().err
    # Step 6's loss comes from the weights after step 5: the checkpoint of step 5 already fails, so `latest` goes
    # back to step 4 (validated), and step 5 is set aside for inspection.
    assert "diverged at step 6" in err and "step-00000004" in err
    assert "--resume" in err and "--change-schedule --lr" in err
    assert ckpt.latest(config.out_dir) == ckpt.step_dir(config.out_dir, 4)
    assert (Path(config.out_dir) / "checkpoints" / "diverged-step-00000005").is_dir()
    assert all(math.isfinite(r["val_ppl_attn"]) for r in read_metrics(config.out_dir) if r["kind"] == "eval")

    # The advice works: resume with a lower learning rate and a longer warm-up (the poison is gone).
    monkeypatch.undo()
    new_lr, warmup = config.peak_lr / 4, 0.3
    argv = ["train", "--resume", "--out-dir", config.out_dir, "--lr", str(new_lr), "--warmup-ratio", str(warmup)]
    error_line(capsys, argv, "--change-schedule")  # a changed setting must be asked for explicitly
    assert run_cli([*argv, "--change-schedule"]) == 0
    train_lr = {r["step"]: r["lr"] for r in read_metrics(config.out_dir) if r["kind"] == "train"}
    for step in range(5, 11):
        assert train_lr[step] == pytest.approx(lr_at(step - 1, new_lr, 10, warmup, config.min_lr_ratio), rel=1e-12)
    for step in range(1, 5):
        assert train_lr[step] == pytest.approx(lr_at(step - 1, config.peak_lr, 10, 0.1, config.min_lr_ratio))
    state = json.loads((ckpt.latest(config.out_dir) / ckpt.TRAINER_STATE).read_text())
    (entry,) = state["history"]
    assert entry["step"] == 4 and entry["changes"] == {"lr": [config.peak_lr, new_lr], "warmup_ratio": [0.1, warmup]}
    starts = [r for r in read_metrics(config.out_dir) if r["kind"] == "start"]
    assert starts[-1]["changes"] == entry["changes"]
    saved = TrainConfig.from_yaml(ckpt.latest(config.out_dir) / ckpt.TRAIN_CONFIG)
    assert (saved.lr, saved.warmup_ratio) == (new_lr, warmup)


# --- item 12: memory ---------------------------------------------------------------------------------------------
def test_a_seq_len_far_beyond_memory_is_refused_up_front(corpus, tmp_path, capsys):
    from oryx.training.trainer import activation_bytes, total_memory

    config = tiny(corpus, tmp_path / "run", steps=2, save_every=2, eval_every=2)
    line = error_line(capsys, ["train", *cli_args(config), "--seq-len", str(10**9)], "seq_len 1000000000", "GiB")
    assert "--seq-len" in line
    assert not (tmp_path / "run").exists()
    # Never for a normal run: the default recipe, and the paper's 130m model at 2048 × 8 on a GPU-sized memory.
    default = TrainConfig()
    cfg = OryxConfig.from_preset(default.preset, vocab_size=4096)
    assert activation_bytes(cfg, default.batch_size, default.seq_len) < 2**30
    paper = OryxConfig.from_preset("oryx-tg-130m")
    assert activation_bytes(paper, 8, 2048) < 40 * 2**30
    assert total_memory(torch.device("cpu")) > 2**30
