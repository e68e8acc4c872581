"""The code that runs *in* a worker process.

::

    start ─► ignore SIGINT/SIGTERM, watch the parent ─► Setup (started word, if sent)
          ─► cap threads ─► load every model ─► Ready ─┐
                          (a loader fails ─► LoadFailed, exit)
    ┌──────────────────────────────────────────────────┘
    └► read frames ─► Run: note the job in the started word,
         ▲            call fn(model, *args, **kwargs) ─► Done | Failed ─► memory check
         ▲                                         (over max_memory_per_worker: OverMemory)
         └──────────────────────────────────────────────────────────────────────┘
       Stop ─► Exiting, exit          end of file (parent gone) ─► exit
       RunStream ─► Item, Item, ... on credit ─► StreamEnd | Failed (see _stream_worker)

Jobs run one at a time, in the order they arrived, and each result is written
as soon as it exists: the parent relies on that order to know which job a
dead worker was running. A scoring function's exception, whatever it is (a
SystemExit, one that cannot be pickled or printed), goes back as a value; the
worker lives on. The pool alone decides when a worker ends (Stop, then
SIGKILL): a SIGINT or SIGTERM sent to the whole process group is ignored.

This module and what it imports (``_wire``, ``errors``, ``_worker.memory``,
``_worker.stream``, ``_worker.stacks``) are all a worker loads of mlpool:
never the API process's side.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from mlpool._wire.protocol import (
    NOWHERE,
    CloseStream,
    Credit,
    Exiting,
    LoadFailed,
    Ready,
    Run,
    RunBatch,
    RunStream,
    Setup,
    StackPipe,
    Stop,
    encode,
    encode_done,
    encode_failed,
)
from mlpool._wire.serialization import (
    FUNCTION_CACHE_SIZE,
    PROTOCOL,
    describe_exception,
    format_traceback,
    pack_exception,
)
from mlpool._wire.shm import SCALAR_TYPES, unpack, write_result
from mlpool._wire.started import LastStarted
from mlpool._wire.transport import DescriptorsLost, FrameReader, send_frames, write_all
from mlpool._worker.memory import MemoryWatch
from mlpool._worker.stacks import install as install_stack_dumps
from mlpool._worker.stream import run_stream
from mlpool.errors import MLPoolError, SerializationError, UnknownModelError

MAX_TRACEBACK = 32 * 1024  # characters of a loader's traceback sent back

# Read by OpenMP, OpenBLAS, MKL, Accelerate, NumExpr and BLIS when they load.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)


__all__ = ["MemoryWatch", "WorkerSettings", "load_models", "run_message", "serve", "stream_function", "worker_main"]


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to know besides its models."""

    parent_pid: int
    threads: int  # cap on BLAS/OpenMP/PyTorch threads
    memory_limit: int | None  # max_memory_per_worker, bytes
    nice: int  # added to the worker's niceness: the API process wins the CPU when it wants it
    shm_threshold: int | None  # results' buffers of this size or more go in shared memory
    shm_limit: int | None
    # Forked from a template (share_models): max_memory_per_worker counts the
    # worker's private pages only, not the models it shares.
    private_memory: bool = False
    # worker_env: set in the worker's environment before its loaders run.
    env: dict[str, str] | None = None


def worker_main(conn: Any, worker_id: int, loaders_pickle: bytes, settings: WorkerSettings) -> None:
    """Entry point of a worker process (runs in the child).

    ``conn`` is the child's end of the duplex pipe (kept referenced so its fd
    stays open); ``loaders_pickle``: see :func:`load_models`.
    """
    prepare_process(settings, settings.threads)
    fd = conn.fileno()
    sock = socket.socket(fileno=os.dup(fd))
    reader = FrameReader()
    early = read_waiting(sock, reader)  # the parent's Setup, written before we started
    started = time.perf_counter()
    models = load_models(loaders_pickle)
    if isinstance(models, LoadFailed):
        write_all(fd, encode(models))
        return
    cap_threads_after_loading(settings.threads)
    write_all(fd, encode(Ready(os.getpid(), time.perf_counter() - started)))
    serve(fd, models, settings, sock=sock, reader=reader, early=early)


def read_waiting(sock: socket.socket, reader: FrameReader) -> deque:
    """The messages already waiting in ``sock`` (without blocking): the
    parent's Setup, when it sent one."""
    try:
        reader.recv_from(sock)
    except BlockingIOError:
        pass
    return deque(reader.messages())


def prepare_process(settings: WorkerSettings, threads: int) -> None:
    """What a freshly spawned worker (or template) does before loading models;
    ``threads`` caps BLAS/OpenMP/PyTorch thread pools."""
    # Ctrl-C in a terminal, and SIGTERM from `timeout`, `kill -TERM -PGID` or
    # a process manager, reach the whole process group. The pool decides when
    # workers stop (Stop, then SIGKILL), so that the app can drain.
    # A dead parent still ends us: PDEATHSIG is SIGKILL, or a pidfd watch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(settings.parent_pid)
    if settings.env:
        os.environ.update(settings.env)
    if settings.nice and hasattr(os, "nice"):
        os.nice(settings.nice)
    cap_threads_before_loading(threads)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the pool's process dies, even mid-job.

    Spawned by the pool: Linux SIGKILLs us when the parent dies (the pool
    spawns from its long-lived manager thread: the signal comes when the
    *thread* that forked the child exits). Started by a forkserver, or forked
    by a template: a thread waits on the pool's process (``watch_parent``).
    """
    if os.getppid() != parent_pid:  # a forkserver's child (or the pool already died)
        watch_parent(parent_pid)
        return
    if not sys.platform.startswith("linux"):
        watch_parent(parent_pid)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        watch_parent(parent_pid)
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def watch_parent(parent_pid: int) -> None:
    """Exit at once when process ``parent_pid`` dies (a thread waits on it).
    Linux: a pidfd; macOS: kqueue; elsewhere a worker notices on its next
    read (end of file on its pipe)."""
    if hasattr(os, "pidfd_open"):
        try:
            handle = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            os._exit(1)

        def wait() -> None:
            select.select([handle], [], [])
            os._exit(1)

    elif sys.platform != "linux" and hasattr(select, "kqueue"):
        queue = select.kqueue()
        event = select.kevent(parent_pid, select.KQ_FILTER_PROC, select.KQ_EV_ADD, select.KQ_NOTE_EXIT)
        try:
            queue.control([event], 0)
        except ProcessLookupError:
            os._exit(1)

        def wait() -> None:
            queue.control(None, 1)
            os._exit(1)

    else:
        return
    threading.Thread(target=wait, name="mlpool-parent-watch", daemon=True).start()


def cap_threads_before_loading(threads: int) -> None:
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)


def cap_threads_after_loading(threads: int) -> None:
    """Cap thread pools of libraries already loaded (by loaders or ``__main__``)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    except Exception:  # threadpoolctl is best effort on exotic builds
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def load_models(loaders_pickle: bytes) -> dict[str, Any] | LoadFailed:
    """Run every loader once: the models by name, or what went wrong.

    ``loaders_pickle``: a pickled ``{name: that model's pickled loader}``
    (``_processes.groups.pack_loaders``), so a loader that cannot be
    unpickled here is named like one that raises."""
    name = "<all models>"
    try:
        pickled: dict[str, bytes] = pickle.loads(loaders_pickle)
        models = {}
        for name, data in pickled.items():
            loader: Callable[[], Any] = pickle.loads(data)
            model = loader()
            if model is None:
                raise ValueError(f"the loader of model {name!r} returned None; it must return the model")
            models[name] = model
    except BaseException as exc:  # the process boundary: the parent reports it as ModelLoadError
        tb = format_traceback(exc)
        error = describe_exception(exc)
        return LoadFailed(name, error[:MAX_TRACEBACK], tb[-MAX_TRACEBACK:])
    return models


def serve(
    fd: int,
    models: dict[str, Any],
    settings: WorkerSettings,
    *,
    sock: socket.socket | None = None,
    reader: FrameReader | None = None,
    early: deque | None = None,
) -> None:
    """Answer jobs read from ``fd`` until Stop or end of file.

    ``sock``/``reader``: the ones :func:`worker_main` already read ``early``
    messages with (a Setup). Raises DescriptorsLost if the kernel dropped
    descriptors (a protocol bug: the worker must not exit as if told to).
    """
    if sock is None:
        sock = socket.socket(fileno=os.dup(fd))  # recvmsg/sendmsg: descriptors ride along
    if reader is None:
        reader = FrameReader()
    messages = early if early is not None else deque()
    functions: dict[int, Callable] = {}
    memory = MemoryWatch(settings)
    started = LastStarted()  # a no-op until the parent sends one
    try:
        while True:
            while messages:
                msg = messages.popleft()
                match msg:
                    case Run() | RunBatch():
                        started.write(msg.job_id if type(msg) is Run else msg.job_ids[0])
                        begun = time.monotonic()
                        replies = run_message(msg, models, functions, settings)
                        del msg  # lets the arguments' shared memory go
                        if memory.watching:
                            busy = time.monotonic() - begun
                            if memory.long_job(busy):
                                _send_replies(sock, replies + memory.check(busy))
                            else:
                                _send_replies(sock, replies)
                                _send_replies(sock, memory.check(busy))
                        else:
                            _send_replies(sock, replies)
                    case RunStream():
                        started.write(msg.job_id)
                        begun = time.monotonic()
                        replies, gone = run_stream(
                            msg, partial(_function_and_model, msg, models, functions), settings, sock, reader, messages
                        )
                        del msg
                        busy = time.monotonic() - begun
                        _send_replies(sock, replies + memory.check(busy))
                        if gone:
                            return  # the parent is gone
                    case Credit() | CloseStream():
                        pass  # for a stream that already ended
                    case Setup():
                        started.close()
                        started = LastStarted.attach(msg.started_fd)
                    case StackPipe():
                        install_stack_dumps(msg.fd)
                    case Stop():
                        write_all(fd, encode(Exiting()))
                        return
            try:
                if not reader.recv_from(sock, 0):
                    return  # the parent is gone
            except DescriptorsLost:
                raise
            except OSError:
                return
            messages.extend(reader.messages())
    finally:
        started.close()
        reader.close()


def _send_replies(sock: socket.socket, replies: list[Reply]) -> None:
    if not replies:
        return
    try:
        send_frames(sock, replies)
    finally:
        for _, fds in replies:
            for result_fd in fds:
                os.close(result_fd)


def _function_and_model(
    msg: Run | RunBatch | RunStream, models: dict[str, Any], functions: dict[int, Callable]
) -> tuple:
    if msg.fn:
        if len(functions) >= FUNCTION_CACHE_SIZE:  # mirrored by the parent
            functions.clear()
        functions[msg.fn_id] = _load_function(msg.fn)
    fn = functions[msg.fn_id]
    try:
        return fn, models[msg.model]
    except KeyError:
        raise UnknownModelError(f"model {msg.model!r} is not loaded in this worker", model_name=msg.model) from None


def stream_function(msg: RunStream, models: dict[str, Any], functions: dict[int, Callable]) -> tuple:
    """A stream's function and model, as for a job (a Ray actor's stream too)."""
    return _function_and_model(msg, models, functions)


Reply = tuple[bytes, list[int]]  # an encoded frame and the descriptors to send with it


Stamps = tuple[float, float]  # time.monotonic() when the call began and ended (0.0: it never began)


def _done(
    job_id: int, seconds: float, result: Any, fn: Callable, settings: WorkerSettings, stamps: Stamps, offer: int = -1,
    *, batched: bool = False,
) -> Reply:  # fmt: skip
    """The Done of ``fn``'s result, or the Failed of why it cannot be sent (a
    ``__reduce__`` that raises anything, a frame too large)."""
    fd = -1
    try:
        if type(result) in SCALAR_TYPES:  # the common small result: nothing by reference, no buffer
            return encode_done(job_id, seconds, pickle.dumps(result, PROTOCOL), (), NOWHERE, *stamps), []
        what = f"{'a' if batched else 'the'} result of {_name(fn)}"
        data, spans, where, fd = write_result(result, what, settings.shm_threshold, settings.shm_limit, offer)
        return encode_done(job_id, seconds, data, spans, where, *stamps), [fd] if fd >= 0 else []
    except BaseException as exc:  # the result's own code ran: whatever it raised is this job's error
        if fd >= 0:
            os.close(fd)
        return _failed(job_id, seconds, exc, stamps)


def _failed(job_id: int, seconds: float, exc: BaseException, stamps: Stamps) -> Reply:
    error, tb = pack_exception(exc)
    return encode_failed(job_id, seconds, error, tb, *stamps), []


def run_message(
    msg: Run | RunBatch,
    models: dict[str, Any],
    functions: dict[int, Callable],
    settings: WorkerSettings,
    buffers: Any = None,
) -> list[Reply]:
    """Run the job of a Run, or the jobs of a RunBatch; their encoded replies.
    ``buffers``: out-of-band argument buffers that did not come in shared
    memory (a Ray actor's), as :func:`_run` and :func:`_run_batch` take them."""
    if type(msg) is Run:
        return _run(msg, models, functions, settings, buffers)
    return _run_batch(msg, models, functions, settings, buffers)


def _run(
    msg: Run, models: dict[str, Any], functions: dict[int, Callable], settings: WorkerSettings, buffers: Any = None
) -> list[Reply]:
    """Run one job; its encoded Done or Failed. ``buffers``: its arguments'
    out-of-band buffers when they did not come in shared memory (Ray)."""
    started = time.perf_counter()
    began = 0.0
    try:
        try:
            fn, model = _function_and_model(msg, models, functions)
            args, kwargs = unpack(msg.payload, msg.fd, msg.spans, "the job's arguments", buffers)
            began = time.monotonic()
            result = fn(model, *args, **kwargs)
            del args, kwargs  # lets the arguments' shared memory go
        except BaseException as exc:  # the job's error, whatever it is; the worker serves on
            return [_failed(msg.job_id, time.perf_counter() - started, exc, (began, time.monotonic()))]
        stamps = (began, time.monotonic())
        seconds = time.perf_counter() - started
        return [_done(msg.job_id, seconds, result, fn, settings, stamps, msg.offer_fd)]
    finally:
        if msg.offer_fd >= 0:
            os.close(msg.offer_fd)


def _run_batch(
    msg: RunBatch,
    models: dict[str, Any],
    functions: dict[int, Callable],
    settings: WorkerSettings,
    buffers: list | None = None,
) -> list[Reply]:
    """Call a batched function once over every job's item; a Done or Failed per
    job, in order. ``buffers``: per job, as for :func:`_run`."""
    started = time.perf_counter()
    began = 0.0
    spans = msg.spans or ((),) * len(msg.job_ids)
    fds = msg.fds or (-1,) * len(msg.job_ids)
    job_buffers = buffers or [None] * len(msg.job_ids)
    try:
        fn, model = _function_and_model(msg, models, functions)
        items = []
        for i, (payload, fd, job_spans) in enumerate(zip(msg.payloads, fds, spans, strict=True)):
            try:
                items.append(unpack(payload, fd, job_spans, "a batch item", job_buffers[i])[0][0])
            except BaseException:
                for unused in fds[i + 1 :]:  # unpack closed the ones it took
                    if unused >= 0:
                        os.close(unused)
                raise
        began = time.monotonic()
        results = list(fn(model, items))
        del items
        if len(results) != len(msg.job_ids):
            raise MLPoolError(
                f"batched function {_name(fn)} returned {len(results)} results for {len(msg.job_ids)} items; "
                "it must return exactly one result per item, in order"
            )
    except BaseException as exc:  # every job's error, whatever it is; the worker serves on
        seconds = time.perf_counter() - started
        error, tb = pack_exception(exc)
        ended = time.monotonic()
        return [(encode_failed(job_id, seconds, error, tb, began, ended), []) for job_id in msg.job_ids]
    stamps = (began, time.monotonic())
    seconds = time.perf_counter() - started
    return [
        _done(job_id, seconds, result, fn, settings, stamps, batched=True)
        for job_id, result in zip(msg.job_ids, results, strict=True)
    ]


def _load_function(data: bytes) -> Callable:
    try:
        return pickle.loads(data)
    except BaseException as exc:  # e.g. a __reduce__ that raises SystemExit: that job's error only
        message = f"the scoring function cannot be unpickled in the worker: {type(exc).__name__}: {exc}"

        def unloadable(*args: Any, **kwargs: Any) -> Any:
            raise SerializationError(message)

        return unloadable


def _name(fn: Callable) -> str:
    try:
        return getattr(fn, "__qualname__", None) or repr(fn)
    except Exception:
        return type(fn).__qualname__
