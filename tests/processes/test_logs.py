"""One structured log line per worker start, death, replacement and pool state change (#18)."""

from __future__ import annotations

import logging

import pytest
from helpers import workloads
from helpers.log_events import captured
from helpers.pools import make_pool

from mlpool import WorkerCrashedError

pytestmark = pytest.mark.usefixtures("worker_mode")


@pytest.fixture
def events():
    with captured() as handler:
        yield handler


def test_worker_life_and_pool_states_are_logged_with_fields(events, worker_mode):
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=2) as pool:
        ready = events.of("worker_ready")
        assert len(ready) == 2
        assert all(r.name == "mlpool" and r.worker_pid > 0 and r.seconds >= 0 for r in ready)
        with pytest.raises(WorkerCrashedError):
            pool.score("m", workloads.sigkill_self)
        (death,) = events.of("worker_exited")
        assert death.levelno == logging.WARNING
        assert "SIGKILL" in death.cause and death.function == "sigkill_self" and death.model == "m"
        assert isinstance(death.job_id, int) and "sigkill_self" in death.getMessage()
        replaced = events.wait_for("worker_replaced")
        assert replaced.worker_pid not in (r.worker_pid for r in ready) and replaced.seconds > 0
    states = [(r.state_from, r.state_to) for r in events.of("pool_state")]
    assert states == [("starting", "running"), ("running", "closing"), ("closing", "closed")]
    assert all(r.levelno == logging.INFO for r in events.of("worker_exited")[1:])  # stopped by the pool


def test_nothing_is_logged_per_job_at_info(events, worker_mode):
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=1) as pool:
        before = len(events.records)
        for i in range(50):
            assert pool.score("m", workloads.add, i) == 10 + i
        with pytest.raises(ValueError):
            pool.score("m", workloads.raise_value_error, "bad")
        assert events.records[before:] == []
