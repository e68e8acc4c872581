"""Every Python snippet of README.md and docs/ runs as written (#15).

Each snippet is saved under the name its first line gives (``# iris.py``),
all in one directory, so later snippets import earlier ones as a reader's
would; each runs as a script. ``print(...)  # 1`` states what it prints: the
test checks it. A snippet that serves on ``port=8000`` runs on a free
loopback port instead, and the ``curl`` lines of the shell block after it are
sent to it, their output checked against the ``# ...`` lines that follow (one per line of output).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PRINTS = re.compile(r"^\s*print\(.*\)\s+#\s*(.+)$", re.M)
RUN_TIMEOUT = 120.0


@dataclass(slots=True)
class Snippet:
    doc: str
    index: int
    name: str
    code: str
    curls: list[tuple[str, str]] = field(default_factory=list)  # (command, expected output)

    @property
    def serves(self) -> bool:
        return "port=8000" in self.code


def collect() -> list[Snippet]:
    snippets: list[Snippet] = []
    for doc in DOCS:
        last: Snippet | None = None
        for n, match in enumerate(FENCE.finditer(doc.read_text())):
            language, body = match.groups()
            if language == "python":
                first = body.splitlines()[0] if body.strip() else ""
                name = first[2:].strip() if re.fullmatch(r"# [\w]+\.py", first) else f"snippet_{doc.stem}_{n}.py"
                last = Snippet(doc.name, n, name, body)
                snippets.append(last)
            elif language == "sh" and last is not None and last.serves:
                lines = body.splitlines()
                for n, line in enumerate(lines):
                    if line.startswith("curl "):  # its output: the "# ..." lines after it (a stream: several)
                        shown = [after[1:].strip() for after in takewhile(lambda s: s.startswith("#"), lines[n + 1 :])]
                        last.curls.append((line, "\n".join(shown)))
                last = None
            else:
                last = None
    return snippets


SNIPPETS = collect()


def test_the_docs_have_snippets_with_unique_names():
    names = [s.name for s in SNIPPETS]
    assert len(names) >= 5 and len(set(names)) == len(names), names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Every snippet saved under its name, as a reader following the docs would have them."""
    path = tmp_path_factory.mktemp("snippets")
    for snippet in SNIPPETS:
        (path / snippet.name).write_text(snippet.code)
    return path


def environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def missing_module(code: str) -> str | None:
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        if importlib.util.find_spec(module) is None and not (ROOT / "src" / module).exists():
            local = [s for s in SNIPPETS if s.name == f"{module}.py"]
            if not local:
                return module
    return None


@pytest.fixture(scope="module")
def runs(workdir, request):
    """Every selected snippet started at once, two at a time (each is its own
    process tree, as a reader's would be: they share nothing but the files);
    each test waits for its own snippet's outcome."""
    selected = [item.callspec.params["snippet"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        yield {
            snippet.name: threads.submit(serve_and_query if snippet.serves else run_script, snippet, workdir)
            for snippet in selected
            if missing_module(snippet.code) is None
        }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: f"{s.doc}:{s.name}")
def test_snippet_runs_as_written(snippet, runs):
    module = missing_module(snippet.code)
    if module is not None:
        pytest.skip(f"{module} is not installed here (its extra)")
    runs[snippet.name].result()  # its assertion, if one failed


def run_script(snippet: Snippet, workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, snippet.name], cwd=workdir, env=environment(),
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = PRINTS.findall(snippet.code)
    assert done.stdout.splitlines() == expected, done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_query(snippet: Snippet, workdir: Path) -> None:
    assert snippet.curls, "a server snippet must be followed by the curl commands that query it"
    port = free_port()
    script = workdir / f"served_{snippet.name}"
    script.write_text(snippet.code.replace("port=8000", f"port={port}"))
    server = subprocess.Popen(
        [sys.executable, script.name], cwd=workdir, env=environment(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:  # the server says when it listens (uvicorn, aiohttp)
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "the server exited:\n" + "".join(log)
            log.append(line)
            if "running on" in line.lower():
                break
        for command, expected in snippet.curls:
            argv = [arg.replace("localhost:8000", f"127.0.0.1:{port}") for arg in shlex.split(command)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stderr)
            assert done.stdout.strip() == expected, (command, done.stdout, "".join(log))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
