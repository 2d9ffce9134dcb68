"""Checkpoints written by Oryx 0.1.0 (before recurrences became components) still load and resume: the fixtures in
tests/data/legacy-0.1.0 were written by that version (its make.py), with the logits and losses it computed."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import oryx
from oryx.cli import main
from oryx.compat import upgrade_optimizer_state
from oryx.training.metrics import read_metrics

FIXTURES = Path(__file__).parent / "data" / "legacy-0.1.0"


@pytest.mark.parametrize("variant", ["tg", "tm", "transformer", "gdn", "mamba2"])
def test_saved_model_of_0_1_0_loads_and_gives_its_logits(variant):
    model = oryx.OryxForCausalLM.from_pretrained(FIXTURES / variant)
    expected = torch.load(FIXTURES / variant / "expected.pt")
    with torch.no_grad():
        logits = model(expected["input_ids"], modes=expected["modes"]).logits
    assert rel_err(logits, expected["logits"]) < 1e-6


def _resume(fixture: Path, tmp_path: Path, monkeypatch) -> dict[int, float]:
    """Resume the fixture's step-3 checkpoint to its last step in ``tmp_path``; the losses of the resumed steps."""
    for name in ("train.txt", "val.txt"):
        shutil.copy(fixture / name, tmp_path)
    shutil.copytree(fixture / "step-00000003", tmp_path / "run" / "checkpoints" / "step-00000003")
    monkeypatch.chdir(tmp_path)  # the run's config names its data relative to where it ran
    monkeypatch.setenv("ORYX_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["train", "--resume", "run/checkpoints/step-00000003", "--no-progress"]) == 0
    return {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"}


def _losses(fixture: Path) -> dict[int, float]:
    return {int(step): loss for step, loss in json.loads((fixture / "losses.json").read_text()).items()}


def test_training_checkpoint_of_0_1_0_resumes_exactly(tmp_path, monkeypatch):
    """An Oryx-TG run (recurrence parameters renamed, AdamW's state with them) resumed at step 3 repeats the
    uninterrupted 0.1.0 run's losses of steps 4-6 exactly."""
    fixture = FIXTURES / "tg-run"
    losses, expected = _resume(fixture, tmp_path, monkeypatch), _losses(fixture)
    assert [losses[step] for step in (4, 5, 6)] == [expected[step] for step in (4, 5, 6)]


def test_mamba2_checkpoint_of_0_1_0_resumes_with_its_moments(tmp_path, monkeypatch):
    """The mamba2 baseline's fused in_proj [z; x; B; C; dt] is split into g_proj, qkv_proj [C; B; x] and the
    recurrence's dt_proj, AdamW's moments with it. Step 4's loss (the step-3 weights) matches to rounding; later steps
    only to 1e-3, since the split matmuls round differently and AdamW amplifies tiny differences of tiny gradients
    (the exact check of the moments is below)."""
    fixture = FIXTURES / "mamba2-run"
    losses, expected = _resume(fixture, tmp_path, monkeypatch), _losses(fixture)
    assert losses[4] == pytest.approx(expected[4], rel=1e-6)
    assert [losses[s] for s in (5, 6)] == pytest.approx([expected[s] for s in (5, 6)], rel=1e-3)

    old = torch.load(fixture / "step-00000003" / "optimizer.pt", weights_only=True)["state"]
    config = oryx.OryxConfig.from_pretrained(fixture / "step-00000003")
    new = upgrade_optimizer_state(torch.load(fixture / "step-00000003" / "optimizer.pt", weights_only=True), config)
    d_inner, n, heads = 2 * config.hidden_size, config.mamba_d_state, 2 * config.hidden_size // config.mamba_head_dim
    mixer = "model.layers.0.mixer"
    for moment in ("exp_avg", "exp_avg_sq"):
        z, x, b, c, dt = old[f"{mixer}.in_proj.weight"][moment].split([d_inner, d_inner, n, n, heads])
        assert torch.equal(new["state"][f"{mixer}.g_proj.weight"][moment], z)
        assert torch.equal(new["state"][f"{mixer}.qkv_proj.weight"][moment], torch.cat([c, b, x]))
        assert torch.equal(new["state"][f"{mixer}.recurrence.dt_proj.weight"][moment], dt)
        assert torch.equal(new["state"][f"{mixer}.o_proj.weight"][moment], old[f"{mixer}.out_proj.weight"][moment])
