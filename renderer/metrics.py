"""Prometheus metrics of the renderer: the metric objects, helpers to record them, the `/metrics` endpoint and a
grpc.aio server interceptor that counts and times every RPC.

Everything lives in this module's own `REGISTRY` (never prometheus_client's global default), so the renderer
and metering servers can run in one process without "Duplicated timeseries" errors. The metric objects are
created once, at import; several renderers in one process therefore share one set of counters, and tests
compare values before and after (`sample_value`) instead of expecting absolute numbers.

Wiring (the interceptor goes FIRST, outermost, so it sees the status code the error mapping produced)::

    service = renderer_pb2.DESCRIPTOR.services_by_name["Renderer"]
    server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor([service]), *others])
    metrics.track_outbox(outbox.depth, lambda: len(outbox.dead_letters()))
    if config.metrics_listen:
        metrics_port, stop_metrics = metrics.start_metrics_server(config.metrics_listen)
    ...
    stop_metrics()

The gRPC part is duplicated from `metering.metrics` on purpose: each service owns its metrics module and
neither imports the other; `tests/test_metrics.py` runs the same checks against both.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# --- gRPC (same names and labels as go-grpc-prometheus, so stock dashboards work) ----------------------------

# 1 ms .. 10 s: StartRender only reserves and queues. WatchRender streams for a whole render and lands in +Inf;
# render time has its own histogram below.
RPC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Codes whose series exist from start-up for every method given to MetricsInterceptor(services=...).
PREINITIALIZED_CODES = (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by final status code.",
    ("grpc_service", "grpc_method", "grpc_code"),
    registry=REGISTRY,
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to its final status (for streams: until the last message).",
    ("grpc_service", "grpc_method"),
    buckets=RPC_LATENCY_BUCKETS,
    registry=REGISTRY,
)

# --- the renderer's own ---------------------------------------------------------------------------------------

RENDER_MODES = ("local", "lambda")
FORMATS = ("mp4", "webm", "gif")
JOB_STATES = ("queued", "rendering", "succeeded", "failed", "cancelled")
RENDER_OUTCOMES = ("succeeded", "failed", "cancelled")
LAMBDA_OUTCOMES = ("ok", "error", "timeout")

# 0.1 s .. 15 min: a tiny GIF takes a fraction of a second; Lambda's hard limit is 15 minutes.
RENDER_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)

RENDER_SECONDS = Histogram(
    "renderer_render_seconds",
    "Wall time of one render from start to its terminal state.",
    ("mode", "format", "outcome"),
    buckets=RENDER_SECONDS_BUCKETS,
    registry=REGISTRY,
)
JOBS_IN_PROGRESS = Gauge(
    "renderer_jobs_in_progress",
    "Renders running now.",
    ("mode",),
    registry=REGISTRY,
)
JOBS = Counter(
    "renderer_jobs_total",
    "Render jobs entering a state (queued, rendering, succeeded, failed, cancelled).",
    ("mode", "format", "state"),
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "renderer_outbox_depth",
    "Completions written locally but not yet acknowledged by metering.",
    registry=REGISTRY,
)
OUTBOX_DEAD_LETTERS = Gauge(
    "renderer_outbox_dead_letters",
    "Completions metering refused for good; each needs an operator.",
    registry=REGISTRY,
)
LAMBDA_INVOCATIONS = Counter(
    "renderer_lambda_invocations_total",
    "Lambda render invocations by outcome (ok, error, timeout).",
    ("outcome",),
    registry=REGISTRY,
)
LAMBDA_THROTTLES = Counter(
    "renderer_lambda_throttles_total",
    "Lambda invocations refused with TooManyRequestsException (throttled).",
    registry=REGISTRY,
)
METERING_UNAVAILABLE = Counter(
    "renderer_metering_unavailable_total",
    "Calls to metering that failed because it could not be reached (renders refused or completions queued).",
    registry=REGISTRY,
)

for _mode in RENDER_MODES:
    JOBS_IN_PROGRESS.labels(_mode)
    for _format in FORMATS:
        for _state in JOB_STATES:
            JOBS.labels(_mode, _format, _state)
for _outcome in LAMBDA_OUTCOMES:
    LAMBDA_INVOCATIONS.labels(_outcome)


def _label(value: object) -> str:
    """Enum members (StrEnum or not) and plain strings alike become lower-case label values."""
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value).lower()


def _checked(name: str, value: object, allowed: tuple[str, ...]) -> str:
    text = _label(value)
    if text not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return text


def record_job_state(mode: object, format: object, state: object) -> None:
    """A job entered `state` (one of JOB_STATES)."""
    JOBS.labels(
        _checked("mode", mode, RENDER_MODES),
        _checked("format", format, FORMATS),
        _checked("state", state, JOB_STATES),
    ).inc()


def observe_render(mode: object, format: object, outcome: object, seconds: float) -> None:
    """A render ended after `seconds`; outcome is one of RENDER_OUTCOMES."""
    RENDER_SECONDS.labels(
        _checked("mode", mode, RENDER_MODES),
        _checked("format", format, FORMATS),
        _checked("outcome", outcome, RENDER_OUTCOMES),
    ).observe(seconds)


@contextlib.contextmanager
def job_in_progress(mode: object) -> Iterator[None]:
    """`with job_in_progress(mode): await backend.render(...)` keeps renderer_jobs_in_progress right,
    also when the render raises or is cancelled."""
    gauge = JOBS_IN_PROGRESS.labels(_checked("mode", mode, RENDER_MODES))
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def record_lambda_invocation(outcome: str) -> None:
    """One Lambda invocation ended: ok, error (the function failed) or timeout."""
    LAMBDA_INVOCATIONS.labels(_checked("outcome", outcome, LAMBDA_OUTCOMES)).inc()


def record_lambda_throttle() -> None:
    LAMBDA_THROTTLES.inc()


def record_metering_unavailable() -> None:
    METERING_UNAVAILABLE.inc()


def track_outbox(depth: Callable[[], float], dead_letters: Callable[[], float]) -> None:
    """Read both outbox gauges at scrape time (the callables run on the /metrics HTTP thread, so they must be
    thread-safe and quick), e.g. `track_outbox(outbox.depth, lambda: len(outbox.dead_letters()))`."""
    OUTBOX_DEPTH.set_function(depth)
    OUTBOX_DEAD_LETTERS.set_function(dead_letters)


def set_outbox(depth: int, dead_letters: int) -> None:
    """Push fixed values instead (a gauge with a function ignores .set(), so this replaces the function)."""
    track_outbox(lambda: depth, lambda: dead_letters)


def sample_value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (0.0 when absent): for tests and debugging."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# --- the /metrics endpoint ------------------------------------------------------------------------------------


def start_metrics_server(listen: str) -> tuple[int, Callable[[], None]]:
    """Serve this module's registry at http://listen/metrics (any path, in fact) from a daemon thread.

    `listen` is host:port ("[::1]:9090" for IPv6); port 0 picks a free port. Returns the bound port and a
    function that stops the server and waits for its thread.
    """
    return _start_http(listen, REGISTRY)


def _start_http(listen: str, registry: CollectorRegistry) -> tuple[int, Callable[[], None]]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics listen address must be host:port, not {listen!r}")
    httpd, thread = start_http_server(int(port_text), addr=host.strip("[]"), registry=registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return int(httpd.server_port), stop


# --- the gRPC interceptor -------------------------------------------------------------------------------------


def _split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client receives. context.abort() records its code on the context before raising, and a
    handler may set_code() and return normally; an exception that is neither becomes UNKNOWN, as in grpc."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):  # the client went away or the deadline passed
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Recorder:
    def __init__(self, handled: Counter, seconds: Histogram, service: str, method: str) -> None:
        self._handled = handled
        self._seconds = seconds
        self._service = service
        self._method = method

    def done(self, started: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        self._seconds.labels(self._service, self._method).observe(time.perf_counter() - started)
        code = _final_code(context, error)
        self._handled.labels(self._service, self._method, code.name).inc()

    def wrap_unary_response(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as error:
                self.done(started, context, error)
                raise
            self.done(started, context, None)
            return response

        return wrapper

    def wrap_stream_response(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):

            async def generator_wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    self.done(started, context, error)
                    raise
                self.done(started, context, None)

            return generator_wrapper
        # A coroutine that sends with `await context.write(...)` (grpc's health Watch does this).
        return self.wrap_unary_response(behavior)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts (grpc_server_handled_total) and times (grpc_server_handling_seconds) every RPC, unary and
    streaming, with the real final status code, including calls ended by context.abort().

    Put it first in `interceptors=[...]`: an interceptor outside it that turns exceptions into status codes
    would run after this one has already recorded UNKNOWN.
    """

    def __init__(
        self,
        services: Iterable[ServiceDescriptor] = (),
        *,
        handled: Counter = GRPC_HANDLED,
        seconds: Histogram = GRPC_HANDLING_SECONDS,
    ) -> None:
        """`services`: protobuf service descriptors whose methods get their OK and error series created at 0
        now, so that increase()/rate() in alerts see the first UNKNOWN or INTERNAL; a series that first
        appears with value 1 looks like no increase at all."""
        self._handled = handled
        self._seconds = seconds
        for service in services:
            for method in service.methods:
                for code in PREINITIALIZED_CODES:
                    handled.labels(service.full_name, method.name, code.name)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; not worth a series per typo
            return None
        recorder = _Recorder(self._handled, self._seconds, *_split_method(handler_call_details.method))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                recorder.wrap_unary_response(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                recorder.wrap_stream_response(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                recorder.wrap_unary_response(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                recorder.wrap_stream_response(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
