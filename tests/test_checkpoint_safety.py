"""Issue 11, items 3, 4, 5 and 12: checkpoints and model folders are loaded from exactly the files their manifest
lists and verifies, unsafe pickles are refused with our own message, resuming notices data that changed, and a
`--resume` path that does not exist says so."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_args, error_line, make_corpus, run_cli, tiny
from safetensors.torch import load_file, save_file

import oryx
from oryx import checkpoint as ckpt
from oryx.data import byte_tokenizer
from oryx.training import CheckpointError, train

MARKER = Path("/tmp") / "oryx-test-pickle-ran-code"


class RunsCode:
    """A pickle that would run code (create MARKER) when unpickled without weights_only."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny(corpus, out, steps=4, save_every=2, eval_every=2))
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def ppl_json(capsys, folder: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "ppl.json"
    assert run_cli(["eval", "ppl", str(folder), "--max-tokens", "256", "--json", str(out), *extra]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


# --- item 3: the manifest lists every file the loader reads --------------------------------------------------------
def test_an_extra_safetensors_file_is_refused_never_merged(copy, capsys):
    latest = ckpt.latest(copy)
    weights = load_file(latest / "model.safetensors")
    save_file({"model.embed_tokens.weight": torch.zeros_like(weights["model.embed_tokens.weight"])},
              latest / "zz.safetensors")  # fmt: skip
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "zz.safetensors", "does not list")
    error_line(capsys, ["eval", "ppl", str(copy)], "zz.safetensors", command="eval ppl")
    error_line(capsys, ["generate", str(copy), "--prompt", "hi"], "zz.safetensors")
    with pytest.raises(CheckpointError, match=r"zz\.safetensors"):
        ckpt.read(latest)


@pytest.mark.parametrize(
    "content",
    ["{}", "[]", "null", '"model.safetensors"', "{broken", '{"model.safetensors": "abc"}',
     '{"../train_config.yaml": "' + "0" * 64 + '"}'],
)  # fmt: skip
def test_malformed_manifests_are_refused(copy, capsys, content):
    (ckpt.latest(copy) / "checksums.json").write_text(content)
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "checksums.json")
    error_line(capsys, ["eval", "ppl", str(copy)], "checksums.json", command="eval ppl")


def test_a_manifest_must_list_what_resuming_reads(copy, capsys):
    latest = ckpt.latest(copy)
    sums = json.loads((latest / "checksums.json").read_text())
    del sums["optimizer.pt"]
    (latest / "checksums.json").write_text(json.dumps(sums))
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "does not list optimizer.pt")


def test_a_folder_without_a_manifest_needs_no_verify(copy, run, tmp_path, capsys):
    reference = ppl_json(capsys, run, tmp_path)
    (ckpt.latest(copy) / "checksums.json").unlink()
    error_line(capsys, ["eval", "ppl", str(copy)], "no checksums.json", "--no-verify", command="eval ppl")
    error_line(capsys, ["generate", str(copy), "--prompt", "hi"], "no checksums.json", "--no-verify")
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "no checksums.json")
    out = tmp_path / "ppl.json"
    assert run_cli(["eval", "ppl", str(copy), "--max-tokens", "256", "--json", str(out), "--no-verify"]) == 0
    assert "unverified" in capsys.readouterr().err
    assert json.loads(out.read_text())["results"] == reference["results"]  # the same weights, loaded unchecked


def test_truncated_or_changed_weights_are_refused_by_the_checksum(copy, tmp_path, capsys):
    weights = ckpt.latest(copy) / "model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 3], data[:-200] + bytes(b ^ 0x5A for b in data[-200:])):
        weights.write_bytes(damaged)
        for argv, command in (
            (["eval", "ppl", str(copy)], "eval ppl"),
            (["generate", str(copy), "--prompt", "hi"], None),
        ):
            line = error_line(capsys, argv, "model.safetensors", "does not match its checksum", command=command)
            assert "SafetensorError" not in line
    # Unverified (the user's choice), a truncated file is still a clean error, not a SafetensorError traceback.
    (weights.parent / "checksums.json").unlink()
    weights.write_bytes(data[: len(data) // 3])
    error_line(capsys, ["eval", "ppl", str(copy), "--no-verify"], "cannot load the model", command="eval ppl")


def test_save_pretrained_folders_are_verifiable(tmp_path, capsys, gen):
    make_corpus(tmp_path)
    tokenizer = byte_tokenizer()
    config = oryx.OryxConfig(variant="tg", vocab_size=320, hidden_size=64, num_hidden_layers=1, head_dim=32)
    model = oryx.OryxForCausalLM(config)
    folder = tmp_path / "mine"
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    listed = json.loads((folder / "checksums.json").read_text())
    assert set(listed) == {p.name for p in folder.iterdir()} - {"checksums.json"}
    data = str(tmp_path / "val.txt")
    assert run_cli(["eval", "ppl", str(folder), "--data", data, "--max-tokens", "64"]) == 0
    capsys.readouterr()
    # The usual transformers order (model, then tokenizer) leaves the tokenizer unlisted: refused, saying how to fix.
    other = tmp_path / "other"
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    error_line(capsys, ["eval", "ppl", str(other), "--data", data], "tokenizer", "write_manifest", command="eval ppl")
    oryx.write_manifest(other)
    assert run_cli(["eval", "ppl", str(other), "--data", data, "--max-tokens", "64"]) == 0


# --- item 4: pickles that would run code -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "scheduler.pt"])
def test_a_pickle_with_code_in_a_checkpoint_is_refused_as_unsafe(copy, capsys, name):
    latest = ckpt.latest(copy)
    torch.save({"state": RunsCode()}, latest / name)
    oryx.write_manifest(latest)  # the checksums match: only the content is wrong
    line = error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], name, "not a safe checkpoint file")
    assert "weights_only" not in line and "Traceback" not in line
    assert not MARKER.exists()


def test_a_pytorch_model_bin_with_code_is_refused_as_unsafe(copy, tmp_path, capsys):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt.latest(copy) / name, folder / name)
    torch.save({"model.embed_tokens.weight": RunsCode()}, folder / "pytorch_model.bin")
    oryx.write_manifest(folder)
    line = error_line(capsys, ["eval", "ppl", str(folder)], "pytorch_model.bin", "not a safe checkpoint file",
                      command="eval ppl")  # fmt: skip
    assert "weights_only" not in line
    assert not MARKER.exists()


# --- item 5: resuming onto other data ------------------------------------------------------------------------------
def test_a_shard_rewritten_with_the_same_size_is_refused_on_resume(tmp_path, capsys, gen):
    corpus = make_corpus(tmp_path)
    shard = tmp_path / "train.bin"
    torch.randint(0, 257, (4000,), generator=gen).numpy().astype(np.uint16).tofile(shard)
    config = tiny(corpus, tmp_path / "run", steps=4, save_every=2, eval_every=4, train_data=str(shard))
    assert run_cli(["train", *cli_args(config)]) == 0
    capsys.readouterr()
    before = shard.stat().st_size
    torch.randint(0, 257, (4000,), generator=gen).numpy().astype(np.uint16).tofile(shard)  # same size, new tokens
    assert shard.stat().st_size == before
    step2 = str(ckpt.step_dir(config.out_dir, 2))
    error_line(capsys, ["train", "--resume", step2], "train_data", str(shard), "--accept-data-change")
    assert run_cli(["train", "--resume", step2, "--accept-data-change"]) == 0
    state = json.loads((ckpt.latest(config.out_dir) / ckpt.TRAINER_STATE).read_text())
    assert state["history"][-1]["data_changed"] == ["train_data"] and state["history"][-1]["step"] == 2
    # A shard of another length: refused with both token counts, and accepted knowingly too.
    torch.randint(0, 257, (3000,), generator=gen).numpy().astype(np.uint16).tofile(shard)
    error_line(capsys, ["train", "--resume", step2], "had 4,000 tokens, now 3,000", "--accept-data-change")
    assert run_cli(["train", "--resume", step2, "--accept-data-change"]) == 0


# --- item 12: a --resume path that does not exist ------------------------------------------------------------------
def test_resume_from_a_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "runs" / "x" / "checkpoints" / "step-00000100"
    line = error_line(capsys, ["train", "--resume", str(missing)], str(missing), "does not exist")
    assert "checksums.json" not in line
