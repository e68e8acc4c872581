"""Real uvicorn servers on loopback for the serving tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent.parent
EXAMPLES = TESTS.parent / "examples"


def _python_path() -> list[str]:
    """This process's PYTHONPATH (the checkout's ``src`` under test), kept for the server."""
    return [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]


class UvicornServer:
    """``uvicorn module:app`` in its own process; ready when it says so on stderr
    (the constructor waits for that unless ``wait_ready=False``)."""

    def __init__(
        self, app: str, app_dir: Path, env: dict[str, str] | None = None, *, wait_ready: bool = True,
        args: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--app-dir", str(app_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "info", "--no-access-log", *args],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(app_dir), *_python_path()]),
                 **(env or {})},
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        self._logged = threading.Condition()
        self._ready = threading.Event()
        self._running = False
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready and not (self._ready.wait(180) and self._running):
            self.stop()
            raise RuntimeError("uvicorn did not start:\n" + "".join(self.log[-40:]))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._logged:
                self.log.append(line)
                self._logged.notify_all()
            if "Uvicorn running on" in line:  # after the lifespan started, once the socket listens
                self._running = True
                self._ready.set()
        self._ready.set()  # the server exited

    def log_mark(self) -> int:
        """A position in the log, for :meth:`wait_for_log` to look only after it."""
        with self._logged:
            return len(self.log)

    def wait_for_log(self, text: str | re.Pattern[str], timeout: float = 30.0, *, since: int = 0) -> str:
        """Return the first line (after line ``since``) containing ``text`` (or
        matching it, a regular expression), once the server wrote it."""
        found: list[str] = []

        def has(line: str) -> bool:
            return text in line if isinstance(text, str) else text.search(line) is not None

        def seen() -> bool:
            found[:] = [line for line in self.log[since:] if has(line)][:1]
            return bool(found)

        with self._logged:
            if not self._logged.wait_for(seen, timeout):
                raise AssertionError(f"the server never logged {text!r}")
        return found[0]

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> list[psutil.Process]:
        """Stop as a user would (Ctrl-C); the processes still alive after, if any."""
        tree = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            proc.kill()
        return alive
