"""What a newcomer stumbled on (#24, section 5): each test shows what they now see."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
from helpers.workloads import load_constant, load_raises, load_unless_flagged, pid, wait_for_release

from mlpool import MLPool, ModelLoadError, SerializationError

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Watch(logging.Handler):
    """Records the ``mlpool`` logger's records; ``seen`` is set by the first one containing ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.seen.set()

    def __enter__(self) -> Watch:
        logger = logging.getLogger("mlpool")
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logger = logging.getLogger("mlpool")
        logger.removeHandler(self)
        logger.setLevel(self._level)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


# ------------------------------------------- a shutdown that waits says so


def test_leaving_with_while_a_job_runs_warns_how_long_and_how_to_wait_less(fifo):
    running = fifo()
    with Watch("shutdown is waiting") as watch:
        with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
            future = pool.submit("m", wait_for_release, str(running))
            running.wait_running()

            def release_once_warned() -> None:
                watch.seen.wait(30)  # never set before the fix: the job is let go all the same
                running.release_opened()

            releaser = threading.Thread(target=release_once_warned)
            releaser.start()
        # __exit__ waited for the job, which the warning let go
        releaser.join(30)
        assert future.result(timeout=0) == running.pid
    warned = [r for r in watch.records if "shutdown is waiting" in r.getMessage()]
    assert len(warned) == 1, watch.messages()
    assert warned[0].levelno == logging.WARNING
    message = warned[0].getMessage()
    assert "up to 30s for 1 running job," in message
    assert "pool.shutdown(timeout=SECONDS)" in message and "cancel_job(job_id, interrupt=True)" in message


def test_a_shorter_timeout_asked_during_a_shutdown_ends_its_wait_sooner(fifo):
    running = fifo()
    with Watch("shutdown is waiting") as watch:
        pool = MLPool({"m": load_constant}, nb_workers=1, start_timeout=60)
        future = pool.submit("m", wait_for_release, str(running))
        running.wait_running()
        # A long wait in another thread, as __exit__ would; the warning's advice then shortens it.
        waiter = threading.Thread(target=functools.partial(pool.shutdown, timeout=3600), daemon=True)
        waiter.start()
        try:
            assert watch.seen.wait(30), watch.messages()
            pool.shutdown(timeout=0)
            waiter.join(60)
            assert not waiter.is_alive(), "a shorter timeout did not end the wait"
        finally:
            with contextlib.suppress(OSError):  # its reader is gone if the worker was killed
                running.release_opened()
    with pytest.raises(Exception, match="shut down before job"):
        future.result(timeout=0)
    assert [m for m in watch.messages() if "shutdown is waiting" in m][0].startswith(
        "shutdown is waiting up to 3600s for 1 running job,"
    )


def test_a_shutdown_with_nothing_running_says_nothing():
    with Watch("shutdown is waiting") as watch:
        with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
            assert pool.score("m", pid) > 0
    assert not watch.seen.is_set(), watch.messages()


# ------------------------------------------ `with MLPool` inside a coroutine


def test_a_sync_with_inside_a_coroutine_warns_naming_async_with():
    async def handler() -> int:
        with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:  # the call site warned
            return await pool.score_async("m", pid)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert asyncio.run(handler()) > 0
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and w.filename == __file__]
    assert [str(w.message) for w in ours] == [
        "`with MLPool(...)` blocks the event loop running in this thread (every other request of it waits); "
        "in a coroutine, use `async with MLPool(...)`"
    ]


def test_async_with_and_a_sync_with_outside_a_loop_do_not_warn():
    async def handler() -> int:
        async with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
            return await pool.score_async("m", pid)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert asyncio.run(handler()) > 0
        with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
            assert pool.score("m", pid) > 0


SHUTDOWN_BLOCKS = (
    "pool.shutdown() blocks the event loop running in this thread (every other request of it waits); "
    "in a coroutine, use `await pool.shutdown_async(...)`"
)


def test_a_sync_shutdown_inside_a_coroutine_warns_at_its_line_naming_shutdown_async():
    pool = MLPool({"m": load_constant}, nb_workers=1, start_timeout=60)
    worker = pool.score("m", pid)
    lines: list[int] = []

    async def handler() -> None:
        lines.append(sys._getframe().f_lineno + 1)
        pool.shutdown(timeout=10)  # blocks this loop until the worker is reaped
        pool.shutdown(timeout=10)  # the pool has finished: nothing to wait for, nothing said

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a second warning of the same line would show too
        asyncio.run(handler())
    said = [(str(w.message), w.filename, w.lineno) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert said == [(SHUTDOWN_BLOCKS, __file__, lines[0])]
    with pytest.raises(ProcessLookupError):  # it did wait: the worker is reaped
        os.kill(worker, 0)


def test_a_shutdown_that_does_not_wait_or_runs_outside_a_loop_does_not_warn():
    pool = MLPool({"m": load_constant}, nb_workers=1, start_timeout=60)
    other = MLPool({"m": load_constant}, nb_workers=1, start_timeout=60)

    async def handler() -> None:
        pool.shutdown(wait=False, timeout=10)  # returns at once: the loop is not blocked
        await pool.shutdown_async(timeout=10)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        asyncio.run(handler())
        assert other.score("m", pid) > 0
        other.shutdown(timeout=10)  # no loop runs in this thread
    assert not pool.healthy and not other.healthy


# ---------------------------- functions of the main script: their file and line


SCRIPT = """\
import sys
import traceback
from mlpool import MLPool


def load():
    return 0


def predict(model, x):
    return model / x  # predict: the failing line


def hang(model, fifo):
    with open(fifo) as f:  # hang: waiting here
        return f.read()


if __name__ == "__main__":
    import os
    fifo = sys.argv[1]
    os.mkfifo(fifo)
    with MLPool({"m": load}, nb_workers=1, start_timeout=60) as pool:
        try:
            pool.score("m", predict, 0)
        except ZeroDivisionError as exc:
            print("".join(traceback.format_exception(exc.__cause__)))
        future = pool.submit("m", hang, fifo)
        with open(fifo, "w") as f:  # returns once the job has opened it
            print("STACKS", *pool.worker_stacks(timeout=30).values())
            f.write("done")
        print("RESULT", future.result(timeout=30))
"""


def test_a_main_script_functions_traceback_and_stack_name_the_script_and_show_its_line(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fifo")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "<dynamic-code>" not in done.stdout
    # the worker's traceback: the script's path, the line, and its source (read by the worker)
    assert f'File "{script}", line 11, in predict\n    return model / x  # predict: the failing line' in done.stdout
    # a stack taken while the job runs
    stacks = done.stdout.split("STACKS", 1)[1]
    assert f'File "{script}", line 1' in stacks and " in hang" in stacks, stacks
    assert "RESULT done" in done.stdout


# ------------------------------------------------ a loader that raises, logged once


def test_a_loader_that_raises_at_start_is_logged_once_as_a_failed_load(capfd):
    with Watch("failed to load") as watch, pytest.raises(ModelLoadError) as info:
        MLPool({"m": load_raises}, nb_workers=1, start_timeout=60)
    assert "load_raises" in info.value.remote_traceback  # the traceback is raised, as before
    assert "weights file is corrupt" in str(info.value) and "Worker traceback" in str(info.value)
    logged = watch.messages()
    assert not [m for m in logged if "exited with code" in m], logged
    said = [m for m in logged if "weights file is corrupt" in m]
    assert len(said) == 1, logged
    assert "failed to load model 'm': RuntimeError: weights file is corrupt" in said[0]
    assert "Traceback" not in "\n".join(logged)
    out, err = capfd.readouterr()
    assert "weights file is corrupt" not in out + err  # nobody printed it besides


def test_a_replacement_whose_loader_raises_is_logged_as_a_failed_load_not_an_exit(tmp_path):
    flag = tmp_path / "storage-gone"
    loader = functools.partial(load_unless_flagged, str(flag))
    with Watch("model storage is gone") as watch:
        with MLPool({"m": loader}, nb_workers=1, start_timeout=60) as pool:
            worker = pool.score("m", pid)
            flag.touch()
            os.kill(worker, signal.SIGKILL)
            assert watch.seen.wait(60), watch.messages()
            pool.shutdown(timeout=0)
    failed = [m for m in watch.messages() if "model storage is gone" in m]
    assert failed and all("failed to load model 'm': RuntimeError: model storage is gone" in m for m in failed)
    assert not [m for m in watch.messages() if "exited with code 0" in m], watch.messages()


def test_the_worker_prints_no_traceback_of_its_own(tmp_path):
    code = textwrap.dedent("""
        from mlpool import MLPool
        def load(): raise ValueError("no weights here")
        if __name__ == "__main__":
            try:
                MLPool({"m": load}, nb_workers=1, start_timeout=60)
            except Exception as exc:
                print(type(exc).__name__)
    """)
    script = tmp_path / "load_fails.py"
    script.write_text(code)
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.split() == ["ModelLoadError"], done.stderr
    # Python's last-resort handler prints mlpool's warnings and errors: the error once, no traceback
    assert done.stderr.count("no weights here") == 1, done.stderr
    assert "Traceback" not in done.stderr and "exited with code" not in done.stderr, done.stderr


# ------------------------------------------------- generators point at pool.stream


def count_to(model: dict, n: int):
    yield from range(n)


def test_a_generator_returned_to_score_submit_or_get_result_points_at_pool_stream():
    with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
        with pytest.raises(SerializationError, match=r"pool\.stream\(\.\.\.\) or pool\.stream_async\(\.\.\.\)"):
            pool.score("m", count_to, 3)
        with pytest.raises(SerializationError, match=r"yields its results runs with pool\.stream"):
            pool.submit("m", count_to, 3).result(timeout=30)
        with pytest.raises(SerializationError, match=r"pool\.stream\(\.\.\.\)"):
            pool.get_result(pool.create_job(count_to, "m", args=(3,)), timeout=30)
        assert list(pool.stream("m", count_to, 3)) == [0, 1, 2]  # what the message points at works


def test_swapped_arguments_of_stream_list_stream_among_the_model_first_methods():
    with MLPool({"m": load_constant}, nb_workers=1, start_timeout=60) as pool:
        with pytest.raises(TypeError, match="swapped") as info:
            pool.stream(count_to, "m", 3)
        assert "score, submit, stream and their async twins take the model name first" in str(info.value)

        async def read_swapped() -> list:
            return [item async for item in pool.stream_async(count_to, "m", 3)]

        with pytest.raises(TypeError, match="stream and their async twins"):
            asyncio.run(read_swapped())


# -------------------------------------- FastAPI: a 4xx names the model, and is logged


@pytest.fixture
def errors_server():
    from helpers.server import TESTS, UvicornServer

    server = UvicornServer("helpers.errors_app:app", TESTS)
    try:
        yield server
    finally:
        assert not server.stop()


def test_an_unknown_model_is_a_404_naming_it_and_plain_uvicorn_logs_why(errors_server):
    import httpx

    with httpx.Client(base_url=errors_server.url, timeout=30) as client:
        answer = client.post("/model/iris-v2")
        assert answer.status_code == 404
        assert answer.json() == {"error": "UnknownModelError", "detail": "no such model: 'iris-v2'"}
        # the log has the whole message (the models served), which the client is not shown
        line = errors_server.wait_for_log("404 on /model/iris-v2")
        assert "UnknownModelError: unknown model 'iris-v2'; this pool serves 'm'" in line
        long = client.post("/model/" + "x" * 500).json()["detail"]
        assert long.startswith("no such model: 'xxx") and long.endswith("...") and len(long) < 100
        assert client.post("/model/m").json() == {"result": 11}


def test_a_500_is_logged_at_error_with_its_traceback_and_answered_without_it(errors_server):
    import httpx

    with httpx.Client(base_url=errors_server.url, timeout=30) as client:
        mark = errors_server.log_mark()
        answer = client.post("/generator")
        assert answer.status_code == 500
        assert answer.json()["error"] == "SerializationError"
        assert "Traceback" not in answer.text and "count_to" not in answer.text
        errors_server.wait_for_log("500 on /generator: SerializationError", since=mark)
        errors_server.wait_for_log("Traceback (most recent call last)", since=mark)


# ----------------------------------- the demo's progress in a log file: whole lines


class AnswerEverything:
    """A keep-alive HTTP/1.1 server on loopback answering 200 ``{}`` to every request, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def test_the_demos_load_generator_writes_whole_lines_when_its_stderr_is_not_a_terminal():
    pytest.importorskip("PIL")
    server = AnswerEverything()
    try:  # stderr as bytes: text mode would turn each carriage return into a newline
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve().parents[2] / "examples" / "loadtest.py"),
             "--port", str(server.port), "--seconds", "1", "--rate", "20", "--clients", "2", "--image-clients", "0",
             "--label", "logged"],
            capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert b"\r" not in done.stderr
    lines = done.stderr.decode().splitlines()
    assert lines and all(line.startswith("  [logged] ") for line in lines), lines
    assert lines[-1].startswith("  [logged]  1.0/1 s")
