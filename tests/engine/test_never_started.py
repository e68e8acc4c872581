"""A job its worker never took is run again, whatever max_retries says."""

from __future__ import annotations

import os
import signal

import pytest
from helpers.pools import make_pool
from helpers.workloads import add, load_constant, pid


@pytest.mark.timeout(60)
def test_a_job_sent_to_a_worker_that_dies_before_taking_it_is_served_by_the_replacement(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1, max_retries=0) as pool:
        victim = pool.score("m", pid)
        os.kill(victim, signal.SIGSTOP)  # it cannot read the job we send now
        try:
            future = pool.submit("m", add, 1)
            # Its job is in the worker's pipe, not begun: SIGKILL now.
            os.kill(victim, signal.SIGKILL)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert future.result(timeout=30) == 11
        assert pool.score("m", pid) != victim
        stats = pool.stats()
        assert stats.jobs_crashed == 0 and stats.jobs_retried == 0
