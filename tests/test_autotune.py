"""fla's autotune choices shipped with the package (`oryx.ops.backends.autotune_choices`) and `oryx autotune`: the
restore adds only what the cache lacks, never replaces a file, reads only choice files, and applies to the shipped
card and versions alone."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import error_line, run_cli

from oryx.ops.backends import autotune_choices as choices


def _random_cache(root: Path, n: int, seed: int) -> dict[str, bytes]:
    """n choice files of random bytes under root, as Triton lays them out: <hash>/<kernel>.autotune.json."""
    gen = torch.Generator().manual_seed(seed)
    files = {}
    for i in range(n):
        digits = torch.randint(0, 16, (52,), generator=gen).tolist()
        relative = f"{''.join('0123456789ABCDEF'[d] for d in digits)}/kernel_{i}{choices.SUFFIX}"
        data = bytes(torch.randint(0, 256, (64,), generator=gen, dtype=torch.uint8).tolist())
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        files[relative] = data
    return files


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_export_then_import_adds_what_the_cache_lacks_and_keeps_the_rest(tmp_path):
    source = _random_cache(tmp_path / "a", 6, seed=1)
    archive = tmp_path / "choices.tar.gz"
    assert choices.export_choices(tmp_path / "a", archive) == 6
    target = tmp_path / "b"
    kept_name = sorted(source)[2]
    (target / kept_name).parent.mkdir(parents=True)
    (target / kept_name).write_bytes(b"tuned here")  # the user's own choice: must survive
    assert choices.import_choices(archive, target) == (5, 1)
    assert _files(target) == {**source, kept_name: b"tuned here"}
    assert choices.import_choices(archive, target) == (0, 6)


def _archive_with(tmp_path: Path, name: str, data: bytes = b"{}") -> Path:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    return archive


@pytest.mark.parametrize("name", ["../outside.autotune.json", "/abs/x.autotune.json", "HASH/kernel.cubin"])
def test_an_archive_with_anything_but_choice_files_is_refused(tmp_path, name):
    archive = _archive_with(tmp_path, name)
    with pytest.raises(ValueError, match="not an autotune archive"):
        choices.import_choices(archive, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "outside.autotune.json").exists()


def _shipped_members() -> set[str]:
    (name,) = choices.SHIPPED.values()
    with tarfile.open(choices.SHIPPED_DIR / name, "r:gz") as archive:
        return {os.path.normpath(m.name) for m in archive.getmembers() if m.isfile()}


def test_the_shipped_choices_are_restored_once_on_their_card_only(tmp_path, monkeypatch):
    members = _shipped_members()
    assert len(members) > 100 and all(m.endswith(choices.SUFFIX) for m in members)
    (card, triton_version, fla_version) = next(iter(choices.SHIPPED))
    monkeypatch.setitem(sys.modules, "triton", None)  # the cache is where TRITON_CACHE_DIR says, Triton or not
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(choices, "_restored", set())
    monkeypatch.setattr(choices, "versions", lambda: (triton_version, fla_version))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    assert choices.restore_shipped_choices(torch.device("cuda", 0)) == 0  # another card: nothing
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: card)
    monkeypatch.setenv(choices.ENV_VAR, "0")
    assert choices.restore_shipped_choices(torch.device("cuda", 1)) == 0  # turned off
    monkeypatch.delenv(choices.ENV_VAR)
    assert choices.restore_shipped_choices(torch.device("cuda", 2)) == len(members)
    assert set(_files(tmp_path / "cache")) == members
    assert choices.restore_shipped_choices(torch.device("cuda", 2)) == 0  # once per process and device
    monkeypatch.setattr(choices, "versions", lambda: ("3.7.0", fla_version))
    assert choices.restore_shipped_choices(torch.device("cuda", 3)) == 0  # another Triton: nothing


def test_without_triton_the_cache_directory_follows_tritons_rule(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # Triton absent: the rule is ours (with Triton, its knobs decide)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))
    assert choices.triton_cache_dir() == tmp_path / "home" / ".triton" / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert choices.triton_cache_dir() == tmp_path / "cache"


def test_the_command_line(tmp_path, capsys):
    _random_cache(tmp_path / "cache", 3, seed=2)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    archive = tmp_path / "out.tar.gz"
    assert run_cli(["autotune", "export", str(archive), *cache]) == 0
    assert "wrote 3 autotune choices" in capsys.readouterr().out
    error_line(capsys, ["autotune", "export", str(archive), *cache], "exists", "--force")
    assert run_cli(["autotune", "export", str(archive), "--force", *cache]) == 0
    assert run_cli(["autotune", "import", str(archive), "--cache-dir", str(tmp_path / "new")]) == 0
    assert "added 3 autotune choices" in capsys.readouterr().out
    assert _files(tmp_path / "new") == _files(tmp_path / "cache")
    error_line(capsys, ["autotune", "import", str(tmp_path / "missing.tar.gz")], "no such file")
    (tmp_path / "notes.txt").write_text("not an archive")
    error_line(capsys, ["autotune", "import", str(tmp_path / "notes.txt"), *cache], "not a .tar.gz archive")
    error_line(capsys, ["autotune", "import", str(_archive_with(tmp_path, "../x.autotune.json")), *cache],
               "not an autotune archive")  # fmt: skip
    error_line(capsys, ["autotune", "import"], "needs the archive's path")
    assert run_cli(["autotune", "status", *cache]) == 0
    assert "3 autotune choices" in capsys.readouterr().out
