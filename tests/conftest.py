from __future__ import annotations

import logging
import os
import resource
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import pools

import mlpool


def worker_children() -> list[psutil.Process]:
    """Live descendants of this test process that are mlpool workers (or
    templates): not multiprocessing's resource tracker or fork server (each a
    singleton that lives as long as this process, by design), nor the processes of
    the Ray instance the ray_cluster fixture started, with everything under
    them (Ray starts its worker processes at any time; test_ray checks actors)."""
    out = []
    for child in psutil.Process().children():
        try:
            command = " ".join(child.cmdline())
            if "resource_tracker" in command or "multiprocessing.forkserver" in command or _is_ray(child, command):
                continue
            family = [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in family:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    out.append(process)
            except psutil.NoSuchProcess:
                pass
    return out


def _is_ray(process: psutil.Process, command: str) -> bool:
    return command.startswith("ray::") or "/ray/" in command or process.name() in ("raylet", "gcs_server")


@pytest.fixture
def no_leaked_workers():
    """Fails the test if it leaves a child process behind."""
    before = {p.pid for p in worker_children()}
    yield
    gone, alive = psutil.wait_procs([p for p in worker_children() if p.pid not in before], timeout=10)
    assert not alive, f"processes left behind: {alive}"


class Fifo:
    """A named pipe a job blocks on until the test releases it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)

    def __str__(self) -> str:
        return str(self.path)

    def release(self, timeout: float = 30.0) -> None:
        """Wait until a job holds the FIFO open (it is running), then let it go."""
        done = threading.Event()
        error: list[BaseException] = []

        def write() -> None:
            try:
                with open(self.path, "w") as f:  # blocks until the job opens it
                    f.write("go")
            except BaseException as exc:  # pragma: no cover - reported below
                error.append(exc)
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(timeout), f"no job opened {self.path} within {timeout}s"
        assert not error, error

    def wait_running(self, timeout: float = 30.0) -> Fifo:
        """Return once a job has opened the FIFO (without releasing it yet)."""
        fd_holder: list[int] = []
        done = threading.Event()

        def open_writer() -> None:
            fd_holder.append(os.open(self.path, os.O_WRONLY))
            done.set()

        threading.Thread(target=open_writer, daemon=True).start()
        assert done.wait(timeout), f"no job opened {self.path} within {timeout}s"
        self._fd = fd_holder[0]
        return self

    @property
    def pid(self) -> int:
        """The pid of the worker running the job (after wait_running)."""
        return int(Path(str(self.path) + ".pid").read_text())

    def release_opened(self) -> None:
        os.write(self._fd, b"go")
        os.close(self._fd)


@pytest.fixture
def fifo(tmp_path):
    counter = iter(range(1000))

    def make() -> Fifo:
        return Fifo(tmp_path / f"fifo-{next(counter)}")

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance with 2 CPUs for the whole session; its workers
    import the tests' modules (loaders and scoring functions live there)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
            [str(Path(mlpool.__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
        )}},
    )
    yield ray
    ray.shutdown()


def pytest_generate_tests(metafunc):
    """Parametrize ``worker_mode`` (module-scoped) with the module's
    ``WORKER_MODES``: spawned and forked workers unless it says otherwise."""
    if "worker_mode" in metafunc.fixturenames:
        modes = getattr(metafunc.module, "WORKER_MODES", ("spawned", "forked"))
        metafunc.parametrize("worker_mode", modes, indirect=True, scope="module")


@pytest.fixture(scope="module")
def worker_mode(request):
    """Runs a module's tests once per worker mode: spawned (the default),
    forked from a model template (``share_models=True``), and in modules whose
    WORKER_MODES say so, Ray actors. Tests build their pools with
    ``helpers.pools.make_pool``, in the mode set here; module-scoped pools
    must ask for this fixture, so they are built in each mode."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    previous = pools.set_mode(request.param)
    try:
        yield request.param
    finally:
        pools.set_mode(previous)


@contextmanager
def _descriptor_limit(limit: int):
    """No new descriptor can be opened in this process (every number under
    ``limit`` is taken), for the duration: a real EMFILE for what runs here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        while True:
            fillers.append(os.dup(0))  # fill the holes under the limit
    except OSError:
        pass
    try:
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def descriptor_limit():
    """``with descriptor_limit(n):`` no descriptor numbered ``n`` or more, nor a free one under it."""
    return _descriptor_limit


@pytest.fixture
def share_name(monkeypatch, tmp_path):
    """A fresh ``share_across_processes`` name, with a short grace and the
    loads counted in ``tmp_path`` (``helpers.shared_models``); its lock file
    goes at the end."""
    from helpers.shared_processes import GRACE, forget_lock, unique_name

    monkeypatch.setenv("MLPOOL_SHARE_GRACE", GRACE)
    monkeypatch.setenv("MLPOOL_TEST_LOADS", str(tmp_path))
    name = unique_name()
    yield name
    forget_lock(name)
