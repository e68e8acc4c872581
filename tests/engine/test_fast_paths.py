"""The hot path's short ways give what the long ways give (#14).

Arguments of scalars only are pickled in one call, a scalar result is sent
and read back without the shared-memory machinery, a result of the pipe is
unpickled in place, and a future's callbacks skip its lock when it has none.
Each short way is taken for the common case only; these tests hold them to
the same answers and errors as the general path.
"""

from __future__ import annotations

import asyncio
import enum
import os
import threading

import pytest
from helpers.pools import make_pool
from helpers.workloads import add, echo, load_constant

from mlpool import SerializationError

pytestmark = pytest.mark.usefixtures("worker_mode")
WORKER_MODES = ("spawned", "forked")  # see conftest.worker_mode


class Colour(str, enum.Enum):  # a str subclass: not a plain scalar, takes the general path
    RED = "red"


def types_of(model: dict, *args, **kwargs) -> tuple:
    return tuple(type(a).__name__ for a in args), {k: type(v).__name__ for k, v in kwargs.items()}, args, kwargs


def _rebuilt_only_in(pid: int) -> str:
    if os.getpid() != pid:
        raise RuntimeError("this object cannot be rebuilt outside the worker that made it")
    return "rebuilt"


def _exit_when_rebuilt_outside(pid: int) -> str:
    if os.getpid() != pid:
        raise SystemExit(3)  # a BaseException from the other side must not end the caller
    return "rebuilt"


class RebuiltOnlyInTheWorker:
    def __init__(self, how) -> None:
        self.how = how

    def __reduce__(self) -> tuple:
        return self.how, (os.getpid(),)


def unpicklable_here(model: dict, how: str) -> RebuiltOnlyInTheWorker:
    return RebuiltOnlyInTheWorker(_rebuilt_only_in if how == "raise" else _exit_when_rebuilt_outside)


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1) as p:
        yield p


@pytest.mark.timeout(60)
def test_scalar_arguments_and_results_keep_their_types(pool):
    args = (1, 2.5, True, None, 3 + 4j, "__main__ is only text here", "a\udc80b")
    kwargs = {"flag": False, "name": "x", "big": 10**30}
    names, kwnames, got_args, got_kwargs = pool.score("m", types_of, *args, **kwargs)
    assert names == ("int", "float", "bool", "NoneType", "complex", "str", "str")
    assert kwnames == {"flag": "bool", "name": "str", "big": "int"}
    assert got_args == args and got_kwargs == kwargs
    for value in (True, 0, -1.5, None, 2j, "", "text", 10**40):
        result = pool.score("m", echo, value)
        assert result == value and type(result) is type(value)


@pytest.mark.timeout(60)
def test_a_str_subclass_and_containers_take_the_general_path(pool):
    names, _, got_args, _ = pool.score("m", types_of, Colour.RED, [1, "a"], (2,), {"k": b"v"})
    assert names == ("Colour", "list", "tuple", "dict")
    assert got_args == (Colour.RED, [1, "a"], (2,), {"k": b"v"})
    assert pool.score("m", echo, Colour.RED) is Colour.RED  # by reference, the same member


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_result_that_cannot_be_rebuilt_here_fails_its_job_only(pool, how):
    before = pool.stats()
    with pytest.raises(SerializationError, match=r"the result of job \d+ \(unpicklable_here\) cannot be unpickled"):
        pool.score("m", unpicklable_here, how)
    with pytest.raises(SerializationError, match="cannot be unpickled"):
        asyncio.run(pool.score_async("m", unpicklable_here, how))
    job_id = pool.create_job(unpicklable_here, "m", args=(how,))
    with pytest.raises(SerializationError, match="cannot be unpickled"):
        pool.get_result(job_id, timeout=30)
    assert pool.score("m", add, 1) == 11  # the same worker serves on
    after = pool.stats()
    assert after.jobs_failed - before.jobs_failed == 3
    assert after.jobs_completed - before.jobs_completed == 1


def shrink_frames_then_return(model: dict, limit: int, result: object) -> object:
    """Lower this worker's frame limit (a 4 GiB result costs too much memory to test with)."""
    from mlpool._wire import protocol as _protocol

    _protocol.MAX_FRAME = limit
    return result


@pytest.mark.timeout(60)
def test_a_result_too_large_for_a_message_is_a_clear_error_and_the_worker_serves_on(worker_mode):
    with make_pool({"m": load_constant}, nb_workers=1) as small:
        worker = small.score("m", os_pid)
        for result in ("x" * (2 << 20), ["y" * (2 << 20)]):  # the scalar short way and the general one
            with pytest.raises(SerializationError, match="cannot be sent: one message between processes holds"):
                small.score("m", shrink_frames_then_return, 1 << 20, result)
        assert small.score("m", os_pid) == worker  # no restart
        assert small.stats().jobs_failed == 2


def os_pid(model: dict) -> int:
    return os.getpid()


class CallbackLog:
    """Which callbacks ran, and an event once both did."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.both = threading.Event()

    def callback(self, where: str):
        def note(_future) -> None:
            self.calls.append(where)
            if len(self.calls) == 2:
                self.both.set()

        return note


@pytest.mark.timeout(120)
def test_each_callback_runs_once_whether_added_before_or_after_the_outcome(pool):
    for _ in range(200):
        future = pool.submit("m", add, 1)
        log = CallbackLog()
        future.add_done_callback(log.callback("early"))
        future.result(timeout=30)
        future.add_done_callback(log.callback("late"))  # done: runs now, in this thread
        assert "late" in log.calls
        assert log.both.wait(30)
        assert sorted(log.calls) == ["early", "late"]
