"""share_models: the model template that forks workers, as the manager sees it.

::

    manager thread                                  template process (see _worker.template_main)
      due(now) ──────── spawn ─────────────────────► loads every model once ─► TemplateReady
      launch(index) ─── Fork(worker id) + socket ──► fork ─► WorkerForked (pid, pidfd)
      _on_read(...) ◄── WorkerForked | ForkFailed | Reaped(pid, code) | TemplateClosed
      _on_exit(...) ◄── its sentinel fires: reap it, a Setback, a new one after a back-off

Nothing here blocks: a fork is a request whose answer arrives later on the
template's channel, and a forked worker's exit code arrives as ``Reaped``
from the template (its parent), after the worker's pidfd fired. A template
that loads nothing or answers no fork request within ``start_timeout`` is
killed; an exit code it does not report within ``EXIT_REPORT_PATIENCE`` is
reported unknown.

One owner: :class:`ForkLauncher` keeps the template, its restarts (each
failure in a row doubles the back-off, see ``launchers.backoff``), its
timeouts, the fork requests in flight and the exits waiting for their code.
It runs on the manager thread; the supervisor acts on what it returns
(:class:`~mlpool._processes.launchers.Launched`: workers to add, deaths to
settle, failed starts, a setback that may take the group down).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import socket
import time

from mlpool._processes.launchers import Exit, Launched, Recipe, Setback, Watched, backoff
from mlpool._processes.template import (
    LoadFailed,
    Template,
    TemplateClosed,
    TemplateEvent,
    TemplateGone,
    TemplateState,
    WorkerForked,
)
from mlpool._processes.workers import WorkerHandle, describe_exit, new_worker_id, send_started_word
from mlpool._wire.started import LastStarted
from mlpool._wire.template_protocol import ForkFailed, Reaped

logger = logging.getLogger("mlpool._engine.engine")

# Seconds a forked worker's exit code may take to come from its template.
EXIT_REPORT_PATIENCE = 2.0


class ForkLauncher:
    """The template of one worker group, its restarts, and the workers it is asked to fork."""

    def __init__(
        self, recipe: Recipe, context: multiprocessing.context.BaseContext, *, fork_with_threads: bool
    ) -> None:
        self.recipe = recipe
        self._context = context
        self._fork_with_threads = fork_with_threads
        self.template: Template | None = None
        self.start_at: float | None = time.monotonic()  # when to start the next template
        self.failures = 0  # templates in a row that died or failed to load
        self.announced = False  # the template's readiness was acted on
        self.awaiting: list[int] = []  # indices of the workers due, waiting for a ready template
        # worker id -> our end, its started word and its index in the group, until answered
        self._forks: dict[int, tuple[socket.socket, LastStarted, int]] = {}
        self._exits: dict[int, tuple[WorkerHandle, float]] = {}  # pid -> dead worker, until when we wait

    @property
    def _start_timeout(self) -> float:
        return self.recipe.start_timeout  # a reload's own, until it commits (see _processes.rollout)

    def renewed(self, recipe: Recipe) -> ForkLauncher:
        """A launcher of a new version: its template starts at the next ``due``."""
        return ForkLauncher(recipe, self._context, fork_with_threads=self._fork_with_threads)

    def prepare(self) -> None:
        """Nothing to prepare: the first template starts when ``due``."""

    def pending(self) -> list[int]:
        """Workers waiting for a ready template, and forks asked and not answered."""
        return self.awaiting + [index for _, _, index in self._forks.values()]

    def withdraw(self) -> list[int]:
        """Forget the forks asked (a WorkerForked for one is killed) and those waiting: their indices."""
        self._abandon_forks()
        indices, self.awaiting = self.awaiting, []
        return indices

    def describe(self, worker: WorkerHandle, exitcode: int | None) -> str:
        return describe_exit(exitcode)

    # ------------------------------------------------- the template itself

    @property
    def ready(self) -> bool:
        """Whether a template takes fork requests now."""
        template = self.template
        return template is not None and template.state is TemplateState.READY

    def due(self, now: float, *, may_start: bool) -> Launched | None:
        """Kill a template past its timeouts; settle the deaths whose code did
        not come in time; start a template if one is due (and ``may_start``)."""
        self._check_timeouts(now)
        overdue = [pid for pid, (_, until) in self._exits.items() if until <= now]
        launched = Launched(exits=[(self._exits.pop(pid)[0], None) for pid in overdue]) if overdue else None
        if not may_start:  # the pool broke or closed: no template starts again
            self.start_at = None
        elif self.start_at is not None and self.start_at <= now:
            launched = launched or Launched()
            self._start(launched)
        return launched

    def _start(self, launched: Launched) -> None:
        self.start_at = None
        self.announced = False
        try:
            recipe = self.recipe
            template = self.template = Template(
                self._context, recipe.loaders_pickle, recipe.settings, fork_with_threads=self._fork_with_threads
            )
        except Exception as exc:
            logger.exception("could not start the model template process")
            launched.setback = self._failed(f"could not start the model template process: {exc!r}")
            return
        on_read, on_exit = functools.partial(self._on_read, template), functools.partial(self._on_exit, template)
        launched.watch.append(Watched(template.fd, template.sentinel, on_read, on_exit))

    def _check_timeouts(self, now: float) -> None:
        """A template that loads nothing, or answers no fork request, within start_timeout is killed."""
        template = self.template
        if template is None:
            return
        loading = template.state is TemplateState.LOADING
        if loading and not template.start_timed_out and now - template.started_at >= self._start_timeout:
            template.start_timed_out = True
            template.kill()  # its exit counts as a failure (_on_exit)
        elif (since := template.pending_since()) is not None and now - since >= self._start_timeout:
            logger.warning("the model template (pid %d) answered no fork request within start_timeout=%gs; "
                           "killing it", template.pid, self._start_timeout)  # fmt: skip
            template.kill()

    def _failed(self, reason: str, unloaded: tuple[str, str, LoadFailed | None] | None = None) -> Setback:
        """A template failed: the next one starts after a back-off that grows with the failures in a row."""
        self.failures += 1
        delay = backoff(self.failures)
        self.start_at = time.monotonic() + delay
        return Setback(reason, self.failures, delay, "the model template", "loading the models in a new template",
                       unloaded)  # fmt: skip

    def _on_read(self, template: Template, now: float) -> Launched | None:
        """The template's channel is readable: what it sent."""
        launched = self._events(template.receive())
        if self.ready and not self.announced:  # it just became ready: the requests that waited go now
            launched.launch = self._take_awaiting()
        return launched

    def _on_exit(self, template: Template, now: float) -> Launched:
        """The template exited: reap it. Workers it forked keep serving; the
        deaths it never reported are settled now, with an unknown code."""
        launched = self._events(template.receive())
        how = describe_exit(template.reap())
        if template.start_timed_out:
            how = f"did not load the models within {self.recipe.timeout_name}={self._start_timeout:g}s"
        self.template = None
        self.announced = False
        self._abandon_forks()
        launched.exits += [(worker, worker.process.exitcode) for worker, _ in self._exits.values()]
        self._exits.clear()
        who = f"the model template (pid {template.pid})"
        failure = template.load_failure
        if failure is not None:
            reason = f"{who} failed to load model {failure.model!r}: {failure.error}\n{failure.traceback}"
        else:
            reason = f"{who} {how}"
        launched.setback = self._failed(reason, (who, how, failure) if template.load_seconds is None else None)
        return launched

    def close(self) -> None:
        """At the end of the pool: no worker is left; end the template now."""
        self._abandon_forks()
        template, self.template = self.template, None
        if template is not None:
            template.close()
            template.kill()  # it holds no job; a stopped one would not read its end of file
            template.reap()

    # ---------------------------------------------------------------- forks

    def launch(self, index: int, *, serving: bool) -> None:
        """Ask the template for the worker at ``index``: it arrives in a
        Launched from the template's channel. Without a ready template the
        request waits for one (``awaiting``), which starts at once if nothing
        serves. Raises OSError when this process is short of descriptors or
        memory for it (a failed start, retried after a back-off)."""
        template = self.template
        if template is None or template.state is not TemplateState.READY:
            self.awaiting.append(index)
            if not serving and template is None and self.start_at is not None:  # no need to wait out a back-off
                self.start_at = min(self.start_at, time.monotonic())
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
            template.request_fork(worker_id, theirs, self.recipe.env_for(index))
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

    def _take_awaiting(self) -> list[int]:
        """The template is ready: the indices of the workers to request now."""
        indices, self.awaiting = self.awaiting, []
        self.announced = True
        self.failures = 0
        return indices

    def _events(self, events: list[TemplateEvent]) -> Launched:
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
                        outcome.started.append(self.recipe.adopt(worker, index))
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
        """Forks the template will never answer: asked of the next one."""
        for ours, started, index in self._forks.values():
            ours.close()
            started.close()
            self.awaiting.append(index)
        self._forks.clear()

    # ------------------------------------------------------ deaths, deadlines

    def reap(self, worker: WorkerHandle, now: float) -> Exit | None:
        """A forked worker died: its code comes from its template (Reaped), if that still runs."""
        exitcode = worker.reap()
        if exitcode is not None or self.template is None:
            return worker, exitcode
        self._exits[worker.pid] = (worker, now + EXIT_REPORT_PATIENCE)
        return None

    def next_deadline(self) -> float | None:
        """The earliest of: an exit code's patience, the next template's start, a template's start_timeout."""
        candidates = [until for _, until in self._exits.values()]
        if self.start_at is not None:
            candidates.append(self.start_at)
        template = self.template
        if template is not None:
            if template.state is TemplateState.LOADING and not template.start_timed_out:
                candidates.append(template.started_at + self._start_timeout)
            since = template.pending_since()
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
