"""Shared test fixtures: paths to the real data, skip markers, seeds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
FIXTURE = SHARED_DATA / "fixture"

# One intra-op thread: tests use tiny models, where thread start-up dominates (7.7 s vs 0.25 s seen on a busy
# 2-core machine). Tests that need more set it themselves.
torch.set_num_threads(1)
# ... and one BLAS / OpenMP thread for numpy, scipy and scikit-learn: with -n (a worker per core) a second BLAS thread
# in every worker oversubscribed the cores. threadpool_limits acts on the libraries loaded when it is called:
# scikit-learn's import loads scipy's OpenBLAS and its own OpenMP runtime
import sklearn  # noqa: E402,F401

threadpool_limits(1)


def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n logical`` / ``-n auto``: the CPUs this process may run on (its affinity), not the host's
    count, which psutil reports inside a container limited to fewer CPUs."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:        # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep every test at one intra-op thread (a test that changes it is restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _hermetic_distributed_env(monkeypatch):
    """gloo on the loopback device for every test (not only after a test that happened to set it in the same
    xdist worker: a host name that does not resolve failed the others), and no MASTER_PORT left behind by a
    Lightning ddp_spawn test (a later test in the worker reused that unreserved port)."""
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.delenv("MASTER_PORT")    # recorded as unset: whatever a test sets is removed afterwards


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each) run first, the rest in their usual order: with ``-n`` (pytest-xdist,
    as .ci/run runs) a long test left to the end of the queue would run alone on one core while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)      # stable: keeps the order otherwise


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the project root)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skips the test with a clear message when absent."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """``../shared/data/fixture`` (4 MB of real records for fast tests)."""
    return _require(FIXTURE)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
