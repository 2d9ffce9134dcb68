"""`benchmarks/lm_gpu_tables.py`: the tables of lm_gpu.sh's runs, on result files written here with random values."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_gpu_tables.py"
spec = importlib.util.spec_from_file_location("lm_gpu_tables", SCRIPT)
lm_gpu_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lm_gpu_tables)


def _rows_file(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "x", "metrics": [], "rows": rows, "meta": {}}))


def _run(root: Path, name: str, modes: list[str], rng: random.Random, ood: bool = True) -> dict:
    """A run folder as lm_gpu.sh leaves it, with random perplexities; returns them."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    values = {m: {s: rng.uniform(50, 500) for s in ("val", "test", "ood", "best")} for m in modes}
    final = {"kind": "final", "step": 9, **{f"val_ppl_{m}": values[m]["val"] for m in modes}}
    earlier = {"kind": "eval", "step": 4, **{f"val_ppl_{m}": values[m]["best"] for m in modes}}
    records = [{"kind": "train", "step": 1}, earlier, final]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    for split in ("test", "ood") if ood else ("test",):
        results = [{"schedule": m, "perplexity": values[m][split], "bits_per_byte": 2.5} for m in modes]
        (run / "eval" / f"ppl-{split}.json").write_text(json.dumps({"results": results}))
    _rows_file(run / "eval" / "zeroshot" / "step-1" / "zeroshot.json",
               [{"protocol": m, "task": "lambada", "metrics": {"acc": 0.25}} for m in modes])  # fmt: skip
    recall = [{"protocol": p, "metrics": {"recall": r}} for p in [*modes, "cross"] for r in (0.5, 1.0)]
    _rows_file(run / "eval" / "retrieval" / "step-1" / "retrieval.json", recall)
    return values


def test_ratios_are_oryx_over_its_baselines_run_for_run(tmp_path):
    rng = random.Random(7)
    oryx = _run(tmp_path, "oryx-tg-s0", ["attn", "linear"], rng)
    transformer = _run(tmp_path, "transformer-s0", ["attn"], rng)
    _run(tmp_path, "gdn-s0", ["linear"], rng, ood=False)  # its out-of-domain evaluation never ran
    _run(tmp_path, "transformer-s1", ["attn"], rng)  # another seed: not Oryx-TG s0's baseline
    text = lm_gpu_tables.tables(tmp_path)
    want = [oryx["linear"][s] / transformer["attn"][s] for s in ("val", "test", "ood")]
    assert "| oryx-tg-s0 linear / transformer-s0 | " + " | ".join(f"{r:.3f}" for r in want) + " |" in text
    gdn_line = next(line for line in text.splitlines() if line.startswith("| oryx-tg-s0 attn / gdn-s0 |"))
    assert gdn_line.endswith("| – |")
    assert "transformer-s1 |" not in text.split("Oryx mode / baseline")[1]
    assert "| oryx-tg-s0 | 0.750 | 0.750 | 0.750 |" in text  # mean recall per protocol


def test_seed_table_is_the_mean_and_half_range_over_seed_runs_only(tmp_path):
    rng = random.Random(11)
    seeds = [_run(tmp_path, f"gdn-s{seed}", ["linear"], rng) for seed in (0, 1, 2)]
    _run(tmp_path, "gdn-lr0.01", ["linear"], rng)  # an LR point: not a seed
    text = lm_gpu_tables.tables(tmp_path)
    cells, steps = [], []
    for split in ("val", "test", "ood", "best"):
        values = [seed["linear"][split] for seed in seeds]
        if split == "best":  # the lower of the run's two validations, at its step
            values = [min(seed["linear"]["best"], seed["linear"]["val"]) for seed in seeds]
            steps = ["4" if seed["linear"]["best"] < seed["linear"]["val"] else "9" for seed in seeds]
        cells.append(f"{sum(values) / 3:.2f} ± {(max(values) - min(values)) / 2:.2f}")
    assert "| gdn | linear | 3 | " + " | ".join(cells) + f" | – | – | {'/'.join(steps)} |" in text


def test_best_checkpoint_is_the_lowest_mean_validation_over_modes(tmp_path):
    run = tmp_path / "oryx-tg-s0"
    (run / "eval").mkdir(parents=True)
    records = [  # step 2 has attention's lowest, step 3 the lowest mean over both modes
        {"kind": "eval", "step": 2, "val_ppl_attn": 40.0, "val_ppl_linear": 90.0},
        {"kind": "eval", "step": 3, "val_ppl_attn": 50.0, "val_ppl_linear": 60.0},
        {"kind": "final", "step": 4, "val_ppl_attn": 70.0, "val_ppl_linear": 75.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rng = random.Random(3)
    for name in ("ppl-test", "ppl-best-test"):
        results = [{"schedule": m, "perplexity": rng.uniform(50, 90), "bits_per_byte": 2.0} for m in ("attn", "linear")]
        (run / "eval" / f"{name}.json").write_text(json.dumps({"results": results}))
    modes, _ = lm_gpu_tables.read_run(run)
    best_test = json.loads((run / "eval" / "ppl-best-test.json").read_text())["results"]
    assert modes["attn"]["best step"] == 3 and modes["linear"]["best val ppl"] == 60.0
    assert modes["attn"]["best test ppl"] == best_test[0]["perplexity"]
    assert modes["attn"]["val ppl"] == 70.0


def test_an_lr_point_pairs_with_its_own_tag_and_stays_out_of_the_seed_table(tmp_path):
    rng = random.Random(5)
    oryx = _run(tmp_path, "oryx-tg-lr2x-s0", ["attn", "linear"], rng)
    gdn = _run(tmp_path, "gdn-lr2x-s0", ["linear"], rng)
    _run(tmp_path, "gdn-s0", ["linear"], rng)
    text = lm_gpu_tables.tables(tmp_path)
    want = [oryx["attn"][s] / gdn["linear"][s] for s in ("val", "test", "ood")]
    assert "| oryx-tg-lr2x-s0 attn / gdn-lr2x-s0 | " + " | ".join(f"{r:.3f}" for r in want) + " |" in text
    seeds = text.split("| family | mode | seeds |")[1]
    assert "| gdn | linear | 1 |" in seeds and "oryx-tg" not in seeds and "lr2x" not in seeds


def _lr_point(root: Path, name: str, modes: list[str], rng: random.Random) -> dict:
    """An LR point as `TAG=lr<LR>-s0 EVALS=ppl lm_gpu.sh` leaves it: validation lowest at step 4 (below the final
    step's), test and out-of-domain perplexity at that checkpoint; returns mode -> split -> value."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    values = {m: {"best val": rng.uniform(50, 100), "test": rng.uniform(50, 500), "ood": rng.uniform(50, 500)}
              for m in modes}  # fmt: skip
    best = {"kind": "eval", "step": 4, **{f"val_ppl_{m}": values[m]["best val"] for m in modes}}
    final = {"kind": "final", "step": 9, **{f"val_ppl_{m}": rng.uniform(200, 500) for m in modes}}
    records = [{"kind": "train", "step": 1}, best, final]
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    for stem, split in (("ppl-test", "test"), ("ppl-best-test", "test"), ("ppl-best-ood", "ood")):
        results = [{"schedule": m, "perplexity": values[m][split], "bits_per_byte": 2.5} for m in modes]
        (run / "eval" / f"{stem}.json").write_text(json.dumps({"results": results}))
    return values


def test_lr_sweep_chooses_on_validation_and_compares_at_the_best_checkpoints(tmp_path):
    rng = random.Random(3)
    lrs = ("0.003", "0.006", "0.012")
    families = {"oryx-tg": ["attn", "linear"], "transformer": ["attn"], "gdn": ["linear"]}
    points = {(f, lr): _lr_point(tmp_path, f"{f}-lr{lr}-s0", modes, rng) for f, modes in families.items() for lr in lrs}
    diverged = tmp_path / "gdn-lr0.024-s0"  # a run that stopped at step 7 without its final record
    diverged.mkdir()
    (diverged / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(8)))
    text = lm_gpu_tables.tables(tmp_path).split("LR sweep, seed 0")[1]

    def best_lr(family: str) -> str:  # by the mean over the family's modes of each point's lowest validation
        return min(lrs, key=lambda lr: sum(v["best val"] for v in points[family, lr].values()))

    line = next(row for row in text.splitlines() if row.startswith("| transformer | attn |"))
    assert line.endswith(f"| {float(best_lr('transformer')):g} |")
    assert f"{points['transformer', '0.003']['attn']['best val']:.2f} (4) (paper)" in line
    assert "failed at step 7" in next(row for row in text.splitlines() if row.startswith("| gdn | linear |"))
    ours, theirs = (
        points["oryx-tg", best_lr("oryx-tg")]["linear"],
        points["transformer", best_lr("transformer")]["attn"],
    )
    want = " | ".join(f"{ours[k] / theirs[k]:.3f}" for k in ("best val", "test", "ood"))
    lrs_cell = f"each its best: {float(best_lr('oryx-tg')):g} / {float(best_lr('transformer')):g}"
    assert f"| oryx-tg linear / transformer | {lrs_cell} | {want} |" in text
    paper = points["oryx-tg", "0.006"]["attn"]["test"] / points["gdn", "0.003"]["linear"]["test"]
    row = next(row for row in text.splitlines() if row.startswith("| oryx-tg attn / gdn | paper: 0.006 / 0.003 |"))
    assert row.split(" | ")[3] == f"{paper:.3f}"  # the test column
