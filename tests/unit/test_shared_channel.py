"""The framing between API processes and a pool host: whole messages, in order, with their descriptors."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from mlpool._shared.channel import Channel, Outbox

pytestmark = pytest.mark.timeout(60)


def test_an_outbox_keeps_every_message_whole_and_in_order_when_the_socket_fills():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # most sends are partial
    outbox = Outbox(Channel(ours), "test-outbox")
    reader = Channel(theirs)
    per_thread = 200

    def flood(thread: int) -> None:
        for i in range(per_thread):
            read_end, write_end = os.pipe()
            os.write(write_end, f"{thread}:{i}".encode())
            os.close(write_end)
            outbox.put((0, 1, thread, i, bytes([i % 256]) * (i * 97 % 20000)), [read_end])  # the outbox closes it

    threads = [threading.Thread(target=flood, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    seen = dict.fromkeys(range(3), -1)
    received = 0
    while received < 3 * per_thread:
        messages = reader.receive()
        assert messages is not None
        for (_, nfds, thread, i, body), fds in messages:
            assert nfds == 1 and len(fds) == 1
            assert body == bytes([i % 256]) * (i * 97 % 20000)  # whole
            assert os.read(fds[0], 100) == f"{thread}:{i}".encode()  # its own descriptor
            os.close(fds[0])
            assert i == seen[thread] + 1  # in order
            seen[thread] = i
            received += 1
    for thread in threads:
        thread.join()
    outbox.close()
    outbox.join(5)
    reader.close()
    ours.close()


def test_a_frame_longer_than_allowed_is_refused_before_it_is_read():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = Channel(theirs, max_frame=1024)
    ours.sendall((2**31).to_bytes(4, "little") + b"x" * 100)
    with pytest.raises(ValueError, match="more than the 1024"):
        reader.receive()
    reader.close()
    ours.close()
