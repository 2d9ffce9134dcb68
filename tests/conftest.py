"""Shared test helpers: the numerics policy of docs/design.md §12."""

import os

import pytest
import torch
from helpers import make_corpus


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||actual - expected|| / ||expected||, computed in float64; NaN never passes."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), "result contains NaN or inf"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded-from-entropy generator per test; its seed is printed on failure."""
    seed = torch.seed() % (2**31)
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small train/validation text pair and a private token cache (byte tokenizer: nothing to train)."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors/models: more only add barrier overhead, badly so on a busy
    2-core machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ORYX_TEST_LOG set, every failure's message is appended to that file as it happens: on the device machine a
    run cut short by its time limit loses pytest's final summary (a third-session GPU failure left no reason)."""
    path = os.environ.get("ORYX_TEST_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"{report.nodeid} FAILED ({report.when}):\n{report.longreprtext[-4000:]}\n")
