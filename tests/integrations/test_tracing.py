"""OpenTelemetry spans per job, children of the caller's span (#18)."""

from __future__ import annotations

import asyncio

import pytest
from helpers import workloads
from helpers.pools import make_pool

from mlpool import JobTimeoutError, MLPool, WorkerCrashedError

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="needs the dev extra (opentelemetry-sdk)")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

pytestmark = pytest.mark.usefixtures("worker_mode")

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracer():
    """The SDK, set up once per process (OpenTelemetry takes one global provider)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk_trace.TracerProvider):
        provider = sdk_trace.TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return trace.get_tracer("tests")


@pytest.fixture
def spans(tracer):
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture(scope="module")
def pool(worker_mode):
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=2, max_retries=0) as pool:
        yield pool


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def test_job_span_is_a_child_of_the_callers_span_with_its_attributes(pool, tracer, spans):
    with tracer.start_as_current_span("request") as request:
        assert pool.score("m", workloads.add, 1) == 11
    named = _by_name(spans)
    (job,) = named["add"]
    assert job.parent.span_id == request.get_span_context().span_id
    assert job.context.trace_id == request.get_span_context().trace_id
    assert job.attributes["mlpool.model"] == "m"
    assert job.attributes["mlpool.function"] == "add"
    assert job.attributes["mlpool.worker.pid"] in pool.worker_stacks()
    assert job.attributes["mlpool.retries"] == 0
    assert job.attributes["mlpool.outcome"] == "completed"
    assert job.attributes["mlpool.job_id"]
    assert job.status.status_code is StatusCode.UNSET
    (execute,) = named["mlpool.execute"]
    assert execute.parent.span_id == job.context.span_id
    events = {event.name: event for event in job.events}
    dispatched, returned = events["mlpool.dispatched"], events["mlpool.returned"]
    assert job.start_time <= dispatched.timestamp <= execute.start_time <= execute.end_time
    assert execute.end_time <= returned.timestamp <= job.end_time
    phases = ("mlpool.queue_seconds", "mlpool.transfer_seconds", "mlpool.execute_seconds")
    assert all(job.attributes[name] >= 0 for name in phases)
    assert sum(job.attributes[name] for name in phases) <= (job.end_time - job.start_time) / 1e9 + 1e-6


def test_execution_span_contains_the_jobs_real_run_time(pool, tracer, spans):
    with tracer.start_as_current_span("request"):
        pool.score("m", workloads.spin, 0.2)
    named = _by_name(spans)
    (job,) = named["spin"]
    (execute,) = named["mlpool.execute"]
    assert execute.end_time - execute.start_time >= 0.2e9
    assert job.attributes["mlpool.execute_seconds"] >= 0.2
    assert job.end_time - job.start_time >= execute.end_time - execute.start_time
    assert job.end_time - job.start_time < 30e9


def test_failed_job_span_has_error_status_and_exception_event(pool, tracer, spans):
    with tracer.start_as_current_span("request"), pytest.raises(ValueError):
        pool.score("m", workloads.raise_value_error, "bad input")
    (job,) = _by_name(spans)["raise_value_error"]
    assert job.status.status_code is StatusCode.ERROR
    assert job.attributes["mlpool.outcome"] == "failed"
    (event,) = [e for e in job.events if e.name == "exception"]
    assert event.attributes["exception.type"].endswith("ValueError")
    assert "bad input" in event.attributes["exception.message"]


def test_crashed_and_timed_out_jobs_have_error_spans(pool, tracer, spans, fifo):
    with tracer.start_as_current_span("request"):
        with pytest.raises(WorkerCrashedError):
            pool.score("m", workloads.sigkill_self)
        job_id = pool.create_job(workloads.hang_on_fifo, "m", args=(str(fifo()),), timeout=0.3)
        with pytest.raises(JobTimeoutError):
            pool.get_result(job_id, timeout=30)
    named = _by_name(spans)
    (crashed,) = named["sigkill_self"]
    (timed_out,) = named["hang_on_fifo"]
    assert crashed.attributes["mlpool.outcome"] == "crashed"
    assert timed_out.attributes["mlpool.outcome"] == "timed_out"
    assert timed_out.attributes["mlpool.job_id"] == job_id
    for span in (crashed, timed_out):
        assert span.status.status_code is StatusCode.ERROR
    assert timed_out.end_time - timed_out.start_time >= 0.3e9


def test_retries_are_counted(tracer, spans, tmp_path, worker_mode):
    marker = str(tmp_path / "crashed-once")
    with make_pool(models_to_load={"m": workloads.load_constant}, nb_workers=1, max_retries=2) as pool:
        with tracer.start_as_current_span("request"):
            assert pool.score("m", workloads.crash_first_time, marker) == "second try"
    (job,) = _by_name(spans)["crash_first_time"]
    assert job.attributes["mlpool.retries"] == 1
    assert job.attributes["mlpool.outcome"] == "completed"


def test_no_span_without_a_current_span(pool, tracer, spans):
    assert pool.score("m", workloads.add, 1) == 11
    assert spans.get_finished_spans() == ()


def test_async_jobs_are_children_of_the_awaiting_tasks_span(pool, tracer, spans):
    async def request() -> int:
        with tracer.start_as_current_span("request") as parent:
            results = await asyncio.gather(*(pool.score_async("m", workloads.add, i) for i in range(3)))
            return parent.get_span_context().span_id, results

    parent_id, results = asyncio.run(request())
    assert results == [10, 11, 12]
    jobs = _by_name(spans)["add"]
    assert len(jobs) == 3 and all(job.parent.span_id == parent_id for job in jobs)


def test_batched_jobs_get_one_span_each(pool, tracer, spans):
    with tracer.start_as_current_span("request"):
        futures = [pool.submit("m", workloads.double_all, i) for i in range(6)]
        assert [f.result(timeout=30)[0] for f in futures] == [0, 2, 4, 6, 8, 10]
    named = _by_name(spans)
    assert len(named["double_all"]) == 6
    assert len(named["mlpool.execute"]) == 6


def test_inline_pool_traces_too(tracer, spans):
    with MLPool(models_to_load={"m": workloads.load_constant}, nb_workers=0) as pool:
        with tracer.start_as_current_span("request") as request:
            assert pool.score("m", workloads.add, 1) == 11
    (job,) = _by_name(spans)["add"]
    assert job.parent.span_id == request.get_span_context().span_id


def test_a_stream_gets_one_span_from_its_start_to_its_end(pool, tracer, spans):
    from helpers import stream_workloads

    with tracer.start_as_current_span("request") as request:
        with pool.stream("m", stream_workloads.count, 5) as items:
            assert list(items) == [0, 1, 2, 3, 4]
    (job,) = _by_name(spans)["count"]
    assert job.parent.span_id == request.get_span_context().span_id
    assert job.attributes["mlpool.outcome"] == "completed"
    assert job.attributes["mlpool.worker.pid"] in pool.worker_stacks()
    assert [e.name for e in job.events] == ["mlpool.dispatched", "mlpool.returned"]


def test_a_runtime_context_replaced_after_import_still_finds_the_callers_span(pool, tracer, spans):
    """The check "is a span current?" reads the API's context variable directly
    only while the API's runtime context is the one it was at import."""
    from opentelemetry import context as otel_context
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    class Replacement(ContextVarsRuntimeContext):  # what OTEL_PYTHON_CONTEXT would load
        pass

    original = otel_context._RUNTIME_CONTEXT
    otel_context._RUNTIME_CONTEXT = Replacement()
    try:
        with tracer.start_as_current_span("request") as request:
            assert pool.score("m", workloads.add, 1) == 11
        assert pool.score("m", workloads.add, 2) == 12  # no span current: no job span
    finally:
        otel_context._RUNTIME_CONTEXT = original
    (job,) = _by_name(spans)["add"]
    assert job.parent.span_id == request.get_span_context().span_id
