"""Wire messages of the model template's channel (share_models): see ``_processes.template``
(the parent's handle) and ``_worker.template_main`` (the template's side).

A ``SOCK_SEQPACKET`` socket: one pickled message per packet (they are rare:
one per fork and per worker exit), descriptors attached with ``SCM_RIGHTS``
(``_wire.transport.send_packet`` / ``recv_packet``). The template also sends
``_wire.protocol.LoadFailed`` when a loader raises. Imports nothing from mlpool
but ``_wire.protocol``: the template's side imports it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlpool._wire.protocol import LoadFailed


@dataclass(frozen=True, slots=True)
class TemplateReady:
    """Template -> parent: every model is loaded; it forks from now on."""

    pid: int
    load_seconds: float


@dataclass(frozen=True, slots=True)
class SpawnSentinel:
    """Parent -> template: the inode of the pipe whose write end the template
    holds so that the parent sees it exit (multiprocessing's sentinel): forked
    workers close it, or the template's death would go unseen."""

    inode: int


@dataclass(frozen=True, slots=True)
class Fork:
    """Parent -> template: fork a worker; its end of the worker's socket comes
    along. ``env``: set in the worker's environment after the fork (worker_env)."""

    worker_id: int
    env: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Forked:
    """Template -> parent: the worker's pid; its death handle comes along (a
    pidfd, which no descendant of the worker can hold open; a pipe only the
    worker holds where pidfds are missing). ``threads``: native threads the
    template ran at the fork (libraries' pools), for a warning."""

    worker_id: int
    pid: int
    threads: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ForkFailed:
    """Template -> parent: the fork (or its death handle) failed, e.g. out of processes."""

    worker_id: int
    error: str


@dataclass(frozen=True, slots=True)
class Reaped:
    """Template -> parent: a worker it forked exited; ``exitcode`` as
    multiprocessing gives it (negative: killed by that signal)."""

    pid: int
    exitcode: int


ToTemplate = Fork | SpawnSentinel
FromTemplate = TemplateReady | LoadFailed | Forked | ForkFailed | Reaped
