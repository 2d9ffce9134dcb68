"""Issue 11, items 9 and 10: every user-caused failure of the CLI exits 2 with one `oryx <command>: error:` line that
names the file or flag (never a traceback), and bad values are refused rather than reinterpreted."""

import errno
import json
import shutil

import pytest
import torch
from helpers import cli_args, error_line, run_cli, tiny

from oryx import checkpoint as ckpt
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
BAD_TEXT = {
    "empty.txt": (b"", "contains no text"),
    "binary.txt": (b"\x00\x01\x02PK\x03\x04 not text", "binary file"),
    "latin1.txt": ("café au lait, naïve".encode("latin-1"), "not UTF-8"),
    "broken.jsonl": (b'{"text": "fine"}\n{"text": oops\n', "broken.jsonl:2: not valid JSON"),
    "rows.jsonl": (b'{"body": "no text field"}\n', "no field 'text'"),
}


@pytest.mark.parametrize("name", list(BAD_TEXT))
def test_bad_text_data_names_the_file_in_train_and_eval(corpus, run, tmp_path, capsys, name):
    content, needle = BAD_TEXT[name]
    bad = tmp_path / name
    bad.write_bytes(content)
    line = error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--train-data", str(bad)], str(bad), needle)
    assert "train_data" in line
    assert not (tmp_path / "out").exists()  # refused before the run folder was made
    error_line(capsys, ["eval", "ppl", str(run), "--data", str(bad)], str(bad), needle, command="eval ppl")


def test_bad_config_and_tokenizer_files_are_named(corpus, run, tmp_path, capsys):
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xff\xfe\x00\x01binary")
    error_line(capsys, ["train", "--config", str(garbage)], str(garbage))
    bad_json = tmp_path / "tok.json"
    bad_json.write_text("{not json")
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--tokenizer", str(bad_json)], str(bad_json))
    error_line(capsys, ["eval", "ppl", str(run), "--tokenizer", str(bad_json)], str(bad_json), command="eval ppl")
    # A model folder whose config.json is not JSON (loaded unverified, as a user's own folder would be).
    broken = tmp_path / "model"
    shutil.copytree(ckpt.latest(run), broken)
    (broken / "config.json").write_text("{'not': json")
    line = error_line(capsys, ["eval", "ppl", str(broken), "--no-verify"], str(broken), command="eval ppl")
    assert "config" in line


def test_too_little_data_says_how_much_and_what_to_change(corpus, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be.")  # 20 byte tokens: not one batch of 4 windows of 33
    error_line(capsys, [*train_args(corpus, tmp_path / "out"), "--train-data", str(small)], "train_data", "seq_len")
    assert not (tmp_path / "out").exists()


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


def test_garbage_latest_and_metrics(run, corpus, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_bytes(b"\x89PNG\r\n\x1a\n\x00garbage")
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "latest", "damaged")
    error_line(capsys, ["eval", "ppl", str(copy)], "latest", "damaged", command="eval ppl")
    (copy / "checkpoints" / "latest").write_text("step-00000002\n")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    error_line(capsys, ["train", "--resume", "--out-dir", str(copy)], "metrics.jsonl", "line 2")


def test_full_disk_says_so_and_how_to_continue(corpus, tmp_path, capsys, monkeypatch):
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    out = tmp_path / "out"
    error_line(capsys, train_args(corpus, out), "no space left", "--resume")
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint was removed


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


def test_bench_compile_replays_cuda_graphs_only_on_cuda(capsys, tmp_path):
    """`oryx bench --compile` says whether it replays CUDA graphs (as oryx train does on one GPU): never on a CPU."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--presets", "oryx-tg-tiny", "--lengths", "64", "--repeats", "1", "--device", "cpu", "--compile",
            "--json", str(out)]  # fmt: skip
    assert run_cli(argv) == 0
    assert "compile=True cuda_graphs=False" in capsys.readouterr().out
    assert json.loads(out.read_text())["cuda_graphs"] is False
