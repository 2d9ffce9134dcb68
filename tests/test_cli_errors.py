"""Issue 11, items 9 and 10: every user-caused failure of the CLI exits 2 with one `oryx <command>: error:` line that
names the file or flag (never a traceback), and bad values are refused rather than reinterpreted."""

import pytest
import torch
from helpers import cli_args, error_line, run_cli, tiny

from oryx.training import checkpoint as ckpt
from oryx.training import train


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A finished two-step run (its checkpoint is verified, with the byte tokenizer)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny(corpus, out, steps=2, save_every=2, eval_every=2))
    return out


def train_args(corpus, out_dir, **overrides) -> list[str]:
    return ["train", *cli_args(tiny(corpus, out_dir, steps=2, save_every=2, eval_every=2, **overrides))]


# --- item 9: inputs, files and folders ---------------------------------------------------------------------------
def test_impossible_model_shape_and_unknown_preset(corpus, tmp_path, capsys):
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--hidden-size", "100"], "hidden_size (100)", "head_dim")
    error_line(capsys, ["info", "bogus"], "bogus", "oryx info")
    error_line(capsys, ["info", "oryx-tg-tiny", "--vocab-size", "0"], "--vocab-size")
    assert run_cli(["info", "oryx-tg-tiny"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(corpus, run, tmp_path, capsys):
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--device", "cuda"], "cuda", "no CUDA GPU")
    error_line(capsys, ["eval", "ppl", str(run), "--device", "cuda:1"], "--device cuda:1", command="eval ppl")
    error_line(capsys, ["generate", str(run), "--prompt", "hi", "--device", "cuda"], "--device cuda")
    error_line(capsys, ["bench", "--device", "cuda"], "--device cuda")
    error_line(capsys, ["generate", str(run), "--prompt", "hi", "--device", "tpu"], "auto, cpu, cuda")


def test_out_dir_that_is_a_file(corpus, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    error_line(capsys, train_args(corpus, file), str(file), "is a file", "--out-dir")
    error_line(capsys, train_args(corpus, file / "run"), str(file), "--out-dir")
    assert file.read_text() == "mine"


def test_seed_beyond_2_to_the_32(corpus, run, tmp_path, capsys):
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--seed", str(2**32)], "seed", "2^32")
    error_line(capsys, ["generate", str(run), "--prompt", "hi", "--seed", str(2**64)], "--seed")
    error_line(capsys, ["eval", "ppl", str(run), "--seed", "-1"], "--seed", command="eval ppl")


def test_unreadable_prompt_file(run, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    error_line(capsys, ["generate", str(run), "--prompt-file", str(missing)], "--prompt-file", str(missing))
    error_line(capsys, ["generate", str(run), "--prompt-file", str(tmp_path)], "--prompt-file", str(tmp_path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("déjà vu".encode("latin-1"))
    error_line(capsys, ["generate", str(run), "--prompt-file", str(latin)], str(latin), "UTF-8")


def test_json_into_a_missing_folder_is_refused_before_the_work(run, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(ckpt, "load_pretrained", no_work)
    target = tmp_path / "no" / "such" / "out.json"
    for argv, command in (
        (["eval", "ppl", str(run)], "eval ppl"),
        (["generate", str(run), "--prompt", "hi"], "generate"),
        (["bench", "--presets", "oryx-tg-tiny"], "bench"),
    ):
        error_line(capsys, [*argv, "--json", str(target)], "--json", str(target.parent), command=command)
    assert not (tmp_path / "no").exists()


# --- item 10: values refused, not reinterpreted ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value"), [("--grad-clip", "nan"), ("--lr", "nan"), ("--eps", "nan"), ("--lr", "inf")]
)
def test_non_finite_optimizer_settings(corpus, tmp_path, capsys, flag, value):
    key = flag[2:].replace("-", "_")
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), flag, value], key, "finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["eval", "ppl", "RUN", "--seq-len", "0"], "--seq-len"),
        (["eval", "ppl", "RUN", "--max-tokens", "0"], "--max-tokens"),
        (["eval", "ppl", "RUN", "--max-tokens", "-1"], "--max-tokens"),
        (["eval", "ppl", "RUN", "--batch-size", "0"], "--batch-size"),
        (["eval", "switching", "RUN", "--windows", "0"], "--windows"),
        (["generate", "RUN", "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["generate", "RUN", "--prompt", "hi", "--top-p", "2"], "--top-p"),
        (["generate", "RUN", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
        (["generate", "RUN", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_values_are_refused(run, capsys, argv, flag):
    argv = [str(run) if a == "RUN" else a for a in argv]
    command = " ".join(argv[:2]) if argv[0] == "eval" else argv[0]
    error_line(capsys, argv, flag, argv[argv.index(flag) + 1], command=command)
