"""Wire messages between the parent and a worker, and their framing.

The template's channel has its own: ``_wire.template_protocol``.

Sending and reading them over sockets, with descriptors, is ``_wire.transport``.

Each worker has one duplex pipe. Every message is one frame::

    [body length: u32][kind: u8][body]

Parent -> worker (``ToWorker``): ``Setup`` (first, optional: the worker's
"started" word, see ``_wire.started``), ``StackPipe`` (where the worker writes its
stacks, see ``_processes.stacks``), ``Run`` (one job), ``RunBatch`` (jobs of a batched
function, one call), ``Stop``; for a stream (``pool.stream``):
``RunStream``, ``Credit``, ``CloseStream``.
Worker -> parent (``FromWorker``): ``Ready``, ``LoadFailed``, ``Done``,
``Failed``, ``OverMemory``, ``Exiting``; for a stream: ``Item`` each, then ``StreamEnd`` or ``Failed``.

The hot messages (``Run``, ``Done``, ``Failed``) are packed with :mod:`struct`
around opaque pickled payloads: pickling a dataclass costs about 10 µs a round
trip, struct about 1 µs, and a job crosses the pipe twice. The rare control
messages are pickled whole. This module imports nothing from mlpool, so the
worker's side can import it cheaply.

A payload's large buffers travel in a shared-memory file (see ``_engine.regions``):
the frame lists their ``spans`` (offset, length) and the file's descriptor
rides along as ``SCM_RIGHTS`` ancillary data, sent with the frame's first
byte, one descriptor per payload that has spans, in frame order. The reader
collects descriptors as they arrive and hands each frame its own (``fd``).
One ``sendmsg`` carries at most ``MAX_FDS_PER_SEND`` descriptors (Linux's
SCM_MAX_FD): a frame with more goes in several sends, each carrying the next
descriptors with the next byte of the frame, so all of them have arrived by
the time its last byte has.
"""

from __future__ import annotations

import pickle
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import final

from mlpool.errors import SerializationError

_HEADER = struct.Struct("<IB")
_RUN = struct.Struct("<QIHIIB")  # job id, function id, name length, function pickle length, spans, offer
# job id, seconds the call took, the call's start and end (time.monotonic(), for traces: see _tracing),
# spans, where they are (see _shm)
_DONE = struct.Struct("<QdddIB")
_SPAN = struct.Struct("<QQ")  # offset, length in the payload's shared-memory file
_FAILED = struct.Struct("<QdddI")  # job id, seconds, start and end, length of the pickled exception

_RUN_KIND, _STOP_KIND, _RUN_BATCH_KIND, _SETUP_KIND, _STACK_PIPE_KIND = 1, 2, 3, 4, 5
_RUN_BATCH = struct.Struct("<IIHI")  # job count, function id, model name length, function pickle length
Spans = tuple[tuple[int, int], ...]
_READY_KIND, _LOAD_FAILED_KIND, _DONE_KIND, _FAILED_KIND, _EXITING_KIND, _OVER_MEMORY_KIND = 10, 11, 12, 13, 14, 15
_OVER_MEMORY = struct.Struct("<Q")  # resident bytes
# Streams: RunStream is the window, then a Run's body; Item is laid out as Done;
# Credit, CloseStream and StreamEnd (one per half window at most) are pickled whole.
_RUN_STREAM_KIND, _CREDIT_KIND, _CLOSE_STREAM_KIND, _ITEM_KIND, _STREAM_END_KIND = 6, 7, 8, 16, 17
_WINDOW = struct.Struct("<IQ")  # items, bytes the worker may run ahead of the consumer
_ITEM = struct.Struct("<QIB")  # job id, spans, where they are (as Done)

# Done.where: where the result's out-of-band buffers are. Nowhere (none, or
# in-band), in the file the parent offered with the Run, or in a new file the
# worker sends along with the Done.
NOWHERE, OFFERED, NEW_FILE = 0, 1, 2

# Text crosses as UTF-8; lone surrogates (an exception message built from
# undecodable bytes, a model name from os.fsdecode) survive the round trip.
_TEXT = "surrogatepass"

MAX_FRAME = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Setup:
    """Sent first, before the worker starts (it waits in the socket):
    ``started_fd`` is the worker's "started" word (see ``_wire.started``)."""

    started_fd: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class StackPipe:
    """The write end of the pipe where the worker's stack dumps go (see
    ``_processes.stacks``); sent once, after ``Setup``."""

    fd: int = field(default=-1, compare=False)


@final  # told apart by `type(msg) is Run`
@dataclass(frozen=True, slots=True)
class Run:
    """Run one job. ``fn`` is the function's pickle the first time this worker
    sees ``fn_id``, else empty; ``payload`` is the pickled ``(args, kwargs)``."""

    job_id: int
    fn_id: int
    model: str
    fn: bytes
    payload: bytes
    spans: Spans = ()
    fd: int = field(default=-1, compare=False)  # the spans' shared-memory file, when received
    offer: bool = False  # a shared-memory file comes along for the result
    offer_fd: int = field(default=-1, compare=False)


@final  # told apart by `type(msg) is RunBatch`
@dataclass(frozen=True, slots=True)
class RunBatch:
    """Run a batched function once over the items of several jobs; answer
    each job with its own Done or Failed, in order."""

    job_ids: tuple[int, ...]
    fn_id: int
    model: str
    fn: bytes
    payloads: tuple[bytes, ...]
    spans: tuple[Spans, ...] = ()  # per job (empty: no job has any)
    fds: tuple[int, ...] = field(default=(), compare=False)  # per job, -1 where it has no spans


@dataclass(frozen=True, slots=True)
class Stop:
    """Finish the jobs already received, answer ``Exiting`` and exit."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Every loader returned; the worker serves jobs from now on."""

    pid: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """A loader raised or returned None; the worker exits after sending this."""

    model: str
    error: str
    traceback: str


@dataclass(frozen=True, slots=True)
class Done:
    """A job returned; ``result`` is its pickled return value."""

    job_id: int
    seconds: float
    result: bytes
    spans: Spans = ()
    where: int = 0  # the spans: nowhere, in the offered file, in a new file (sent along)
    fd: int = field(default=-1, compare=False)
    began: float = 0.0  # the worker's time.monotonic() when the call began, and when it ended
    ended: float = 0.0


@dataclass(frozen=True, slots=True)
class Failed:
    """A job raised. ``error`` is the pickled exception (or a stand-in),
    ``traceback`` the worker's formatted traceback."""

    job_id: int
    seconds: float
    error: bytes
    traceback: str
    began: float = 0.0  # as in Done (0.0: the call never began)
    ended: float = 0.0


@dataclass(frozen=True, slots=True)
class OverMemory:
    """After a job, the worker's resident memory passed max_memory_per_worker."""

    rss: int


@dataclass(frozen=True, slots=True)
class Exiting:
    """The worker obeys ``Stop`` and is about to exit."""


@dataclass(frozen=True, slots=True)
class RunStream:
    """Run a job that yields (``pool.stream``): an ``Item`` each while at most ``window_items`` /
    ``window_bytes`` (at least one item) wait unconsumed. Fields as ``Run``, with no offer."""

    job_id: int
    fn_id: int
    model: str
    fn: bytes
    payload: bytes
    spans: Spans = ()
    fd: int = field(default=-1, compare=False)
    window_items: int = 16
    window_bytes: int = 8 * 2**20


@dataclass(frozen=True, slots=True)
class Credit:
    """The consumer took ``items`` items (``nbytes`` bytes) of stream ``job_id``."""

    job_id: int
    items: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Stop stream ``job_id`` at its next yield; the worker answers ``StreamEnd``."""

    job_id: int


@dataclass(frozen=True, slots=True)
class Item:
    """One item of stream ``job_id``: pickled as a result is (``Done``)."""

    job_id: int
    data: bytes
    spans: Spans = ()
    where: int = 0
    fd: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Stream ``job_id`` ended: its generator returned, or was closed."""

    job_id: int
    seconds: float


ToWorker = Setup | StackPipe | Run | RunBatch | Stop | RunStream | Credit | CloseStream
FromWorker = Ready | LoadFailed | Done | Failed | OverMemory | Exiting | Item | StreamEnd
_PICKLED_KINDS: dict[type, int] = {Credit: _CREDIT_KIND, CloseStream: _CLOSE_STREAM_KIND, StreamEnd: _STREAM_END_KIND}


class FrameTooLarge(SerializationError):
    """A message larger than a frame can carry (``MAX_FRAME`` bytes): a job's
    arguments or result that pickle to more, outside shared memory."""


def _frame(kind: int, *parts: bytes) -> bytes:
    length = sum(map(len, parts))
    if length > MAX_FRAME:
        raise FrameTooLarge(
            f"a message of {length} bytes cannot be sent: one message between processes holds at most "
            f"{MAX_FRAME} bytes (large bytes-like buffers and arrays go through shared memory, not the message)"
        )
    return b"".join((_HEADER.pack(length, kind), *parts))


def _spans(spans: Spans) -> bytes:
    if not spans:  # most frames: no shared memory
        return b""
    return b"".join(_SPAN.pack(offset, length) for offset, length in spans)


def _read_spans(body: bytes, start: int, count: int) -> Spans:
    if not count:  # most frames: no shared memory
        return ()
    return tuple(_SPAN.unpack_from(body, start + i * _SPAN.size) for i in range(count))


def encode(msg: ToWorker | FromWorker) -> bytes:
    """One frame holding ``msg`` (its descriptors are sent alongside, not in it)."""
    match msg:
        case Run(job_id, fn_id, model, fn, payload, spans, _, offer):
            return encode_run(job_id, fn_id, model, fn, payload, spans, offer)
        case RunBatch(job_ids, fn_id, model, fn, payloads, spans):
            return encode_run_batch(job_ids, fn_id, model, fn, payloads, spans)
        case Done(job_id, seconds, result, spans, where):
            return encode_done(job_id, seconds, result, spans, where, msg.began, msg.ended)
        case Failed(job_id, seconds, error, tb):
            return encode_failed(job_id, seconds, error, tb, msg.began, msg.ended)
        case Setup():
            return encode_setup()
        case RunStream(job_id, fn_id, model, fn, payload, spans, _, items, nbytes):
            return encode_run_stream(job_id, fn_id, model, fn, payload, spans, items, nbytes)
        case Item(job_id, data, spans, where):
            return encode_item(job_id, data, spans, where)
        case Credit() | CloseStream() | StreamEnd():
            return _frame(_PICKLED_KINDS[type(msg)], pickle.dumps(msg))
        case StackPipe():
            return _frame(_STACK_PIPE_KIND)
        case Stop():
            return _frame(_STOP_KIND)
        case Exiting():
            return _frame(_EXITING_KIND)
        case OverMemory(rss):
            return _frame(_OVER_MEMORY_KIND, _OVER_MEMORY.pack(rss))
        case Ready():
            return _frame(_READY_KIND, pickle.dumps(msg))
        case LoadFailed():
            return _frame(_LOAD_FAILED_KIND, pickle.dumps(msg))
    raise TypeError(f"not a wire message: {msg!r}")


def encode_done(
    job_id: int, seconds: float, result: bytes, spans: Spans = (), where: int = 0, began: float = 0.0,
    ended: float = 0.0,
) -> bytes:
    """``encode(Done(...))`` without building the message first (the worker's hot path)."""
    if not spans:
        return _frame(_DONE_KIND, _DONE.pack(job_id, seconds, began, ended, 0, where), result)
    return _frame(_DONE_KIND, _DONE.pack(job_id, seconds, began, ended, len(spans), where), _spans(spans), result)


def encode_failed(job_id: int, seconds: float, error: bytes, tb: str, began: float = 0.0, ended: float = 0.0) -> bytes:
    """``encode(Failed(...))``; any text crosses, lone surrogates included."""
    head = _FAILED.pack(job_id, seconds, began, ended, len(error))
    return _frame(_FAILED_KIND, head, error, tb.encode("utf-8", _TEXT))


def stack_pipe_frame(fd: int) -> tuple[bytes, list[int]]:
    """``(frame, fds)`` for :func:`send_frames`: a StackPipe carrying ``fd``."""
    return _frame(_STACK_PIPE_KIND), [fd]


def encode_setup() -> bytes:
    """A Setup frame; send the started word's descriptor with it (:func:`setup_frame`)."""
    return _frame(_SETUP_KIND)


def setup_frame(started_fd: int) -> tuple[bytes, list[int]]:
    """``(frame, fds)`` for :func:`send_frames`: a Setup carrying ``started_fd``."""
    return encode_setup(), [started_fd]


def encode_run(
    job_id: int, fn_id: int, model: str, fn: bytes, payload: bytes, spans: Spans = (), offer: bool = False
) -> bytes:
    """``encode(Run(...))`` without building the message first (the dispatch hot path)."""
    name = model.encode("utf-8", _TEXT)
    head = _RUN.pack(job_id, fn_id, len(name), len(fn), len(spans), offer)
    return _frame(_RUN_KIND, head, _spans(spans) if spans else b"", name, fn, payload)


def encode_run_stream(
    job_id: int, fn_id: int, model: str, fn: bytes, payload: bytes, spans: Spans, items: int, nbytes: int
) -> bytes:
    """``encode(RunStream(...))``: the window, then a Run's body (no offer)."""
    run = encode_run(job_id, fn_id, model, fn, payload, spans)
    return _frame(_RUN_STREAM_KIND, _WINDOW.pack(items, nbytes), run[_HEADER.size :])


def encode_item(job_id: int, data: bytes, spans: Spans = (), where: int = 0) -> bytes:
    """``encode(Item(...))`` without building the message first (the worker's stream loop)."""
    return _frame(_ITEM_KIND, _ITEM.pack(job_id, len(spans), where), _spans(spans), data)


def encode_run_batch(
    job_ids: tuple[int, ...],
    fn_id: int,
    model: str,
    fn: bytes,
    payloads: tuple[bytes, ...],
    spans: tuple[Spans, ...] = (),
) -> bytes:
    """``encode(RunBatch(...))`` without building the message first."""
    name = model.encode("utf-8", _TEXT)
    count = len(job_ids)
    spans = spans or ((),) * count
    head = _RUN_BATCH.pack(count, fn_id, len(name), len(fn))
    ids = struct.pack(f"<{count}Q", *job_ids)
    sizes = struct.pack(f"<{count}I", *(len(p) for p in payloads))
    span_counts = struct.pack(f"<{count}I", *(len(s) for s in spans))
    all_spans = b"".join(_spans(s) for s in spans)
    return _frame(_RUN_BATCH_KIND, head, ids, sizes, span_counts, all_spans, name, fn, *payloads)


def decode(kind: int, body: bytes, fds: deque[int] | None = None) -> ToWorker | FromWorker:
    """The message in one frame's body; it takes its descriptors from ``fds``."""
    if kind == _DONE_KIND:
        job_id, seconds, began, ended, count, where = _DONE.unpack_from(body)
        start = _DONE.size + count * _SPAN.size
        spans = _read_spans(body, _DONE.size, count) if count else ()
        fd = _take_fd(fds) if where == NEW_FILE else -1
        return Done(job_id, seconds, body[start:], spans, where, fd, began, ended)
    if kind == _RUN_KIND:
        job_id, fn_id, name_len, fn_len, count, offer = _RUN.unpack_from(body)
        spans = _read_spans(body, _RUN.size, count) if count else ()
        start = _RUN.size + count * _SPAN.size
        model = body[start : start + name_len].decode("utf-8", _TEXT)
        start += name_len
        fd = _take_fd(fds) if spans else -1
        offer_fd = _take_fd(fds) if offer else -1
        return Run(job_id, fn_id, model, body[start : start + fn_len], body[start + fn_len :], spans, fd, bool(offer),
                   offer_fd)  # fmt: skip
    if kind == _FAILED_KIND:
        job_id, seconds, began, ended, err_len = _FAILED.unpack_from(body)
        start = _FAILED.size
        tb = body[start + err_len :].decode("utf-8", _TEXT)
        return Failed(job_id, seconds, body[start : start + err_len], tb, began, ended)
    if kind == _RUN_BATCH_KIND:
        count, fn_id, name_len, fn_len = _RUN_BATCH.unpack_from(body)
        start = _RUN_BATCH.size
        job_ids = struct.unpack_from(f"<{count}Q", body, start)
        start += 8 * count
        sizes = struct.unpack_from(f"<{count}I", body, start)
        start += 4 * count
        span_counts = struct.unpack_from(f"<{count}I", body, start)
        start += 4 * count
        all_spans = []
        for span_count in span_counts:
            all_spans.append(_read_spans(body, start, span_count))
            start += span_count * _SPAN.size
        job_fds = tuple(_take_fd(fds) if s else -1 for s in all_spans)
        model = body[start : start + name_len].decode("utf-8", _TEXT)
        start += name_len
        fn = body[start : start + fn_len]
        start += fn_len
        payloads = []
        for size in sizes:
            payloads.append(body[start : start + size])
            start += size
        return RunBatch(job_ids, fn_id, model, fn, tuple(payloads), tuple(all_spans), job_fds)
    if kind >= _ITEM_KIND or _RUN_STREAM_KIND <= kind <= _CLOSE_STREAM_KIND:
        return _decode_stream(kind, body, fds)
    if kind == _STOP_KIND:
        return Stop()
    if kind == _SETUP_KIND:
        return Setup(_take_fd(fds))
    if kind == _STACK_PIPE_KIND:
        return StackPipe(_take_fd(fds))
    if kind == _EXITING_KIND:
        return Exiting()
    if kind == _OVER_MEMORY_KIND:
        return OverMemory(*_OVER_MEMORY.unpack(body))
    if kind in (_READY_KIND, _LOAD_FAILED_KIND):
        return pickle.loads(body)
    raise ValueError(f"unknown message kind {kind}")


def _decode_stream(kind: int, body: bytes, fds: deque[int] | None) -> ToWorker | FromWorker:
    """The stream messages, kept off the decoding path of ordinary jobs."""
    if kind == _ITEM_KIND:
        job_id, count, where = _ITEM.unpack_from(body)
        spans = _read_spans(body, _ITEM.size, count)
        start = _ITEM.size + count * _SPAN.size
        return Item(job_id, body[start:], spans, where, _take_fd(fds) if where == NEW_FILE else -1)
    if kind in _PICKLED_KINDS.values():
        return pickle.loads(body)
    if kind == _RUN_STREAM_KIND:
        run = decode(_RUN_KIND, body[_WINDOW.size :], fds)
        assert type(run) is Run
        return RunStream(run.job_id, run.fn_id, run.model, run.fn, run.payload, run.spans, run.fd,
                         *_WINDOW.unpack_from(body))  # fmt: skip
    raise ValueError(f"unknown message kind {kind}")


def _take_fd(fds: deque[int] | None) -> int:
    if not fds:
        raise ValueError("a frame refers to shared memory but no descriptor came with it")
    return fds.popleft()


# Bytes of a model name in a Run message (its length field is 16 bits).
MAX_MODEL_NAME = 4096


def check_model_name(name: str) -> None:
    """A name every message can carry: refused at construction, not at each job."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"model name {name!r} cannot be encoded as UTF-8: {exc.reason}") from None
    if size > MAX_MODEL_NAME:
        raise ValueError(f"model name {name[:40]!r}... is {size} bytes long; at most {MAX_MODEL_NAME}")


# Every message kind a frame header may name (a header naming another is no message).
KNOWN_KINDS = frozenset(
    value for name, value in list(globals().items()) if name.endswith("_KIND") and type(value) is int
)
