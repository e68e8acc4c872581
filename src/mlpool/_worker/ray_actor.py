"""A worker as a Ray actor (``backend="ray"``): the code that runs on the actor's node.

The API process's side (the bridge between the engine's socket and the
actor, the Ray session) is ``mlpool._processes.ray``, whose docstring draws
the exchange. An actor loads its models once, as a spawned worker does, and
runs each Run frame it is handed with the same code (``run_message``); a
stream is a Ray streaming generator of Item frames.
"""

from __future__ import annotations

import os
import time
from typing import Any

from mlpool._wire.protocol import (
    LoadFailed,
    Ready,
    Run,
    RunBatch,
    RunStream,
    StreamEnd,
    encode,
    encode_failed,
    encode_item,
)
from mlpool._wire.serialization import pack_exception
from mlpool._wire.shm import unpack, write_result
from mlpool._wire.transport import FrameReader
from mlpool._worker.main import (
    MemoryWatch,
    WorkerSettings,
    cap_threads_after_loading,
    cap_threads_before_loading,
    load_models,
    run_message,
    stream_function,
)
from mlpool._worker.stream import iterate


class Actor:
    """The body of a Ray worker (the API process makes it a Ray actor class:
    ``mlpool._processes.ray.actor_class``)."""

    def __init__(self, loaders_pickle: bytes, settings: WorkerSettings) -> None:
        started = time.perf_counter()
        if settings.env:
            os.environ.update(settings.env)
        cap_threads_before_loading(settings.threads)
        if settings.nice and hasattr(os, "nice"):
            os.nice(settings.nice)
        self.settings = settings
        self.functions: dict = {}
        self.models = load_models(loaders_pickle)
        if not isinstance(self.models, LoadFailed):
            cap_threads_after_loading(settings.threads)
        self.load_seconds = time.perf_counter() - started
        self.memory = MemoryWatch(settings)

    def ready(self) -> bytes:
        if isinstance(self.models, LoadFailed):
            return encode(self.models)
        return encode(Ready(os.getpid(), self.load_seconds))

    def run(self, frame: bytes, counts: tuple[int, ...], *arrays: Any) -> bytes:
        """Run the jobs of one Run or RunBatch frame; their reply frames, joined.
        ``arrays``: the jobs' out-of-band argument buffers (Ray hands them
        over from its object store), ``counts[i]`` of them for job ``i``."""
        reader = FrameReader()
        reader.feed(frame)  # one whole frame, without descriptors
        (msg,) = reader.messages()
        assert type(msg) is Run or type(msg) is RunBatch
        assert not isinstance(self.models, LoadFailed)  # a failed actor is never sent jobs (see ready)
        per_job: list[Any] = []
        start = 0
        for count in counts:
            per_job.append(list(arrays[start : start + count]) if count else None)
            start += count
        buffers = (per_job[0] if per_job else None) if type(msg) is Run else (per_job or None)
        replies = run_message(msg, self.models, self.functions, self.settings, buffers)
        replies += self.memory.check()
        return b"".join(data for data, _ in replies)

    def run_stream(self, frame: bytes, counts: tuple[int, ...], *arrays: Any) -> Any:
        """A stream's job, as a Ray streaming generator: each item's Item
        frame, then StreamEnd or Failed. Cancelled (the consumer closed it):
        GeneratorExit here, which closes the user's generator too."""
        reader = FrameReader()
        reader.feed(frame)
        (msg,) = reader.messages()
        assert type(msg) is RunStream and not isinstance(self.models, LoadFailed)
        started = time.perf_counter()
        iterator = None
        try:
            fn, model = stream_function(msg, self.models, self.functions)
            args, kwargs = unpack(msg.payload, -1, (), "the stream's arguments", list(arrays) if counts else None)
            iterator = iterate(fn(model, *args, **kwargs), fn)
            del args, kwargs
            what = f"an item of {getattr(fn, '__qualname__', None) or type(fn).__name__}"
            for item in iterator:
                yield encode_item(msg.job_id, write_result(item, what, None, None, -1)[0])
        except GeneratorExit:
            _close(iterator)
            raise
        except BaseException as exc:  # the stream's error; the actor serves on
            try:
                _close(iterator)
            finally:
                error, tb = pack_exception(exc)
                yield encode_failed(msg.job_id, time.perf_counter() - started, error, tb)
            return
        _close(iterator)
        yield encode(StreamEnd(msg.job_id, time.perf_counter() - started))


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
