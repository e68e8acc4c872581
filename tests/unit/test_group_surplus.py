"""A group never keeps more serving workers than its size (plus a reload's step): which ones go."""

from __future__ import annotations

from types import SimpleNamespace

from mlpool._processes.groups import Generation, WorkerGroup, group_surplus
from mlpool._processes.workers import WorkerState


def worker(index: int, generation: int, state: WorkerState = WorkerState.IDLE, jobs: int = 0) -> SimpleNamespace:
    return SimpleNamespace(group="", index=index, generation=generation, state=state, inflight=[None] * jobs)


def group(size: int, current: int) -> WorkerGroup:
    made = WorkerGroup("", ("m",), size, Generation(1, None, {}, {"m": 1}))  # type: ignore[arg-type]
    made.current = Generation(current, None, {}, {"m": current})  # type: ignore[arg-type]
    return made


def test_the_surplus_is_the_old_versions_idle_workers_least_busy_first():
    workers = [worker(0, 2), worker(1, 1, jobs=1), worker(1, 2), worker(2, 1)]
    assert [(w.index, w.generation) for w in group_surplus(group(3, 2), workers, 0)] == [(2, 1)]
    assert group_surplus(group(3, 2), workers, 1) == []  # a reload's step may hold one more


def test_workers_on_their_way_out_or_loading_are_never_the_surplus():
    workers = [worker(0, 1, WorkerState.RETIRING), worker(0, 2), worker(1, 2, WorkerState.STARTING), worker(1, 1)]
    assert group_surplus(group(3, 2), workers, 0) == []  # the retiring one is not counted
    workers.append(worker(2, 2))
    assert [(w.index, w.generation) for w in group_surplus(group(3, 2), workers, 0)] == [(1, 1)]
