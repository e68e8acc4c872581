"""OpenTelemetry spans for jobs (the extra ``otel``: the API package only).

::

    caller thread: make a job ─► begin(): a span is current and recording?
                                   no ─► None (the only cost: one context look-up)
                                   yes ─► JobTrace: the caller's context, the wall
                                          and monotonic clocks at creation
    engine: dispatch ─► JobTrace.sent(pid): the monotonic time and the worker
    worker: Done/Failed carry the call's start and end (time.monotonic())
    engine, outside its lock, as the outcome is decoded ─► end(): the job's span,
          child of the caller's, built after the fact:

      <function name>   job created ─────────────────────────────────► outcome
        event mlpool.dispatched           ▲ sent to the worker
        mlpool.execute (a child span)          began ──► ended  (the function)
        event mlpool.returned                                  ▲ result decoded
      attributes mlpool.queue_seconds (created ─► sent), mlpool.transfer_seconds
      (sent ─► began plus ended ─► decoded: the pipe, pickling both ways),
      mlpool.execute_seconds (began ─► ended)

Two spans per job, not one per phase: with the SDK a span costs tens of
microseconds, as much as a tiny job (``bench/overhead.py`` measures it).

Every span is started and ended at once, with explicit times: nothing is
open while a job runs, so a job that never ends (a pool dropped) leaves
nothing behind. The worker needs no tracing SDK: on Linux
``time.monotonic()`` is the same clock in every process of the machine, so
its stamps convert to wall time through the pair taken at creation. Stamps
that fall outside the job's life (a Ray actor on another machine) are not
used: the job's span alone is recorded.

One span per job, batched jobs included (their execution spans share the
batch's call). A stream is one job: its span runs from its creation to
its StreamEnd (or error), with the dispatched and returned events; StreamEnd
carries no call stamps, so there is no ``mlpool.execute`` child.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlpool._engine.jobs import Job

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
except ImportError:  # the extra is not installed: begin() is a constant
    otel_trace = None  # type: ignore[assignment]


def _span_lookup() -> Any:
    """``(runtime context, its context variable, span key)`` where the API
    keeps the current span in a context variable (its default runtime
    context), else None. With them, "is a span current?" costs two C calls
    instead of six Python calls per job, for as long as that runtime context
    is the API's (one replaced later takes the public path)."""
    try:
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        from opentelemetry.trace.propagation import _SPAN_KEY

        runtime = otel_context._RUNTIME_CONTEXT
        if type(runtime) is ContextVarsRuntimeContext:
            return runtime, runtime._current_context, _SPAN_KEY
    except (ImportError, AttributeError):  # another version of the API
        pass
    return None


_lookup = None if otel_trace is None else _span_lookup()

__all__ = ["JobTrace", "begin", "end"]

_tracer: Any = None


class JobTrace:
    """What a traced job's span is built from (parent side only)."""

    __slots__ = ("context", "start_ns", "start_mono", "sent_at", "pid", "retries")

    def __init__(self, context: Any, retries: int) -> None:
        self.context = context  # the caller's OpenTelemetry context: the parent span
        self.start_mono = time.monotonic()
        self.start_ns = time.time_ns()
        self.sent_at = 0.0  # monotonic, at the job's last dispatch
        self.pid = 0  # the worker that ran it last
        self.retries = retries  # retries left at creation

    def sent(self, pid: int) -> None:
        """The job goes to worker ``pid`` now (under the engine's lock)."""
        self.sent_at = time.monotonic()
        self.pid = pid

    def wall_ns(self, mono: float) -> int:
        return self.start_ns + int((mono - self.start_mono) * 1e9)


def begin(retries: int) -> JobTrace | None:
    """At job creation, in the caller's thread: a JobTrace if a span is
    current and recording there, else None (every other hook then costs one
    ``is None``). ``retries``: the job's max_retries."""
    if otel_trace is None:
        return None
    if _lookup is not None:
        runtime, current, key = _lookup
        if otel_context._RUNTIME_CONTEXT is runtime and current.get().get(key) is None:
            return None  # no span current: the common case
    if not otel_trace.get_current_span().is_recording():
        return None
    return JobTrace(otel_context.get_current(), retries)


def end(job: Job, reply: Any, ok: bool, value: Any, outcome: str) -> None:
    """Record ``job``'s span, now that its outcome is known (outside any lock).

    ``reply``: the worker's Done or Failed (its stamps), or None; ``ok`` and
    ``value``: the decoded result or the exception (or CANCELLED);
    ``outcome``: completed, failed, crashed, timed_out or cancelled. Never
    raises: tracing must not change a job's outcome.
    """
    trace = job.trace
    if trace is None:
        return
    try:
        _record(job, trace, reply, ok, value, outcome)
    except Exception:  # a broken exporter or provider: the job is not its business
        import logging

        logging.getLogger(__name__).debug("could not record the span of job %d", job.id, exc_info=True)


def _record(job: Job, trace: JobTrace, reply: Any, ok: bool, value: Any, outcome: str) -> None:
    global _tracer
    if _tracer is None:
        from mlpool import __version__

        _tracer = otel_trace.get_tracer("mlpool", __version__)
    now = time.monotonic()
    attributes = {
        "mlpool.model": job.model,
        "mlpool.function": job.fn_name,
        "mlpool.job_id": job.key or str(job.id),
        "mlpool.worker.pid": trace.pid or os.getpid(),
        "mlpool.retries": trace.retries - job.retries_left,
        "mlpool.outcome": outcome,
    }
    span = _tracer.start_span(
        job.fn_name, context=trace.context, start_time=trace.start_ns, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    )  # fmt: skip
    sent = trace.sent_at
    if sent:
        span.add_event("mlpool.dispatched", timestamp=trace.wall_ns(sent))
        span.set_attribute("mlpool.queue_seconds", sent - trace.start_mono)
        began = getattr(reply, "began", 0.0)
        ended = getattr(reply, "ended", 0.0)
        if sent <= began <= ended <= now:  # the worker's clock is ours (see the module docstring)
            execute = _tracer.start_span(
                "mlpool.execute", context=otel_trace.set_span_in_context(span), start_time=trace.wall_ns(began)
            )
            execute.end(end_time=trace.wall_ns(ended))
            span.set_attribute("mlpool.execute_seconds", ended - began)
            span.set_attribute("mlpool.transfer_seconds", (began - sent) + (now - ended))
        span.add_event("mlpool.returned", timestamp=trace.wall_ns(now))
    if not ok and isinstance(value, BaseException):
        span.record_exception(value)
        span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, f"{type(value).__name__}: {value}"))
    span.end(end_time=trace.wall_ns(now))

