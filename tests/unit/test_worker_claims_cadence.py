"""How often a busy worker runs the claims step after posting."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from carebridge.claims.step import ClaimsResult
from carebridge.config import load_configuration
from carebridge.engine import worker as worker_module
from carebridge.engine.worker import Worker, WorkerOptions
from carebridge.store.db import open_engine, sqlite_url

DEMO_CONFIG = Path(worker_module.__file__).resolve().parents[1] / "demo" / "config"


class ClaimsRuns:
    """A clock for the worker module and the times the claims step ran."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.times: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def run_claims(self, engine, config, **_options) -> ClaimsResult:
        self.times.append(self.now)
        return ClaimsResult()


@pytest.fixture()
def runs(monkeypatch: pytest.MonkeyPatch) -> ClaimsRuns:
    """Replace the worker module's clock and claims step with recording ones."""
    recorder = ClaimsRuns()
    monkeypatch.setattr(worker_module, "run_claims", recorder.run_claims)
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(monotonic=recorder.monotonic))
    return recorder


def make_worker(tmp_path: Path) -> Worker:
    engine = open_engine(sqlite_url(tmp_path / "cadence.db"))
    config = load_configuration(DEMO_CONFIG)
    return Worker(engine, config, WorkerOptions(claims_after_posting_seconds=10.0,
                                                claims_every_seconds=60.0))


def test_postings_within_interval_run_claims_once(tmp_path: Path, runs) -> None:
    worker = make_worker(tmp_path)
    for second in range(0, 10, 2):
        runs.now = 1000.0 + second
        worker._claims(posted=True, final=False)
    assert runs.times == [1000.0]


def test_posting_after_interval_runs_claims(tmp_path: Path, runs) -> None:
    worker = make_worker(tmp_path)
    worker._claims(posted=True, final=False)
    runs.now = 1010.0
    worker._claims(posted=True, final=False)
    assert runs.times == [1000.0, 1010.0]


def test_final_run_and_recheck_ignore_interval(tmp_path: Path, runs) -> None:
    worker = make_worker(tmp_path)
    worker._claims(posted=True, final=False)
    runs.now = 1001.0
    worker._claims(posted=False, final=True)
    runs.now = 1005.0
    worker._claims(posted=False, final=False)  # nothing posted, recheck not due
    runs.now = 1061.0
    worker._claims(posted=False, final=False)  # held claims are checked again
    assert runs.times == [1000.0, 1001.0, 1061.0]


def test_worker_without_claims_never_runs_them(tmp_path: Path, runs) -> None:
    worker = make_worker(tmp_path)
    worker.options.claims = False
    worker._claims(posted=True, final=True)
    assert runs.times == []
