"""share_models: the model template that forks workers, as the manager sees it.

::

    manager thread                                  template process (see _template_main)
      start_if_due ──── spawn ─────────────────────► loads every model once ─► TemplateReady
      request ───────── Fork(worker id) + socket ──► fork ─► WorkerForked (pid, pidfd)
      events(...) ◄──── WorkerForked | ForkFailed | Reaped(pid, code) | TemplateClosed
      (sentinel fires: it died) ─► reap, maybe load a new one after a back-off

Nothing here blocks: a fork is a request whose answer arrives later on the
template's channel, and a forked worker's exit code arrives as ``Reaped``
from the template (its parent), after the worker's pidfd fired. A template
that answers nothing within ``start_timeout`` is killed; an exit code it does
not report within ``EXIT_REPORT_PATIENCE`` is reported unknown.

One owner: :class:`ForkLauncher` keeps the template, its restarts, the fork
requests in flight and the exits waiting for their code. It runs on the
manager thread; the engine acts on what it returns (workers to add, deaths
to settle, failures to count).
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time

from mlpool._processes.launchers import EnvFor, Launched, Launcher, no_env
from mlpool._processes.template import (
    Template,
    TemplateClosed,
    TemplateEvent,
    TemplateGone,
    TemplateState,
    WorkerForked,
)
from mlpool._processes.workers import WorkerHandle, new_worker_id, send_started_word
from mlpool._wire.started import StartedWord
from mlpool._wire.template_protocol import ForkFailed, Reaped
from mlpool._worker.main import WorkerSettings

logger = logging.getLogger("mlpool._engine.engine")

# Seconds a forked worker's exit code may take to come from its template.
EXIT_REPORT_PATIENCE = 2.0


class ForkLauncher(Launcher):
    """The template of one worker group and the workers it is asked to fork."""

    def __init__(
        self,
        group: str,
        context: multiprocessing.context.BaseContext,
        loaders_pickle: bytes,
        settings: WorkerSettings,
        *,
        start_timeout: float,
        fork_with_threads: bool,
        env_for: EnvFor = no_env,
    ) -> None:
        super().__init__(group, context, loaders_pickle, settings, env_for)
        self._start_timeout = start_timeout
        self._fork_with_threads = fork_with_threads
        self.template: Template | None = None
        self.start_at: float | None = time.monotonic()  # when to start the next template
        self.failures = 0  # templates in a row that died or failed to load
        self.announced = False  # the template's readiness was acted on
        self.awaiting: list[int] = []  # indices of the workers due, waiting for a ready template
        # worker id -> our end, its started word and its index in the group, until answered
        self._forks: dict[int, tuple[socket.socket, StartedWord, int]] = {}
        self._exits: dict[int, tuple[WorkerHandle, float]] = {}  # pid -> dead worker, until when we wait

    # ------------------------------------------------- the template itself

    def start_if_due(self, now: float) -> Template | None:
        """Start a template if one is due: the new one (its fd and sentinel
        need watching), or None. Raises what spawning raised."""
        if self.start_at is None or self.start_at > now:
            return None
        self.start_at = None
        self.announced = False
        self.template = Template(
            self._context, self._loaders_pickle, self._settings, fork_with_threads=self._fork_with_threads
        )
        return self.template

    def schedule_restart(self, delay: float) -> None:
        self.start_at = time.monotonic() + delay

    def hurry(self) -> None:
        """Start the next template now (no worker serves while it waits)."""
        if self.template is None and self.start_at is not None:
            self.start_at = min(self.start_at, time.monotonic())

    @property
    def ready(self) -> bool:
        template = self.template
        return template is not None and template.state is TemplateState.READY

    def died(self) -> Launched:
        """The template is gone: forks it never answered will be asked of the
        next one; exits it never reported are settled with an unknown code."""
        self.template = None
        self.announced = False
        outcome = Launched()
        self._abandon_forks()
        for pid in list(self._exits):
            worker, _ = self._exits.pop(pid)
            outcome.exits.append((worker, worker.process.exitcode))
        return outcome

    def close(self) -> None:
        """At the end of the pool: no worker is left; end the template now."""
        self._abandon_forks()
        template, self.template = self.template, None
        if template is not None:
            template.close()
            template.kill()  # it holds no job; a stopped one would not read its end of file
            template.reap()

    # ---------------------------------------------------------------- forks

    def launch(self, index: int) -> None:
        """Ask the template for the worker at ``index``: it arrives through
        ``events``. Without a ready template the request waits for one
        (``awaiting``). Raises OSError when this process is short of
        descriptors or memory for it (a failed start, retried after a back-off)."""
        template = self.template
        if template is None or template.state is not TemplateState.READY:
            self.awaiting.append(index)
            return None
        worker_id = new_worker_id()
        ours, theirs = socket.socketpair()
        try:
            started = send_started_word(ours, close=False)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        try:
            template.request_fork(worker_id, theirs, self._env_for(index))
        except TemplateGone as exc:
            # Its sentinel brings the restart; a template that hangs is made to die.
            logger.warning("could not ask the model template for a worker: %s", exc)
            ours.close()
            started.close()
            template.kill()
            self.awaiting.append(index)
            return None
        finally:
            theirs.close()
        self._forks[worker_id] = (ours, started, index)
        return None

    def take_awaiting(self) -> list[int]:
        """The template is ready: the indices of the workers to request now."""
        indices, self.awaiting = self.awaiting, []
        self.announced = True
        self.failures = 0
        return indices

    def events(self, events: list[TemplateEvent]) -> Launched:
        """Act on what the template sent (``Template.receive``)."""
        outcome = Launched()
        for event in events:
            if type(event) is WorkerForked:
                request = self._forks.pop(event.worker_id, None)
                if request is None:  # a request given up on: nobody serves its socket
                    event.process.kill()
                    event.process.close()
                else:
                    if self.template is not None:
                        _warn_threads(self.template)
                    ours, started, index = request
                    try:
                        worker = WorkerHandle(event.process, ours, forked=True, started=started, stacks=True)
                        worker.group, worker.index = self.group, index
                        outcome.started.append(worker)
                    except OSError as exc:  # out of descriptors for its handle: a failed start
                        event.process.kill()
                        event.process.close()
                        ours.close()
                        started.close()
                        outcome.failed.append((index, f"could not take a forked worker in: {exc!r}"))
            elif type(event) is ForkFailed:
                request = self._forks.pop(event.worker_id, None)
                if request is not None:  # else given up on: its index is awaiting already
                    request[0].close()
                    request[1].close()
                    outcome.failed.append((request[2], f"the model template could not fork a worker: {event.error}"))
            elif type(event) is Reaped:
                waiting = self._exits.pop(event.pid, None)
                if waiting is not None:
                    outcome.exits.append((waiting[0], event.exitcode))
            elif type(event) is TemplateClosed:
                self._abandon_forks()
        return outcome

    def _abandon_forks(self) -> None:
        for ours, started, index in self._forks.values():
            ours.close()
            started.close()
            self.awaiting.append(index)
        self._forks.clear()

    # ------------------------------------------------------ deaths, deadlines

    def await_exit_code(self, worker: WorkerHandle, now: float) -> bool:
        """A forked worker died: its code comes from its template (Reaped), if that still runs."""
        if self.template is None:
            return False
        self._exits[worker.pid] = (worker, now + EXIT_REPORT_PATIENCE)
        return True

    def overdue_exits(self, now: float) -> list[tuple[WorkerHandle, int | None]]:
        """Deaths whose code did not come in time: settled as unknown."""
        overdue = [pid for pid, (_, until) in self._exits.items() if until <= now]
        return [(self._exits.pop(pid)[0], None) for pid in overdue]

    def hung(self, now: float) -> bool:
        """A fork request was not answered within start_timeout: kill the template."""
        template = self.template
        since = None if template is None else template.pending_since()
        return since is not None and now - since >= self._start_timeout

    def next_deadline(self) -> float | None:
        candidates = [until for _, until in self._exits.values()]
        if self.start_at is not None:
            candidates.append(self.start_at)
        template = self.template
        since = None if template is None else template.pending_since()
        if since is not None:
            candidates.append(since + self._start_timeout)
        return min(candidates, default=None)


def _warn_threads(template: Template) -> None:
    if template.threads_at_fork and not template.warned:
        template.warned = True
        logger.warning(
            "the model template ran other threads when it forked a worker (%s); a fork copies only "
            "the calling thread, and a library whose threads hold a lock or must exist can hang in "
            "the workers. Loaders should not start threads, nor run parallel work with their own "
            "thread settings (XGBoost n_jobs, joblib n_jobs): see 'Sharing models' in docs/reference.md",
            ", ".join(template.threads_at_fork),
        )
