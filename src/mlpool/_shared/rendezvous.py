"""Where API processes find their pool host, and how the first one starts it.

::

    <runtime dir>/mlpool-<uid>/        0700, ours (refused otherwise)
        <key>.lock                     flock: one process attaches or starts at a time
        <key>.sock                     the host's listening socket, 0600

``<key>`` is a hash of the name: ``share_across_processes=True`` names the
parent process (the uvicorn or gunicorn master) and the models, a string
names itself. An API process takes the lock, connects, and says hello with
its pool's fingerprint; if nothing listens (no file, or a host that died and
left it), it starts a host, waits until its workers loaded their models,
then connects. Two processes arriving at once are serialised by the lock:
the second finds the first one's host. A host that is ending refuses the
hello, and the process starts over (it ends unlinking the socket first, so
the next one starts a new host).

Security: the directory is the user's own (0700), the host checks each
peer's uid (``SO_PEERCRED``) before it reads anything, and the API process
checks the host's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from mlpool._shared.channel import Channel
from mlpool._shared.protocol import HELLO, REFUSED, WELCOME
from mlpool.errors import PoolBrokenError, PoolMismatchError

_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid
HANDSHAKE_TIMEOUT = 30.0  # seconds a live host has to answer a hello
ATTEMPTS = 5  # hosts found ending in a row before giving up


@dataclass(frozen=True)
class Address:
    key: str  # what the processes agree on (shown in errors)
    socket_path: str
    lock_path: str


def address(share: bool | str, models: list[str]) -> Address:
    """Where the pool named by ``share_across_processes`` lives, for this process."""
    if share is True:  # the program too: two programs one shell started share nothing
        program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        key = f"parent {os.getppid()}, program {program}, models {','.join(sorted(models))}"
    else:
        key = f"name {share}"
    directory = runtime_dir()
    stem = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return Address(key, os.path.join(directory, stem + ".sock"), os.path.join(directory, stem + ".lock"))


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/mlpool-<uid>`` (else in the temp directory), made 0700
    if missing; a PermissionError if it is not a directory of ours that only we can enter."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isdir(base):
        base = tempfile.gettempdir()
    path = os.path.join(base, f"mlpool-{uid}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise PermissionError(
            f"{path} must be a directory owned by this user (uid {uid}) with mode 0700 "
            f"(found uid {info.st_uid}, mode {oct(stat.S_IMODE(info.st_mode))}); remove it or fix it"
        )
    return path


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """The (pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    return pid, uid


@dataclass
class Attached:
    channel: Channel
    welcome: dict[str, Any]  # host_pid, processes, slots, and what the host serves
    started: subprocess.Popen | None  # the host, if this process started it


def attach(where: Address, hello: dict[str, Any], spec: bytes) -> Attached:
    """Connect to the host of ``where``, starting it if none lives. ``hello``:
    what this process asks for (its fingerprint); ``spec``: what a new host
    needs (``_shared.host.HostSpec``, pickled). Raises PoolMismatchError (a
    mismatch), ModelLoadError and the like (a new host failed to start),
    PoolBrokenError (a host that never answered)."""
    for _ in range(ATTEMPTS):
        with _locked(where.lock_path) as lock_fd:
            started = None
            sock = _connect(where.socket_path)
            if sock is None:
                started = _start_host(where, spec, lock_fd)
                sock = _connect(where.socket_path)
                if sock is None:
                    raise PoolBrokenError(f"the pool host ({where.key}) started but does not listen")
            try:
                welcome = _handshake(sock, hello)
            except BaseException:
                sock.close()
                raise
        if welcome is not None:
            return Attached(Channel(sock), welcome, started)
        sock.close()  # the host was ending: start over
    raise PoolBrokenError(f"the pool host ({where.key}) kept ending while this process attached")


class _locked:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __enter__(self) -> int:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            raise
        return self._fd

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock


def _connect(path: str) -> socket.socket | None:
    """A connection to a live host; None if nothing listens (a stale socket
    file is removed: we hold the lock, so no host is starting)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    except BaseException:
        sock.close()
        raise
    _, uid = peer_uid(sock)
    if uid != os.getuid():
        sock.close()
        raise PermissionError(f"{path} is served by uid {uid}, not this user: refusing to use it")
    return sock


def _handshake(sock: socket.socket, hello: dict[str, Any]) -> dict[str, Any] | None:
    """Say hello; the host's welcome, or None if it is ending."""
    channel = Channel(sock)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        channel.send((HELLO, 0, hello))
        messages = channel.receive()
    except TimeoutError:
        raise PoolBrokenError(
            f"the pool host did not answer within {HANDSHAKE_TIMEOUT:.0f} s (stopped or hung?)"
        ) from None
    except (ConnectionError, ValueError):
        return None  # closed under us: it was ending
    finally:
        sock.settimeout(None)
    if not messages:
        return None
    (msg, _), *rest = messages
    if msg[0] == REFUSED:
        if msg[2] is None:
            return None
        raise PoolMismatchError(msg[2])
    if msg[0] != WELCOME or rest:
        raise PoolBrokenError(f"the pool host answered a hello with message kind {msg[0]}")
    welcome: dict[str, Any] = msg[2]
    return welcome


def _start_host(where: Address, spec: bytes, lock_fd: int) -> subprocess.Popen:
    """Start a pool host and wait until its pool started (or failed: its error is raised here).

    The host shares our hold of the lock (``lock_fd``) until it listens: if
    this process dies meanwhile, the next one waits for this host instead of
    starting another."""
    read_fd, write_fd = os.pipe()
    try:
        host = subprocess.Popen(
            [sys.executable, "-c", "from mlpool._shared.host import main; main()", str(write_fd), str(lock_fd)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(write_fd, lock_fd), start_new_session=True,
            close_fds=True,
        )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    os.close(write_fd)
    try:
        assert host.stdin is not None
        try:
            host.stdin.write(spec)
            host.stdin.close()
        except BrokenPipeError:
            pass
        with os.fdopen(read_fd, "rb") as status:
            report = status.read()  # the host closes it once started, or dies
    except BaseException:
        host.kill()
        host.wait()
        raise
    if report == b"ok":  # reaped when it ends (it may outlive our use of it: no zombie meanwhile)
        threading.Thread(target=host.wait, name="mlpool-host-reaper", daemon=True).start()
        return host
    code = host.wait()
    if report:
        error = pickle.loads(report)  # from our own child, through our own pipe
        if isinstance(error, BaseException):
            raise error
    raise PoolBrokenError(f"the pool host ({where.key}) exited with code {code} while starting")
