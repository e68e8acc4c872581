"""A newcomer's mistakes explain themselves (#15): each test shows the message."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from helpers.workloads import load_constant, wait_for_release

from mlpool import JobTimeoutError, MLPool, SerializationError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def load_one() -> int:
    return 1


def load_from(path: str) -> str:
    return path


def add(model: int, x: int) -> int:
    return model + x


def open_text(model: int, path: str):
    return open(path)  # the point: an open file as a result


def open_binary(model: int, path: str, mode: str):
    return open(path, mode)


def numbers(model: int):
    return (i for i in range(3))


class NoArguments:
    def __init__(self) -> None:
        self.ready = True


@pytest.fixture(scope="module")
def pool():
    with MLPool({"m": load_one}, nb_workers=1, start_timeout=60) as pool:
        yield pool


def run_python(args: list[str], cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


# ---------------------------------------------------------------- main guard

def test_a_pool_created_outside_the_main_guard_fails_at_once_with_one_message(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from mlpool import MLPool
        def load(): return 1
        def score(model, x): return model + x
        pool = MLPool({"m": load}, nb_workers=2)
        print(pool.score("m", score, 1))
    """))
    done, elapsed = run_python([str(script)], tmp_path)
    assert done.returncode == 1
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert done.stderr.count("Traceback") == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: MLPool was created at the top level of"), last
    assert 'if __name__ == "__main__":' in last and "line 5" in last


def test_a_script_that_creates_its_pool_under_the_guard_or_in_a_function_from_it_runs(tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""
        from mlpool import MLPool
        def load(): return 1
        def score(model, x): return model + x
        def main():
            with MLPool({"m": load}, nb_workers=1) as pool:
                print(pool.score("m", score, 1))
        if __name__ == "__main__":
            with MLPool({"m": load}, nb_workers=1) as pool:
                print(pool.score("m", score, 2))
            main()
    """))
    done, _ = run_python([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "2"]


# ----------------------------------------------------------- __main__ by value

def test_loaders_functions_and_class_instances_of_python_c_travel_by_value(tmp_path):
    code = textwrap.dedent("""
        from mlpool import MLPool
        class Box:
            def __init__(self, value): self.value = value
        def load(): return Box(10)
        def score(model, box): return Box(model.value + box.value)
        with MLPool({"m": load}, nb_workers=1) as pool:
            result = pool.score("m", score, Box(5))
            print(type(result) is Box, result.value)
    """)
    done, _ = run_python(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "15"]


# ------------------------------------------------------------ swapped arguments

def test_swapped_function_and_model_show_both_calls_the_right_way_round(pool):
    with pytest.raises(TypeError) as score_error:
        pool.score(add, "m", 1)
    message = str(score_error.value)
    assert "swapped" in message
    assert "create_job(add, 'm', args=(...))" in message and "score('m', add, ...)" in message
    with pytest.raises(TypeError, match="swapped"):
        pool.create_job("m", add, args=(1,))
    with pytest.raises(TypeError, match="swapped"):
        pool.submit(add, "m", 1)
    with pytest.raises(TypeError, match="swapped"):
        asyncio.run(pool.score_async(add, "m", 1))
    assert pool.score("m", add, 1) == 2  # nothing else broke


def test_a_scoring_function_that_is_not_callable_says_so(pool):
    with pytest.raises(TypeError, match="the scoring function must be callable, got int"):
        pool.score("m", 3)


# ---------------------------------------------------------------- loaders

def test_a_loader_with_required_arguments_is_refused_at_construction_naming_partial():
    start = time.monotonic()
    with pytest.raises(TypeError) as error:
        MLPool({"iris": load_from}, nb_workers=1)
    assert time.monotonic() - start < 1  # before any process starts
    message = str(error.value)
    assert "loader of model 'iris' requires argument(s) path" in message
    assert "functools.partial(load_from, ...)" in message


def test_loaders_callable_without_arguments_are_accepted():
    loaders = {"partial": functools.partial(load_from, "x.json"), "class": NoArguments, "builtin": dict}
    with MLPool(loaders, nb_workers=0) as pool:
        assert pool.score("partial", add, "!") == "x.json!"
        assert pool.score("class", lambda model: model.ready) is True


# ---------------------------------------------- sync calls in a running loop

def test_a_sync_score_inside_a_coroutine_warns_once_per_call_site_naming_score_async(pool):
    async def handler():
        for _ in range(3):
            assert pool.score("m", add, 1) == 2  # one call site, three calls
        return pool.score("m", add, 2)  # another call site

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        asyncio.run(handler())
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 2, [str(w.message) for w in ours]
    assert all(w.filename == __file__ for w in ours)  # points at the caller's line
    assert "use `await pool.score_async(...)`" in str(ours[0].message)


def test_a_sync_get_result_that_waits_inside_a_coroutine_names_get_result_async(pool, tmp_path):
    job_id = pool.create_job(add, "m", args=(1,))

    async def handler():
        return pool.get_result(job_id)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The job may finish before get_result looks: then nothing blocks, and nothing is said.
        assert asyncio.run(handler()) == 2
    for w in caught:
        assert "get_result_async" in str(w.message)


def test_sync_calls_outside_a_running_loop_do_not_warn(pool):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pool.score("m", add, 1) == 2
        assert pool.get_result(pool.create_job(add, "m", args=(1,))) == 2
        assert pool.submit("m", add, 1).result(timeout=30) == 2


# ---------------------------------------- results that cannot cross faithfully

@pytest.mark.parametrize("mode", ["rb", "r+b", "wb", "ab"])
def test_an_open_binary_file_as_a_result_is_an_error_naming_the_file(pool, tmp_path, mode):
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    with pytest.raises(SerializationError, match=r"an open file \(.*data\.bin.*\) cannot cross"):
        pool.score("m", open_binary, str(path), mode)


def test_an_open_text_file_as_a_result_is_an_error_not_a_stringio(pool, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(SerializationError, match=r"an open file \(.*notes\.txt.*, mode 'r'\) cannot cross"):
        pool.score("m", open_text, str(path))


def test_a_generator_as_a_result_is_an_error_saying_return_a_list(pool):
    with pytest.raises(SerializationError, match="a generator cannot cross .* return a list"):
        pool.score("m", numbers)
    assert pool.score("m", add, 1) == 2  # the worker served on


def test_an_open_file_as_an_argument_fails_in_the_caller(pool, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with open(path) as file, pytest.raises(SerializationError, match="an open file"):
        pool.score("m", add, file)


def test_a_sync_create_job_that_waits_for_room_inside_a_coroutine_names_create_job_async(fifo):
    with MLPool({"m": load_constant}, nb_workers=1, max_queue_size=1, start_timeout=60) as pool:
        running, queued = fifo(), fifo()
        first = pool.create_job(wait_for_release, "m", args=(str(running),))
        running.wait_running()
        second = pool.create_job(wait_for_release, "m", args=(str(queued),))  # the queue is full now

        async def handler():
            return pool.create_job(wait_for_release, "m", args=(str(queued),), timeout=0.5)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            with pytest.raises(JobTimeoutError, match="waiting for room"):
                asyncio.run(handler())
        assert [str(w.message) for w in caught if w.filename == __file__] == [
            "pool.create_job() blocks the event loop running in this thread (every other request of it waits); "
            "in a coroutine, use `await pool.create_job_async(...)`"
        ]
        running.release_opened()
        queued.release(timeout=30)
        assert pool.get_result(first, timeout=30) == pool.get_result(second, timeout=30)
