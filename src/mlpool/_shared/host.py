"""The pool host: a process of its own that holds the pool several API processes share.

Started by the first API process to arrive (``_shared.rendezvous``), as
``python -c "from mlpool._shared.host import main; main()" <status fd>``, in
a session of its own: an API process that exits, is recycled or crashes
takes nothing down, and a Ctrl-C sent to the server's process group reaches
the API processes, whose leaving ends the host.

::

    main: read the HostSpec (stdin) ─► MLPool(**options): the workers load
          ─► listen ─► "ok" on the status pipe (or the error, then exit)
          ─► wait: no API process for ``grace`` seconds (or SIGTERM)
          ─► refuse newcomers, unlink the socket, shut the pool down, exit
    accept thread: a connection ─► its peer's uid checked before anything is read
                   ─► a Relay thread (_shared.relay): HELLO ─► admitted or refused

The host's workers watch the host as any pool's workers watch their parent:
a host that is killed takes them with it.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from typing import Any

import cloudpickle

from mlpool._shared.channel import Channel
from mlpool._shared.protocol import HELLO, MAX_HELLO, PROTOCOL_VERSION, REFUSED, RELOADED, SHARE, WELCOME
from mlpool._shared.relay import Relay
from mlpool._shared.rendezvous import peer_uid
from mlpool._shared.spec import HostSpec, PickledLoader

logger = logging.getLogger("mlpool.shared")

FIRST_ATTACH = 30.0  # seconds a new host waits for its first API process (HANDSHAKE_TIMEOUT)

def fingerprint_difference(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    """A sentence naming what differs between two pools' fingerprints, or None."""
    names = sorted(set(ours) | set(theirs))
    differ = [name for name in names if ours.get(name) != theirs.get(name)]
    if not differ:
        return None
    parts = [f"{name}: the pool host has {ours.get(name, '(none)')}, this process asks for "
             f"{theirs.get(name, '(none)')}" for name in differ]  # fmt: skip
    return "; ".join(parts)


class Host:
    """The listening socket, the relays of the API processes, and the end."""

    def __init__(self, pool: Any, listener: socket.socket, spec: HostSpec) -> None:
        self.pool = pool
        self.engine = pool._manager
        self._listener = listener
        self._spec = spec
        self._cond = threading.Condition()
        self._relays: set[Relay] = set()
        # Until the first API process attaches, at least FIRST_ATTACH seconds (its starter
        # connects once we listen; if it died, the next one may take a moment).
        self._idle_since: float | None = time.monotonic() + max(0.0, FIRST_ATTACH - spec.grace)
        self._ending = False
        self._stop = False
        self._reloaded: dict[str, bytes] = {}  # loaders reload_models put in place (WELCOME carries them)
        self._ids = itertools.count(1)
        self._function_ids = itertools.count(1)
        self.now = time.monotonic

    def next_id(self) -> int:
        return next(self._ids)

    def next_function_id(self) -> int:
        return next(self._function_ids)

    # ------------------------------------------------------------ connections

    def accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the host is ending
                return
            try:
                pid, uid = peer_uid(conn)
            except OSError:
                conn.close()
                continue
            if uid != os.getuid():  # nothing is read from another user's process
                logger.warning("mlpool pool host: refused a connection from uid %d (pid %d)", uid, pid)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, pid), name=f"mlpool-host-{pid}", daemon=True).start()

    def _serve(self, conn: socket.socket, pid: int) -> None:
        channel = Channel(conn, max_frame=MAX_HELLO)
        try:
            conn.settimeout(30.0)  # a peer that connects and says nothing does not hold a thread forever
            messages = channel.receive()
            conn.settimeout(None)
        except Exception as exc:  # garbage, a timeout, a broken connection: this peer only
            logger.warning("mlpool pool host: dropped a connection of pid %d before its hello: %r", pid, exc)
            channel.close()
            return
        channel.max_frame = None
        if not messages or messages[0][0][0] != HELLO:
            channel.close()
            return
        (hello_msg, _), rest = messages[0], messages[1:]
        hello = hello_msg[2]
        refusal = self._refusal(hello)
        if refusal is not None:
            self._refuse(channel, refusal)
            return
        relay = Relay(self, channel, pid)
        with self._cond:
            if self._ending:
                self._refuse(channel, None)
                return
            self._relays.add(relay)
            self._idle_since = None
            count = len(self._relays)
            others = [r for r in self._relays if r is not relay]
        welcome = {
            "host_pid": os.getpid(), "processes": count, "slots": self._slots(),
            "max_queue_size": self.pool._config.max_queue_size, "reloaded": dict(self._reloaded),
        }  # fmt: skip
        relay.outbox.put((WELCOME, 0, welcome))
        for other in others:
            other.outbox.put((SHARE, 0, count))
        logger.info("API process %d attached to the pool host (%d now)", pid, count)
        relay.serve(rest)

    def _refusal(self, hello: Any) -> str | None:
        if type(hello) is not dict or hello.get("version") != PROTOCOL_VERSION:
            return "this API process runs another version of mlpool than the pool host"
        difference = fingerprint_difference(self._spec.fingerprint, hello.get("fingerprint") or {})
        if difference is not None:
            return (f"another pool is shared under this name ({self._spec.key}) with other settings: "
                    f"{difference}")  # fmt: skip
        return None

    @staticmethod
    def _refuse(channel: Channel, message: str | None) -> None:
        try:
            channel.send((REFUSED, 0, message))
        except OSError:
            pass
        channel.close()

    def _slots(self) -> int:
        return sum(group.size for group in self.engine._supervisor.groups.values())

    def ended(self, relay: Relay) -> None:
        """A relay's API process went."""
        with self._cond:
            if relay not in self._relays:
                return
            self._relays.discard(relay)
            count = len(self._relays)
            if not count:
                self._idle_since = time.monotonic()
            others = list(self._relays)
            self._cond.notify_all()
        for other in others:
            other.outbox.put((SHARE, 0, count))

    # ------------------------------------------------------------ calls

    def call(self, operation: str, arguments: tuple) -> Any:
        if operation == "stats":
            return self.pool.stats()
        if operation == "worker_stacks":
            return self.pool.worker_stacks(timeout=arguments[0])
        if operation == "reload":
            loaders, timeout, surge = arguments
            models = None if loaders is None else {name: PickledLoader(data) for name, data in loaders.items()}
            self.pool.reload_models(models, timeout=timeout, surge=surge)
            if loaders:  # every API process starts a later host with these, and so will newcomers
                with self._cond:
                    self._reloaded.update(loaders)
                    relays = list(self._relays)
                for relay in relays:
                    relay.outbox.put((RELOADED, 0, loaders))
            return None
        raise ValueError(f"unknown operation {operation!r}")

    # ------------------------------------------------------------ the end

    def stop(self, *_: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def run_until_idle(self) -> None:
        """Return once no API process was attached for ``grace`` seconds (or on SIGTERM)."""
        grace = self._spec.grace
        with self._cond:
            while not self._stop:
                if self._idle_since is None:
                    self._cond.wait()
                    continue
                left = self._idle_since + grace - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._ending = True
        try:
            os.unlink(self._spec.socket_path)  # first: the next API process starts a new host
        except FileNotFoundError:
            pass
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._cond:
            relays = list(self._relays)
        for relay in relays:  # SIGTERM with API processes attached: their jobs fail, they start a new host
            try:
                relay.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    """The host process's entry point (see the module docstring)."""
    status_fd, lock_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)
    os.set_inheritable(lock_fd, False)  # our share of the starter's lock, released once we listen
    _more_descriptors()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its API processes' Ctrl-C ends them, and so the host
    spec: HostSpec = pickle.loads(sys.stdin.buffer.read())  # from the API process that started us
    sys.path[:] = spec.sys_path
    logging.basicConfig(level=logging.WARNING, format="mlpool pool host %(process)d: %(message)s")
    try:
        from mlpool._api.pool import MLPool

        options = spec.pool_options()
        # Between the API processes and the workers: an API process gets the CPU at once
        # when it wants it, the host before any worker (whose niceness stays the pool's).
        nice = options.get("worker_nice", 5) // 2
        if nice and hasattr(os, "nice"):
            os.nice(nice)
            options["worker_nice"] -= nice
        pool = MLPool(**options)
    except BaseException as exc:
        _report(status_fd, exc)
        raise SystemExit(1) from None
    try:
        listener = _listen(spec.socket_path)
    except BaseException as exc:
        pool.shutdown()
        _report(status_fd, exc)
        raise SystemExit(1) from None
    host = Host(pool, listener, spec)
    signal.signal(signal.SIGTERM, host.stop)
    threading.Thread(target=host.accept_forever, name="mlpool-host-accept", daemon=True).start()
    os.close(lock_fd)
    try:
        os.write(status_fd, b"ok")
    except BrokenPipeError:  # the starter died: the next process to arrive attaches, else the grace ends us
        pass
    os.close(status_fd)
    try:
        host.run_until_idle()
    finally:
        pool.shutdown(wait=True, cancel_pending=True)


def _more_descriptors() -> None:
    """Raise our soft limit of open files to the hard one: the host holds one
    or two descriptors (shared memory) for each queued job of every API process."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            listener.bind(path)  # 0600: the directory is 0700 already
        finally:
            os.umask(old)
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener


def _report(fd: int, exc: BaseException) -> None:
    try:
        data = cloudpickle.dumps(exc)
    except Exception:
        data = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
