"""`oryx train`: config errors before any work, no-decay groups, exact resume (in process and after SIGKILL), data
position, two-process gloo DDP/FSDP equality with one process, damaged checkpoints, NaN stops."""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_args, subprocess_env, tiny

import oryx
from oryx import OryxConfig, OryxForCausalLM
from oryx import checkpoint as ckpt
from oryx.cli import main
from oryx.data import PackedDataset, load_tokenizer, load_tokens
from oryx.optim import split_decay
from oryx.training import CheckpointError, ConfigError, TrainConfig, TrainingDiverged, train
from oryx.training.cli import add_arguments, resolve_config
from oryx.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == kind}


# --- config ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("stepz: 3\n", "stepz"),
        ("lr: fast\n", "lr"),
        ("batch_size: 2.5\n", "batch_size"),
        ("train_data: /no/such/file.txt\n", "train_data"),
        ("schedule: 'chunks:size=0'\n", "schedule"),
        ("preset: oryx-tx-tiny\n", "preset"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, capsys, yaml_text, key):
    out = tmp_path / "run"
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml_text + f"out_dir: {out}\n")
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert key in err and "error" in err
    assert not out.exists()


def test_bad_flag_type_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--steps", "many", "--out-dir", str(tmp_path / "run")])
    assert "--steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_then_flags_and_unknown_key_hint(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 0.001\nsteps: 7\n")
    config = TrainConfig.from_yaml(config_file, TrainConfig.from_dict({"steps": 3}))
    assert (config.lr, config.steps) == (0.001, 7)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        TrainConfig.from_dict({"step": 3})
    with pytest.raises(ConfigError, match="seq_len"):
        TrainConfig.from_dict({"seq_len": True})


def test_shipped_configs_are_valid_and_the_default_one_is_the_default():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for path in files:
        TrainConfig.from_yaml(path).check()
    assert TrainConfig.from_yaml(ROOT / "configs" / "oryx-tg-default.yaml") == TrainConfig()


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in TrainConfig().to_dict():
        assert "--" + key.replace("_", "-") in text


# --- optimizer groups ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(oryx.variants.VARIANTS))
def test_no_decay_groups_are_exactly_norms_and_recurrence_parameters(variant):
    config = OryxConfig(variant=variant, vocab_size=300, hidden_size=64, num_hidden_layers=2, head_dim=32)
    model = OryxForCausalLM(config)
    decay, no_decay = split_decay(model, decay_embeddings=True)
    leaves = {name.rpartition(".")[2] for name in no_decay}
    assert leaves <= {"weight", "norm_weight", "A_log", "dt_bias", "D"}
    assert all(name.endswith("norm.weight") for name in no_decay if name.endswith(".weight"))
    # The same set by an independent rule: every vector parameter, and nothing else.
    assert set(no_decay) == {name for name, p in model.named_parameters() if p.ndim == 1}
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" not in decay  # tied: counted once
    _, no_decay = split_decay(model, decay_embeddings=False)
    assert "model.embed_tokens.weight" in no_decay


# --- resume, checkpoints, divergence ---------------------------------------------------------------------------------
def test_resume_in_process_repeats_the_losses_and_data_position(corpus, tmp_path):
    full = tiny(corpus, tmp_path / "full", keep_checkpoints=3)
    train(full)
    # The checkpoint of step 4 holds the data position after 4 steps × 2 micro-batches.
    state = json.loads((ckpt.step_dir(full.out_dir, 4) / ckpt.TRAINER_STATE).read_text())
    tokens = load_tokens(full.train_data, load_tokenizer("byte"))
    expected = PackedDataset(tokens, full.seq_len, 2, seed=full.seed)
    for _ in range(4 * 2):
        next(expected)
    assert state["data"] == expected.state_dict()
    assert expected.batches_per_epoch < 12 * 2  # the run crosses an epoch boundary

    # Resume from step 4 into a copy of the run folder and compare steps 5..12.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt.step_dir(full.out_dir, 4), ckpt.step_dir(part, 4))
    result = train(tiny(corpus, part), resume=str(ckpt.step_dir(part, 4)))
    assert result.step == 12
    reference, resumed = losses(Path(full.out_dir)), losses(part)
    assert sorted(resumed) == list(range(5, 13))
    assert all(resumed[s] == reference[s] for s in resumed), (reference, resumed)
    finals = [next(r for r in read_metrics(d) if r["kind"] == "final") for d in (part, full.out_dir)]
    assert finals[0]["val_ppl_attn"] == finals[1]["val_ppl_attn"]
    # Each process reports its own first step (compiling and kernel tuning land there), not compiled on the CPU.
    firsts = [r for r in read_metrics(part) if r["kind"] == "first_step"]
    assert [(r["step"], r["compiled"]) for r in firsts] == [(5, False)] and firsts[0]["seconds"] > 0


def test_compile_flags_reach_the_config_and_unset_compiles_on_cuda_only(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cases = (([], None, True, False), (["--compile"], True, True, True), (["--no-compile"], False, False, False))
    for flags, given, on_cuda, on_cpu in cases:
        config, _ = resolve_config(parser.parse_args([*flags, "--out-dir", str(tmp_path)]))
        assert config.compile is given
        assert (config.compiles("cuda"), config.compiles("cpu")) == (on_cuda, on_cpu)


def test_cuda_graphs_unset_only_where_they_replay_safely_and_refused_where_they_cannot(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config_of(*flags: str) -> TrainConfig:
        return resolve_config(parser.parse_args([*flags, "--out-dir", str(tmp_path)]))[0]

    unset = config_of()
    assert unset.cuda_graphs is None
    assert unset.uses_cuda_graphs("cuda", 1)
    assert not unset.uses_cuda_graphs("cpu", 1)  # not compiled there
    assert not unset.uses_cuda_graphs("cuda", 2)  # the ranks' gradient hooks
    assert not config_of("--grad-accum", "2").uses_cuda_graphs("cuda", 1)  # accumulation into graph memory
    assert not config_of("--no-compile").uses_cuda_graphs("cuda", 1)
    assert not config_of("--no-cuda-graphs").uses_cuda_graphs("cuda", 1)
    assert config_of("--cuda-graphs").uses_cuda_graphs("cuda", 1)
    with pytest.raises(ConfigError, match="cuda_graphs needs compile and grad_accum 1"):
        config_of("--cuda-graphs", "--grad-accum", "2").check()
    with pytest.raises(ConfigError, match="cuda_graphs needs compile and grad_accum 1"):
        config_of("--cuda-graphs", "--no-compile").check()
    for device, ranks in (("cpu", 1), ("cuda", 2)):
        with pytest.raises(ConfigError, match="drop --cuda-graphs"):
            config_of("--cuda-graphs").uses_cuda_graphs(device, ranks)


def test_cuda_graphs_asked_for_on_a_cpu_is_a_usage_error_before_the_run_folder(corpus, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "oryx.cli", "train", "--cuda-graphs", "--device", "cpu", "--steps", "1",
         "--out-dir", str(out), "--train-data", str(corpus), "--val-data", str(corpus)],
        capture_output=True, text=True, env=subprocess_env(corpus),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "drop --cuda-graphs" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_sigkill_then_resume_gives_the_uninterrupted_losses(corpus, tmp_path):
    """A run killed with SIGKILL after its first checkpoint and resumed logs the same losses, step by step."""
    config = tiny(corpus, tmp_path / "x", steps=40, save_every=5, eval_every=10)
    env = subprocess_env(corpus)
    command = [sys.executable, "-m", "oryx.cli", "train"]
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = subprocess.Popen([*command, *cli_args(config), "--out-dir", str(full_dir)], env=env)
    victim = subprocess.Popen(
        [*command, *cli_args(config), "--out-dir", str(killed_dir)], env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed_dir / "checkpoints" / ckpt.LATEST).exists():
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL  # it was still training
    saved = ckpt.latest(killed_dir)
    assert saved is not None and int(saved.name.split("-")[1]) < 40

    resumed = subprocess.run([*command, "--resume", "--out-dir", str(killed_dir), "--no-progress"], env=env)
    assert resumed.returncode == 0
    assert full.wait() == 0
    reference, after = losses(full_dir), losses(killed_dir)
    assert sorted(after) == list(range(1, 41))
    assert max(abs(after[s] - reference[s]) for s in reference) <= 1e-6
    evals = [
        (r["step"], r["val_ppl_attn"], r["val_ppl_linear"]) for r in read_metrics(killed_dir) if "val_ppl_attn" in r
    ]
    assert evals == [
        (r["step"], r["val_ppl_attn"], r["val_ppl_linear"]) for r in read_metrics(full_dir) if "val_ppl_attn" in r
    ]


def test_resume_refuses_changed_training_settings(corpus, tmp_path, capsys):
    config = tiny(corpus, tmp_path / "run", steps=2, save_every=2, eval_every=2)
    train(config)
    assert main(["train", "--resume", "--out-dir", config.out_dir, "--lr", "0.5"]) == 2
    assert "lr differs" in capsys.readouterr().err
    assert main(["train", *cli_args(config)]) == 2  # a fresh run may not clobber it
    assert "--resume" in capsys.readouterr().err


def test_damaged_checkpoint_is_refused_and_the_good_one_kept(corpus, tmp_path, capsys):
    config = tiny(corpus, tmp_path / "run", steps=4, save_every=2, eval_every=4)
    train(config)
    good, bad = ckpt.step_dir(config.out_dir, 2), ckpt.step_dir(config.out_dir, 4)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    damaged = weights.read_bytes()

    assert main(["train", "--resume", "--out-dir", config.out_dir]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "model.safetensors" in err and str(bad) in err
    with pytest.raises(CheckpointError, match="damaged"):
        train(config, resume="latest")
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert weights.read_bytes() == damaged  # nothing was rewritten
    ckpt.verify(good)
    assert main(["eval", "ppl", str(bad), "--data", config.val_data, "--max-tokens", "64"]) == 2


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    config = tiny(corpus, tmp_path / "run", steps=8, save_every=2, eval_every=8)
    forward = OryxForCausalLM.forward
    poison = {"calls": 0, "after": 5 * config.grad_accum}  # training forwards before the loss turns to NaN

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            poison["calls"] += 1
            if poison["calls"] > poison["after"]:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(OryxForCausalLM, "forward", poisoned)
    assert main(["train", *cli_args(config)]) == 1
    err = capsys.readouterr().err
    assert "diverged at step 6" in err and "step-00000004" in err
    assert ckpt.latest(config.out_dir) == ckpt.step_dir(config.out_dir, 4)
    ckpt.verify(ckpt.step_dir(config.out_dir, 4))
    assert max(losses(Path(config.out_dir))) == 5
    poison.update(calls=0, after=config.grad_accum)  # resumed at step 4: step 5 is fine, step 6 is not
    with pytest.raises(TrainingDiverged, match="diverged at step 6"):
        train(config, resume="latest")
    assert ckpt.latest(config.out_dir) == ckpt.step_dir(config.out_dir, 4)


# --- data parallel ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(corpus, tmp_path, parallel):
    """torchrun with 2 CPU ranks (gloo) and the same global batch gives the single process's losses."""
    config = tiny(corpus, tmp_path / "x", steps=6, save_every=6, eval_every=3)
    env = subprocess_env(corpus)
    single = train(tiny(corpus, tmp_path / "single", steps=6, save_every=6, eval_every=3))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [
            *launcher,
            "-m",
            "oryx.cli",
            "train",
            *cli_args(config),
            "--parallel",
            parallel,
            "--out-dir",
            str(tmp_path / "dp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = losses(single.run_dir), losses(tmp_path / "dp")
    assert sorted(two) == list(range(1, 7))
    assert max(abs(one[s] - two[s]) / abs(one[s]) for s in one) <= 1e-5, (one, two)
    # The two-rank checkpoint loads as a plain model with the single run's final weights (to fp32 rounding).
    a = OryxForCausalLM.from_pretrained(ckpt.latest(tmp_path / "dp"))
    b = OryxForCausalLM.from_pretrained(single.checkpoint)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
