"""Workers as Ray actors (``backend="ray"``): the same scheduler, another transport.

The manager talks to every worker through a local socket and the frames of
``_wire.protocol``; it does not know where the worker runs. For a Ray worker, the
other end of that socket is a *bridge* in this process:

::

    manager ◄─socket─► bridge: reader thread ──run.remote(frame)──► actor (any node):
                               writer thread ◄──reply frames──────   loaders ran once,
                                                                     run_message

The reader submits each Run frame to the actor as it arrives (an actor runs
its calls one at a time, in the order one caller made them: the order the
manager relies on); the writer waits for the replies in that order and
writes them back. Ready comes from the actor's ``ready()``. When the actor
dies (killed, its node lost, ``ray.kill`` for a timeout), the pending call
raises, and the bridge closes the socket and the worker's *sentinel* (a
pipe only it holds), which is how the manager sees any worker die: the jobs
it held fail or retry as after a crash.

A stream (``RunStream``) is a Ray streaming generator
(``num_returns="streaming"``): the actor yields each item's frame, the
writer forwards them while the consumer's credits allow (the actor itself
runs at most ``_generator_backpressure_num_objects`` items ahead of the
writer, so a stream holds about one and a half windows in all), and a
``CloseStream`` cancels the generator (``ray.cancel``: ``GeneratorExit`` at its
yield, its ``finally`` runs) before the writer answers ``StreamEnd``.

Arguments' large buffers reach the bridge in shared memory, as for a local
worker; the bridge puts each into Ray's object store (one copy) and passes
the references with the call, so an actor reads them in place on its node
and Ray ships them to another. Results come back in-band (Ray carries
those above 100 KiB in its object store too). Ray is imported only here,
and only when a pool uses this backend.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

from mlpool._wire.protocol import (
    CloseStream,
    Credit,
    Exiting,
    Item,
    LoadFailed,
    Run,
    RunBatch,
    RunStream,
    Stop,
    StreamEnd,
    encode,
    encode_run,
    encode_run_batch,
    encode_run_stream,
)
from mlpool._wire.shm import region_views
from mlpool._wire.transport import FrameReader
from mlpool._worker.main import (
    WorkerSettings,
)
from mlpool._worker.ray_actor import Actor
from mlpool.errors import ray_missing

logger = logging.getLogger(__name__)

_STOP = object()


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ray_missing() from None
    return ray


class RaySession:
    """Joins (or starts) the Ray instance a pool uses; leaves it as it found it.

    A Ray instance the pools started (``ray.init`` with no instance running)
    is shared by every pool of this process that joins it afterwards, and shut
    down by the last of them to close (shutting down the pool that
    started it must not take it from the others). An instance the
    application started, or a cluster it connected to, is never shut down.
    """

    # Process-wide: whether the running instance was started by a pool, and
    # how many pools use it.
    _lock = threading.Lock()
    _ours = False
    _users = 0
    _instance = 0  # counts the instances pools started (one stopped elsewhere is not ours any more)

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._counted: int | None = None  # the instance this session counts as a user of

    def connect(self) -> None:
        ray = require_ray()
        cls = RaySession
        with cls._lock:
            if self._counted is not None:
                return
            if not ray.is_initialized():
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
                cls._ours, cls._users, cls._instance = True, 0, cls._instance + 1
            elif not cls._ours:
                return  # the application's instance: not ours to stop
            cls._users += 1
            self._counted = cls._instance

    def close(self) -> None:
        """Idempotent; shuts Ray down if this was the last pool using an instance pools started."""
        cls = RaySession
        with cls._lock:
            if self._counted != cls._instance or not cls._ours:
                self._counted = None
                return
            self._counted = None
            cls._users -= 1
            if cls._users > 0:
                return
            cls._ours = False
            ray = require_ray()
            if ray.is_initialized():
                ray.shutdown()


class _Flow:
    """The credit window of one stream on the bridge: the writer forwards an
    item only while the consumer is less than a window behind."""

    def __init__(self, msg: RunStream) -> None:
        self.job_id = msg.job_id
        self.max_items = max(1, msg.window_items)
        self.max_bytes = max(1, msg.window_bytes)
        self.items = 0
        self.nbytes = 0
        self.closed = False
        self.cond = threading.Condition()

    def sent(self, nbytes: int) -> None:
        with self.cond:
            self.items += 1
            self.nbytes += nbytes

    def credit(self, items: int, nbytes: int) -> None:
        with self.cond:
            self.items -= items
            self.nbytes -= nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for_room(self) -> bool:
        """Block while the window is full; False once the stream was closed."""
        with self.cond:
            while not self.closed and (self.items >= self.max_items or (self.items and self.nbytes >= self.max_bytes)):
                self.cond.wait()
            return not self.closed


_actor_classes: dict[int, Any] = {}


def actor_class() -> Any:
    ray = require_ray()
    if not _actor_classes:
        _actor_classes[0] = ray.remote(max_restarts=0, max_task_retries=0)(Actor)
    return _actor_classes[0]


class RayProcess:
    """A Ray worker as :class:`~mlpool._processes.workers.WorkerHandle` sees a process:
    ``pid`` (its actor's, once Ready), ``sentinel``, ``join``, ``kill``."""

    def __init__(self, worker_id: int, actor: Any, sock: socket.socket) -> None:
        self.name = f"mlpool-worker-{worker_id}"
        self.pid = 0
        self.exitcode: int | None = None
        self.death: str | None = None  # how it died, in words (WorkerHandle reads it)
        self.actor = actor
        self._sock = sock  # the bridge's end
        self.sentinel, self._sentinel_w = os.pipe()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # object refs in submission order, then _STOP
        self._flows: dict[int, _Flow] = {}  # streams by job id: the reader credits them, the writer waits
        self._killed = False
        self._threads = [
            threading.Thread(target=self._read, name=f"mlpool-ray-{worker_id}-in", daemon=True),
            threading.Thread(target=self._write, name=f"mlpool-ray-{worker_id}-out", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- the bridge

    def _read(self) -> None:
        """Frames from the manager: Run and RunBatch go to the actor; Stop ends."""
        ray = require_ray()
        reader = FrameReader()
        try:
            while True:
                if not reader.recv_from(self._sock, 0):
                    break
                for msg in reader.messages():
                    if type(msg) is Stop:
                        self._calls.put(_STOP)
                        return
                    if type(msg) is Credit or type(msg) is CloseStream:
                        self._control_stream(msg)
                        continue
                    assert type(msg) is Run or type(msg) is RunBatch or type(msg) is RunStream
                    frame, counts, refs = _to_object_store(ray, msg)
                    if type(msg) is RunStream:
                        flow = self._flows[msg.job_id] = _Flow(msg)
                        ahead = max(1, msg.window_items // 2)
                        run = self.actor.run_stream.options(num_returns="streaming",
                                                            _generator_backpressure_num_objects=ahead)
                        self._calls.put((run.remote(frame, counts, *refs), flow))
                    else:
                        self._calls.put(self.actor.run.remote(frame, counts, *refs))
        except OSError:
            pass
        except Exception:  # the jobs in flight end as after a crash; nobody waits forever
            logger.exception("Ray worker %s: could not hand a job to its actor", self.name)
            self.kill()
        finally:
            reader.close()
            for flow in list(self._flows.values()):
                flow.close()  # a writer waiting for credit ends
            self._calls.put(_STOP)

    def _control_stream(self, msg: Credit | CloseStream) -> None:
        flow = self._flows.get(msg.job_id)
        if flow is None:
            return  # a stream that ended
        if type(msg) is Credit:
            flow.credit(msg.items, msg.nbytes)
        else:
            flow.close()

    def _forward_stream(self, ray: Any, generator: Any, flow: _Flow) -> None:
        """Write a stream's frames while credits allow; a close cancels the
        actor's generator and answers StreamEnd in its place."""
        started = time.perf_counter()
        reader = FrameReader()
        try:
            while flow.wait_for_room():
                try:
                    ref = next(generator)
                except StopIteration:
                    return
                frame = ray.get(ref)
                self._sock.sendall(frame)
                reader.feed(frame)
                for msg in reader.messages():
                    if type(msg) is Item:
                        flow.sent(len(msg.data))
            ray.cancel(generator)
            self._sock.sendall(encode(StreamEnd(flow.job_id, time.perf_counter() - started)))
        finally:
            self._flows.pop(flow.job_id, None)

    def _write(self) -> None:
        """Replies to the manager, in order; the end of the worker on Stop or death."""
        ray = require_ray()
        try:
            hello = ray.get(self.actor.ready.remote())
            self._sock.sendall(hello)
            if _is_load_failure(hello):  # like a spawned worker, it exits after saying so
                self.death = "failed to load its models"
                self.exitcode = 1
                return
            while True:
                ref = self._calls.get()
                if ref is _STOP:
                    self._sock.sendall(encode(Exiting()))
                    self.exitcode = 0
                    break
                if type(ref) is tuple:  # a stream: (its generator, its window)
                    self._forward_stream(ray, *ref)
                    continue
                self._sock.sendall(ray.get(ref))
        except ray.exceptions.RayActorError as exc:
            self.death = "was killed" if self._killed else f"died: {_first_line(exc)}"
            self.exitcode = -9 if self._killed else None
        except OSError:  # the manager closed its end
            pass
        except Exception as exc:  # a Ray error we do not know: the worker is lost all the same
            logger.warning("Ray worker %s lost: %r", self.name, exc)
            self.death = f"was lost: {_first_line(exc)}"
        finally:
            self.kill()
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            os.close(self._sentinel_w)

    # -- what WorkerHandle calls

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        try:
            require_ray().kill(self.actor, no_restart=True)
        except Exception as exc:  # already gone
            logger.debug("ray.kill(%s): %r", self.name, exc)

    terminate = kill

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _to_object_store(ray: Any, msg: Run | RunBatch | RunStream) -> tuple[bytes, tuple[int, ...], list[Any]]:
    """The frame to send the actor, and the jobs' large argument buffers moved
    from the manager's shared memory into Ray's object store (one copy; an
    actor on this node reads them in place)."""
    if type(msg) is Run:
        jobs = [(msg.fd, msg.spans, msg.offer_fd)]
        frame = encode_run(msg.job_id, msg.fn_id, msg.model, msg.fn, msg.payload)
    elif isinstance(msg, RunStream):
        jobs = [(msg.fd, msg.spans, -1)]
        frame = encode_run_stream(msg.job_id, msg.fn_id, msg.model, msg.fn, msg.payload, (), msg.window_items,
                                  msg.window_bytes)  # fmt: skip
    else:
        fds = msg.fds or (-1,) * len(msg.job_ids)
        spans = msg.spans or ((),) * len(msg.job_ids)
        jobs = [(fd, job_spans, -1) for fd, job_spans in zip(fds, spans, strict=True)]
        frame = encode_run_batch(msg.job_ids, msg.fn_id, msg.model, msg.fn, msg.payloads)
    counts = []
    refs: list[Any] = []
    for fd, job_spans, offer_fd in jobs:
        try:
            for view in region_views(fd, job_spans) if job_spans else ():
                refs.append(ray.put(_as_array(view)))
        finally:
            for unused in (fd, offer_fd):
                if unused >= 0:
                    os.close(unused)
        counts.append(len(job_spans))
    return frame, tuple(counts) if refs else (), refs


def _as_array(view: memoryview) -> Any:
    """Something Ray stores without pickling a copy: a NumPy array when NumPy is there."""
    try:
        import numpy
    except ImportError:
        return bytes(view)
    return numpy.frombuffer(view, dtype=numpy.uint8)


def _is_load_failure(frame: bytes) -> bool:
    reader = FrameReader()
    reader.feed(frame)
    return any(type(msg) is LoadFailed for msg in reader.messages())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def spawn_ray_worker(
    worker_id: int, loaders_pickle: bytes, settings: WorkerSettings, options: dict
) -> tuple[RayProcess, socket.socket]:
    """Create one actor and its bridge; the manager's end of the socket."""
    manager_end, bridge_end = socket.socketpair()
    try:
        # Results come back in-band: the actor may be on another machine.
        actor_settings = dataclasses.replace(settings, shm_threshold=None)
        actor = actor_class().options(**options).remote(loaders_pickle, actor_settings)
        return RayProcess(worker_id, actor, bridge_end), manager_end
    except BaseException:
        manager_end.close()
        bridge_end.close()
        raise
