"""A job's state changes only through Job.to, along its table (#25)."""

from __future__ import annotations

import pytest

from mlpool._engine.jobs import Job, JobState
from mlpool._engine.regions import Payload

ALLOWED = {
    (JobState.NEW, JobState.QUEUED),
    (JobState.NEW, JobState.RUNNING),
    (JobState.NEW, JobState.FINISHED),
    (JobState.QUEUED, JobState.RUNNING),
    (JobState.QUEUED, JobState.FINISHED),
    (JobState.RUNNING, JobState.QUEUED),
    (JobState.RUNNING, JobState.FINISHED),
}


def _job(state: JobState) -> Job:
    job = Job(1, "m", 1, b"", Payload(b""), "fn", deadline=None, retries=0)
    job.state = state
    return job


@pytest.mark.parametrize("old", list(JobState))
@pytest.mark.parametrize("new", list(JobState))
def test_every_move_is_allowed_or_refused_by_the_table(old, new):
    job = _job(old)
    if (old, new) in ALLOWED:
        job.to(new)
        assert job.state is new
    else:
        with pytest.raises(RuntimeError, match=f"job 1 cannot go from {old.value} to {new.value}"):
            job.to(new)
        assert job.state is old


def test_a_finished_job_stays_finished():
    job = _job(JobState.FINISHED)
    for new in JobState:
        with pytest.raises(RuntimeError, match="internal error"):
            job.to(new)
