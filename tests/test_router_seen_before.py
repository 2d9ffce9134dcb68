"""`benchmarks/router_seen_before.py`: the seen-before bit against hand-worked rows and a set-free recount."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "router_seen_before.py"
spec = importlib.util.spec_from_file_location("router_seen_before", SCRIPT)
router_seen_before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(router_seen_before)


def test_seen_before_marks_every_later_occurrence_of_an_id():
    ids = torch.tensor([[3, 1, 3, 2, 1, 3], [5, 5, 5, 0, 1, 0]])
    want = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.float)
    assert torch.equal(router_seen_before.seen_before(ids), want)
    rows = torch.randint(0, 7, (3, 40), generator=torch.Generator().manual_seed(2))
    recount = torch.tensor([[float(bool((row[:t] == row[t]).any())) for t in range(40)] for row in rows])
    assert torch.equal(router_seen_before.seen_before(rows), recount)
