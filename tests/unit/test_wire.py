"""The wire, without a pool: frames and their descriptors, the started word,
exceptions crossing back, and the function table."""

from __future__ import annotations

import functools
import gc
import os
import pickle
import resource
import socket
import threading

import pytest
from helpers import worker_probe

from mlpool import MLPoolError, RemoteError, SerializationError
from mlpool._wire.protocol import Failed, RunBatch, Setup, decode, encode, encode_run_batch, setup_frame
from mlpool._wire.serialization import (
    FUNCTION_TABLE_SIZE,
    FunctionTable,
    loads,
    pack_exception,
    unpack_exception,
)
from mlpool._wire.started import UNKNOWN, LastStarted
from mlpool._wire.transport import MAX_FDS_PER_SEND, DescriptorsLost, FrameReader, send_frames

linux_only = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd and SCM_RIGHTS (Linux)")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _receive(reader: FrameReader, sock: socket.socket, count: int = 1) -> list:
    """Read until ``count`` messages are complete (blocking reads, bounded by the socket timeout)."""
    messages: list = []
    while len(messages) < count:
        assert reader.recv_from(sock, 0), "end of file before the frame was complete"
        messages += reader.messages()
    return messages


@linux_only
@pytest.mark.parametrize("count", [1, MAX_FDS_PER_SEND, MAX_FDS_PER_SEND + 1, 300, 3 * MAX_FDS_PER_SEND + 7])
def test_a_frame_carries_any_number_of_descriptors_each_to_its_job(count):
    left, right = socket.socketpair()
    left.settimeout(30)
    right.settimeout(30)
    files = []
    for i in range(count):
        fd = os.memfd_create(f"item-{i}")
        os.write(fd, i.to_bytes(4, "little"))
        files.append(fd)
    reader = FrameReader()
    try:
        frame = encode_run_batch(tuple(range(1, count + 1)), 1, "m", b"", (b"x",) * count, (((0, 4),),) * count)
        # A writer thread: a frame this big may not fit in the socket buffer.
        sender = threading.Thread(target=send_frames, args=(left, [(frame, files)]))
        sender.start()
        (msg,) = _receive(reader, right)
        sender.join(30)
        assert type(msg) is RunBatch and len(msg.fds) == count
        for i, fd in enumerate(msg.fds):
            assert os.pread(fd, 4, 0) == i.to_bytes(4, "little"), f"item {i} got another item's file"
            os.close(fd)
        assert not reader.fds
    finally:
        for fd in files:
            os.close(fd)
        reader.close()
        left.close()
        right.close()


@linux_only
def test_dropped_descriptors_fail_loudly(tmp_path):
    # The kernel drops descriptors the receiver has no room for (over its
    # RLIMIT_NOFILE) and flags MSG_CTRUNC: that must be an error, never
    # taken for the end of the connection.
    left, right = socket.socketpair()
    right.settimeout(30)
    files = [os.open(tmp_path, os.O_RDONLY) for _ in range(20)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reader = FrameReader()
    try:
        send_frames(left, [(encode_run_batch(tuple(range(1, 21)), 1, "m", b"", (b"x",) * 20, (((0, 1),),) * 20),
                            files)])  # fmt: skip
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 5, hard))
        with pytest.raises(DescriptorsLost, match="MSG_CTRUNC"):
            reader.recv_from(right, 0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        reader.close()
        for fd in files:
            os.close(fd)
        left.close()
        right.close()


def test_failed_message_carries_any_text():
    tb = "Traceback: bad byte \udcff and \ud800, café"
    msg = Failed(3, 0.5, b"payload", tb)
    frame = encode(msg)
    assert decode(frame[4], frame[5:]) == msg


@linux_only
def test_started_word_crosses_with_setup_and_records_the_job():
    fd, parent_word = LastStarted.create()
    left, right = socket.socketpair()
    right.settimeout(30)
    reader = FrameReader()
    before = _open_fds()
    try:
        assert parent_word.read() == 0  # nothing started yet
        send_frames(left, [setup_frame(fd)])
        os.close(fd)  # the parent keeps its mapping only
        (msg,) = _receive(reader, right)
        assert type(msg) is Setup
        worker_word = LastStarted.attach(msg.started_fd)
        # Each side keeps one descriptor (its mapping's); the one sent, and
        # the one received, are closed.
        assert _open_fds() == before
        worker_word.write(2**40 + 5)
        assert parent_word.read() == 2**40 + 5
        worker_word.close()
        assert _open_fds() == before - 1
        worker_word.write(9)  # closed: a no-op
        assert parent_word.read() == 2**40 + 5
    finally:
        parent_word.close()
        reader.close()
        left.close()
        right.close()
    assert parent_word.read() == UNKNOWN
    assert LastStarted().read() == UNKNOWN


# ------------------------------------------------------------- exceptions


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "custom"])
def test_a_base_exception_crosses_as_an_mlpool_error_naming_it(kind):
    try:
        worker_probe.raise_base_exception({}, kind)
    except BaseException as exc:
        data, tb = pack_exception(exc)
    error = unpack_exception(data, tb)
    assert isinstance(error, MLPoolError)
    name = {"custom": "CustomBaseException"}.get(kind, kind)
    assert name in str(error)


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(SystemExit(3)),  # whatever a worker sends
        pickle.dumps(KeyboardInterrupt()),
        pickle.dumps(worker_probe.ExitOnUnpickle()),  # raises SystemExit as it loads
        pickle.dumps("not an exception"),
        b"garbage",
    ],
    ids=["SystemExit", "KeyboardInterrupt", "raises-on-load", "not-an-exception", "garbage"],
)
def test_whatever_a_worker_sends_as_an_error_the_parent_gets_an_exception(payload):
    error = unpack_exception(payload, "worker traceback")
    assert isinstance(error, Exception)
    assert isinstance(error, RemoteError)
    assert "worker traceback" in str(error.__cause__)


def test_a_payload_raising_system_exit_as_it_loads_is_a_serialization_error():
    with pytest.raises(SerializationError, match="SystemExit"):
        loads(pickle.dumps(worker_probe.ExitOnUnpickle()), "the result of job 1")


@pytest.mark.parametrize("kind", ["lone surrogate", "unpicklable, __str__ raises", "traceback formatting raises"])
def test_awkward_exceptions_are_packed_without_raising(kind):
    try:
        worker_probe.raise_awkward({}, kind)
    except Exception as exc:
        data, tb = pack_exception(exc)
    frame = encode(Failed(1, 0.0, data, tb))  # the text crosses too
    msg = decode(frame[4], frame[5:])
    error = unpack_exception(msg.error, msg.traceback)
    assert isinstance(error, Exception)
    if kind == "lone surrogate":
        assert type(error) is ValueError and "\udcff" in str(error)
    elif kind == "unpicklable, __str__ raises":
        assert isinstance(error, RemoteError) and "UnprintableUnpicklable" in str(error)
    else:
        assert "NotesRaise" in msg.traceback


# --------------------------------------------------------- function table


def score(model, x, *, scale=1):
    return x * scale


class Scorer:
    def predict(self, model, x):
        return x


def test_the_same_function_is_pickled_once():
    table = FunctionTable()
    ids = {table.lookup(score)[0] for _ in range(100)}
    assert len(ids) == 1 and table.pickled == 1


def test_equal_partials_methods_and_lambdas_made_per_call_are_pickled_once():
    table = FunctionTable()
    scorer = Scorer()
    shared = [1, 2, 3]  # not weak-referenceable: held strongly by the entry
    makers = {
        "partial": lambda: functools.partial(score, scale=2),
        "partial of an object": lambda: functools.partial(score, shared),
        "method": lambda: scorer.predict,
        "lambda": lambda: (lambda model, x: x + 1),
        "closure": lambda: (lambda model, x, y=shared: x + y[0]),
    }
    ids = {}
    for name, make in makers.items():
        ids[name] = {table.lookup(make())[0] for _ in range(50)}
        assert len(ids[name]) == 1, name
    assert table.pickled == len(makers)
    assert len(set().union(*ids.values())) == len(makers)  # each its own id


def test_different_partials_and_closures_get_their_own_pickle():
    table = FunctionTable()
    first = table.lookup(functools.partial(score, scale=2))
    second = table.lookup(functools.partial(score, scale=3))
    assert first[0] != second[0] and pickle.loads(second[1])(None, 1) == 3

    def make(n):
        return lambda model, x: x + n

    assert pickle.loads(table.lookup(make(1))[1])(None, 1) == 2
    assert pickle.loads(table.lookup(make(5))[1])(None, 1) == 6
    assert table.pickled == 4


def test_the_table_stays_bounded_under_per_call_functions():
    table = FunctionTable()
    for i in range(3 * FUNCTION_TABLE_SIZE):
        table.lookup(functools.partial(score, scale=i))
        table.lookup(lambda model, x, i=i: x + i)
    assert len(table) <= FUNCTION_TABLE_SIZE
    assert len(table._seen) <= 2 * FUNCTION_TABLE_SIZE


def test_a_dead_objects_reused_id_never_returns_its_pickle():
    table = FunctionTable()

    class Box:
        def __init__(self, n):
            self.n = n

        def read(self, model):
            return self.n

    box = Box(1)
    fn_id, _ = table.lookup(box.read)
    old = id(box)
    del box
    gc.collect()
    boxes = []  # kept alive, so each new one takes another free slot, until one takes the old
    for _ in range(10_000):
        box = Box(2)
        if id(box) == old:
            break
        boxes.append(box)
    else:
        pytest.skip("CPython did not reuse the address")
    new_id, data = table.lookup(box.read)
    assert new_id != fn_id and pickle.loads(data)(None) == 2


def test_lookup_refuses_an_unpicklable_function_clearly():
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="cannot be pickled"):
        FunctionTable().lookup(functools.partial(score, lock))



def test_a_pickle_is_forgotten_once_its_function_is_gone():
    import numpy as np

    table = FunctionTable()
    for _ in range(20):  # per call: a partial over a new 1 MiB array
        table.lookup(functools.partial(score, np.ones(2**17)))
    gc.collect()
    table.lookup(score)
    assert len(table) == 1 and table.nbytes < 2**16


def test_the_table_keeps_a_bounded_number_of_bytes():
    table = FunctionTable(max_bytes=4 * 2**20)
    keep = [functools.partial(score, bytes(2**20) + bytes([i])) for i in range(10)]  # alive, 1 MiB each
    for fn in keep:
        table.lookup(fn)
    assert table.nbytes <= 4 * 2**20 and len(table) <= 4


def test_every_message_kind_has_its_own_number():
    """Two messages sharing a kind would be decoded as each other (it happened when two
    branches each added one)."""
    from mlpool._wire import protocol as _protocol

    kinds = {name: value for name, value in vars(_protocol).items() if name.endswith("_KIND") and type(value) is int}
    assert len(set(kinds.values())) == len(kinds), sorted(kinds.items(), key=lambda item: item[1])
    assert set(kinds.values()) == _protocol.KNOWN_KINDS
