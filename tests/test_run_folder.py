"""Issue 11, items 1, 2, 9 (Ctrl-C) and 12 (pruning): one writer per run folder, an `--overwrite` that moves only what
Oryx wrote and keeps the old run until the new one has a checkpoint, and interruptions that leave nothing half-done.
The data-loss cases run as two real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import cli_args, error_line, run_cli, subprocess_env, tiny

from oryx import checkpoint as ckpt
from oryx.training import train
from oryx.training.metrics import read_metrics

COMMAND = [sys.executable, "-m", "oryx.cli", "train"]
LOCK, METRICS = ".oryx.lock", "metrics.jsonl"


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- item 1: the run lock -------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_while_a_run_writes(corpus, tmp_path):
    """Process A trains into X; process B's `--overwrite` (and a `--resume`) of X is refused naming A's pid, and A's
    run stays whole. After A dies by SIGKILL the lock is gone with it."""
    out = tmp_path / "x"
    config = tiny(corpus, out, steps=5000, save_every=5, eval_every=5000)
    env = subprocess_env(corpus)
    first = subprocess.Popen([*COMMAND, *cli_args(config)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: (out / "checkpoints" / ckpt.LATEST).exists(), first, "its first checkpoint")
        others = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in (
                [*COMMAND, *cli_args(tiny(corpus, out, steps=12, seed=1)), "--overwrite"],
                [*COMMAND, "--resume", "--out-dir", str(out)],
            )
        ]
        for second in others:
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert err.strip().splitlines() == [
                f"oryx train: error: {out} is being written by another oryx train (pid {first.pid} on "
                f"{socket.gethostname()}); wait for it to finish or choose another --out-dir"
            ]
        assert first.poll() is None  # still training, undisturbed
        assert not list(out.glob(".oryx-replaced-*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    metrics = read_metrics(out)
    assert [r["kind"] for r in metrics].count("start") == 1  # one run's records only, each step once
    steps = [r["step"] for r in metrics if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
    ckpt.verify(ckpt.latest(out))
    from oryx.training.runfolder import RunLock

    with RunLock(out):  # the killed owner's lock died with it
        pass


# --- item 2: --overwrite ---------------------------------------------------------------------------------------------
def test_overwrite_moves_only_what_oryx_wrote_and_keeps_the_old_run_until_the_first_checkpoint(
    corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    old = tiny(corpus, out, steps=4, save_every=2, eval_every=4, report=True, switch_windows=2, switch_at=[16])
    assert run_cli(["train", *cli_args(old)]) == 0
    (out / "report" / "thesis.tex").write_text("\\chapter{Mine}")
    (out / "notes.txt").write_text("my notes")
    (out / "checkpoints" / "README").write_text("mine too")
    before = tree(out)
    mine = {name: before[name] for name in ("report/thesis.tex", "notes.txt", "checkpoints/README")}
    capsys.readouterr()

    # Process B replaces the run and is killed before its first checkpoint: the old run is kept whole.
    new = tiny(corpus, out, steps=5000, save_every=5000, eval_every=5000, seed=1)
    second = subprocess.Popen([*COMMAND, *cli_args(new), "--overwrite"], env=subprocess_env(corpus),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def replaced_and_training() -> bool:
        metrics = out / METRICS
        return bool(list(out.glob(".oryx-replaced-*"))) and metrics.exists() and '"train"' in metrics.read_text()

    wait_for(replaced_and_training, second, "its first step")
    second.send_signal(signal.SIGKILL)
    second.wait()
    (aside,) = out.glob(".oryx-replaced-*")
    moved = tree(aside)
    assert moved == {k: v for k, v in before.items() if k not in {*mine, LOCK}}  # Oryx's files, only those
    assert {k: tree(out)[k] for k in mine} == mine

    # The next run settles it (the old run comes back), replaces it again and, once it has a checkpoint, deletes it.
    final = tiny(corpus, out, steps=4, save_every=2, eval_every=4, seed=2)
    assert run_cli(["train", *cli_args(final), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "restored the previous run" in err and "kept 3 file(s)" in err
    assert all(name in err for name in mine)
    after = tree(out)
    assert not list(out.glob(".oryx-replaced-*"))
    assert {k: after[k] for k in mine} == mine
    assert "report/summary.md" not in after  # the old run's report went with it (the new run writes none)
    assert ckpt.latest(out) == ckpt.step_dir(out, 4)
    assert "seed: 2" in (ckpt.latest(out) / ckpt.TRAIN_CONFIG).read_text()
    assert [r["kind"] for r in read_metrics(out)].count("start") == 1


def test_overwrite_stopped_before_its_first_checkpoint_puts_the_old_run_back(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=4, save_every=2, eval_every=4))
    before = tree(out)
    from oryx.training import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_step", interrupted)
    assert run_cli(["train", *cli_args(tiny(corpus, out, steps=4, seed=5)), "--overwrite"]) == 130
    assert tree(out) == {k: v for k, v in before.items()}  # byte for byte, and nothing else


def test_overwrite_refuses_what_oryx_cannot_tell_from_yours(corpus, tmp_path, capsys):
    # A folder with a run's names but no marker (not written by oryx train): nothing is touched.
    foreign = tmp_path / "foreign"
    for name in ("checkpoints/step-00000004/model.safetensors", "report/thesis.tex", "metrics.jsonl"):
        (foreign / name).parent.mkdir(parents=True, exist_ok=True)
        (foreign / name).write_text("mine")
    before = tree(foreign)
    args = cli_args(tiny(corpus, foreign, steps=2, save_every=2, eval_every=2))
    error_line(capsys, ["train", *args, "--overwrite"], ".oryx-run.json", "nothing was changed")
    assert tree(foreign) == before
    # An Oryx run, and a replacement whose data is unusable: refused before anything moves.
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=2, save_every=2, eval_every=2))
    before = tree(out)
    (tmp_path / "empty.txt").write_text("")
    args = cli_args(tiny(corpus, out, steps=2, save_every=2, eval_every=2, train_data=str(tmp_path / "empty.txt")))
    error_line(capsys, ["train", *args, "--overwrite"], "empty.txt", "no text")
    assert tree(out) == before
    # An Oryx run whose checkpoint folder holds a file of the user's: refused, naming it.
    (ckpt.latest(out) / "my-notes.txt").write_text("mine")
    args = cli_args(tiny(corpus, out, steps=2, save_every=2, eval_every=2))
    error_line(capsys, ["train", *args, "--overwrite"], "checkpoints/step-00000002/my-notes.txt")
    # A fresh run never writes over a file it did not write.
    fresh = tmp_path / "fresh"
    (fresh / "report").mkdir(parents=True)
    (fresh / "report" / "summary.md").write_text("my summary")
    error_line(capsys, ["train", *cli_args(tiny(corpus, fresh, steps=2))], "report/summary.md")
    assert (fresh / "report" / "summary.md").read_text() == "my summary"


# --- item 12: pruning; item 9: Ctrl-C -----------------------------------------------------------------------------
def test_interrupted_pruning_leaves_no_half_deleted_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tiny(corpus, out, steps=8, save_every=2, eval_every=8, keep_checkpoints=1)
    rmtree = ckpt.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then Ctrl-C
        path = Path(path)
        if path.is_dir() and (path / "optimizer.pt").exists() and not kwargs.get("ignore_errors"):
            (path / "optimizer.pt").unlink()
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    assert run_cli(["train", *cli_args(config)]) == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"interrupted; resume with --resume (oryx train --resume --out-dir {out})")
    )
    for folder in ckpt.list_checkpoints(out):
        ckpt.verify(folder)  # no half-deleted step folder
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    assert run_cli(["train", "--resume", "--out-dir", str(out)]) == 0
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000008"]


def test_ctrl_c_prints_one_line_and_the_run_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    config = tiny(corpus, out, steps=5000, save_every=3, eval_every=5000)
    env = subprocess_env(corpus)
    run = subprocess.Popen([*COMMAND, *cli_args(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    wait_for(lambda: (out / "checkpoints" / ckpt.LATEST).exists(), run, "its first checkpoint")
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert err.strip().splitlines() == [
        f"oryx train: interrupted; resume with --resume (oryx train --resume --out-dir {out})"
    ]
    ckpt.verify(ckpt.latest(out))
    state = json.loads((ckpt.latest(out) / ckpt.TRAINER_STATE).read_text())
    assert state["step"] % 3 == 0


def test_a_killed_tokenizer_training_leaves_nothing_half_made(tmp_path, monkeypatch):
    """SIGKILL while a BPE is trained leaves its temporary folder; the next process that trains one removes it (it
    can tell a dead process's folder from a live one's) and leaves only the finished tokenizer."""
    from oryx.data import load_tokenizer, tokenizer

    cache = tmp_path / "cache"
    code = "from oryx.data import load_tokenizer; load_tokenizer('bpe:300')"
    victim = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "ORYX_CACHE_DIR": str(cache)})
    wait_for(lambda: bool(list((cache / "tokenizers").glob(".tmp-*"))), victim, "the tokenizer's temporary folder")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list((cache / "tokenizers").glob(".tmp-*"))  # what the kill left
    train_bpe = tokenizer.train_bpe  # the next training, here on a few documents to keep the test fast
    monkeypatch.setattr(tokenizer, "train_bpe", lambda texts, size: train_bpe(list(texts)[:20], size))
    assert len(load_tokenizer("bpe:300", cache_dir=cache)) == 300
    (made,) = (cache / "tokenizers").iterdir()
    assert made.name.startswith("prose-bpe300-") and (made / "tokenizer.json").is_file()
