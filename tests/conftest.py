"""Test-session settings: torch threads per xdist worker, longest tests first, a cache shared by the workers.

Threads. Under pytest-xdist each worker gets an equal share of the cores as torch threads: the default (every core
per worker) oversubscribes the machine, and multi-threaded CPU kernels split their reductions by thread count, so
batch-split invariance checks at the 1e-6 level (e.g. the SDXL UNet's convolutions) would depend on the load. The
count is restored after every test, so one test's ``torch.set_num_threads`` does not slow down the ones after it.

Order. ``make test`` runs ``pytest -n 2 --maxschedchunk 1``: each worker holds at most two tests ahead and takes the
next one in collection order when it frees up, so starting with the longest tests (largest first, greedy) lets the
two workers finish together instead of one of them ending the run alone on a 4-minute learning test. The cost of a
test is its last measured duration (``--durations`` data kept in the pytest cache by ``pytest_sessionfinish``),
at least the estimate in ``ESTIMATES`` (CPU seconds on one thread); only tests of 20 s or more move.

Shared cache. ``shared_cache.get(key, compute)`` computes a value once per test session, whichever xdist worker
asks first (a file lock in the directory the workers share), and hands the stored copy to every later caller, e.g.
the base model's accuracy that several learning tests compare their trained model against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (a fixture, a trainer) must not leave it set for the rest of its
    worker's session: more threads than cores per worker oversubscribes the machine for every later test."""
    yield
    if torch.get_num_threads() != _THREADS:
        torch.set_num_threads(_THREADS)

# CPU seconds of the longest tests on one thread (measured 2026-12-03 with `-p no:xdist` and OMP_NUM_THREADS=1; a
# test that builds a shared fixture pays for it), by node-id prefix: the order of a fresh checkout, before the cache
# has durations. Tests not listed count 0 until measured.
ESTIMATES = {
    "tests/test_shapes_alignment.py::": 180.0,
    "tests/test_online_methods.py::test_shapes_recipe_raises_verifier_accuracy": 60.0,
    "tests/test_multiprocess.py::test_fsdp_two_processes_match_one_and_resume_across": 59.0,
    "tests/test_grpo_guard.py::test_grpo_guard_raises_shapes_verifier_accuracy": 45.0,
    "tests/test_nft.py::test_nft_raises_shapes_verifier_accuracy": 40.0,
    "tests/test_trainer.py::test_exact_resume_is_bitwise": 27.0,
    "tests/test_online_methods.py::test_branch_grpo_two_processes_match_one": 25.0,
    "tests/test_shapes.py::test_pretrain_script_deterministic_and_resumes_exactly": 25.0,
    "tests/test_multiprocess.py::": 20.0,
    "tests/test_online_methods.py::test_method_raises_its_reward": 20.0,
}
_CACHE_KEY = "flowalign/durations"
LONG = 20.0  # seconds: only tests at least this long move (the rest keep their modules' fixtures together)
_durations: dict[str, float] = {}


def _cost(item: pytest.Item, measured: dict[str, float]) -> float:
    """The last measured seconds, at least the estimate (a run on a loaded machine or an interrupted one must not
    send a long test to the back)."""
    estimate = next((s for prefix, s in ESTIMATES.items() if item.nodeid.startswith(prefix)), 0.0)
    return max(measured.get(item.nodeid, 0.0), estimate)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long tests first, longest first; the rest after them in pytest's order.

    xdist (``--maxschedchunk 1``) deals each of its ``n`` workers two tests to start with (consecutive items), then
    one more whenever a worker finishes one: so the first ``2n`` long tests are arranged as the longest-first greedy
    split would place them (worker i: the i-th longest and the (2n-1-i)-th), and the rest follow longest first."""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    measured = cache.get(_CACHE_KEY, {}) if cache is not None else {}
    cost = {it.nodeid: _cost(it, measured) for it in items}
    long = sorted((it for it in items if cost[it.nodeid] >= LONG), key=lambda it: -cost[it.nodeid])
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if n > 1 and len(long) >= 2 * n:
        long[:2 * n] = [x for i in range(n) for x in (long[i], long[2 * n - 1 - i])]
    items[:] = long + [it for it in items if cost[it.nodeid] < LONG]


_failed: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Setup + call + teardown seconds per test (under xdist the controller receives every worker's reports);
    a test that did not pass is not timed (a failure or skip ends it early)."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if not report.passed:
        _failed.add(report.nodeid)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Merge this run's durations into the cache (the controller only: each worker ran a part)."""
    cache = getattr(session.config, "cache", None)  # None under -p no:cacheprovider
    if os.environ.get("PYTEST_XDIST_WORKER") or cache is None or not _durations:
        return
    new = {k: round(v, 2) for k, v in _durations.items() if k not in _failed}
    cache.set(_CACHE_KEY, {**cache.get(_CACHE_KEY, {}), **new})


class SharedCache:
    """Values computed once per session across xdist workers, stored with ``torch.save`` under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        """The value stored under ``key``; ``compute()`` runs only in the first caller of the session (the others
        wait on a file lock, then load its copy: tensors come back bit-identical)."""
        from filelock import FileLock

        path = self.root / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                return torch.load(path, weights_only=True)
            value = compute()
            tmp = path.with_suffix(".tmp")
            torch.save(value, tmp)
            tmp.replace(path)
        return value

    def directory(self, key: str, build: Callable[[Path], None]) -> Path:
        """A directory filled once per session by ``build(path)`` (e.g. a training run the tests compare against);
        later callers get the same path once it is complete."""
        from filelock import FileLock

        path = self.root / hashlib.sha256(key.encode()).hexdigest()[:24]
        with FileLock(str(path) + ".lock"):
            done = path / ".complete"
            if not done.is_file():
                path.mkdir(parents=True, exist_ok=True)
                build(path)
                done.touch()
        return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> SharedCache:
    """One ``SharedCache`` per test session: under xdist in the directory above the workers' temp dirs."""
    base = tmp_path_factory.getbasetemp()
    return SharedCache((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_cache")
