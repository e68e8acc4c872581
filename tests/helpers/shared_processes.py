"""API processes for the shared-pool tests: started, commanded, killed and waited for."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"
GRACE = "0.5"  # seconds a test's pool host outlives its last API process


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    env["MLPOOL_SHARE_GRACE"] = GRACE
    env.update(extra)
    return env


class ApiProcess:
    """``python -m helpers.shared_api`` attached to the pool ``name``."""

    def __init__(self, name: str, nb_workers: int = 2, max_queue_size: int | None = None, **env: str) -> None:
        args = [sys.executable, "-m", "helpers.shared_api", name, str(nb_workers)]
        if max_queue_size is not None:
            args.append(str(max_queue_size))
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=TESTS, env=environment(**env), text=True
        )
        self.pid = self.process.pid

    def ask(self, op: str, timeout: float = 60.0, **arguments: Any) -> Any:
        """Send a command; its answer (an AssertionError if none within ``timeout``)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout), f"API process {self.pid} did not answer {op} within {timeout}s"
        line = self.process.stdout.readline()
        assert line, f"API process {self.pid} exited (code {self.process.poll()}) instead of answering {op}"
        return json.loads(line)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(30)
        self.close_pipes()

    def leave(self) -> None:
        assert self.ask("exit") == "bye"
        assert self.process.wait(30) == 0
        self.close_pipes()

    def close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


def host_and_workers(host_pid: int) -> list[psutil.Process]:
    """The pool host and every process under it (its workers, multiprocessing's resource tracker)."""
    host = psutil.Process(host_pid)
    return [host, *host.children(recursive=True)]


def workers_of(host_pid: int) -> set[int]:
    """The pids of the host's worker processes."""
    return {
        child.pid for child in psutil.Process(host_pid).children()
        if "resource_tracker" not in " ".join(child.cmdline())
    }  # fmt: skip


def wait_gone(processes: list[psutil.Process], timeout: float = 30.0) -> None:
    """Every process in ``processes`` has ended (an AssertionError naming those alive)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still alive after {timeout}s: {alive}"


def forget_lock(name: str) -> None:
    """Remove the lock file of a test's pool once its host is gone (mlpool keeps
    them: a lock file removed under a waiting process would let two in)."""
    from mlpool._shared.rendezvous import address

    with contextlib.suppress(FileNotFoundError):
        os.unlink(address(name, []).lock_path)


def wait_attached(pool: Any, count: int, timeout: float = 30.0) -> None:
    """Return once ``pool``'s host counts ``count`` API processes (it tells each
    process when one comes or goes, after it dropped what the leaving one left).
    Each check is a round trip to the host, so its news came first."""
    deadline = time.monotonic() + timeout
    while (seen := pool.stats().process.processes) != count:
        assert time.monotonic() < deadline, f"the host counts {seen} API processes after {timeout}s, not {count}"
