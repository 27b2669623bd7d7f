"""Prometheus metrics of the metering service: the metric objects, helpers to record them, the `/metrics`
endpoint and a grpc.aio server interceptor that counts and times every RPC.

Everything lives in this module's own `REGISTRY` (never prometheus_client's global default), so the metering
and renderer servers can run in one process without "Duplicated timeseries" errors. The metric objects are
created once, at import; several metering servers in one process therefore share one set of counters, and
tests compare values before and after (`sample_value`) instead of expecting absolute numbers.

Wiring (the interceptor goes FIRST, outermost, so it sees the status code the error mapping produced)::

    service = metering_pb2.DESCRIPTOR.services_by_name["Metering"]
    server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor([service]), *others])
    metrics.initialize_tiers(tiers)  # denial series start at 0, so rate() sees the first one
    if config.metrics_listen:
        metrics_port, stop_metrics = metrics.start_metrics_server(config.metrics_listen)
    ...
    stop_metrics()

The gRPC part is duplicated in `renderer.metrics` on purpose: each service owns its metrics module and neither
imports the other; `tests/test_metrics.py` runs the same checks against both.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# --- gRPC (same names and labels as go-grpc-prometheus, so stock dashboards work) ----------------------------

# 1 ms .. 10 s: a reservation is a single short transaction; anything near 10 s is an outage.
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

# --- metering's own ------------------------------------------------------------------------------------------

DENIAL_REASONS = ("daily_limit", "duration", "project_daily_limit")
EXPORT_STATUSES = ("reserved", "completed", "failed", "cancelled", "expired")
RENDER_MODES = ("local", "lambda")
FORMATS = ("mp4", "webm", "gif")

# Ledger-wide: set it from a count in the database (e.g. in the health-probe loop), not from this process's
# own calls; every replica then reports the same value and the dashboard takes max().
RESERVATIONS_IN_FLIGHT = Gauge(
    "metering_reservations_in_flight",
    "Exports currently RESERVED (a render holds a slot and has not completed).",
    registry=REGISTRY,
)
DENIALS = Counter(
    "metering_denials_total",
    "CheckAndReserve calls refused by a tier rule.",
    ("tier", "reason"),
    registry=REGISTRY,
)
EXPORTS = Counter(
    "metering_exports_total",
    "Exports entering a status (reserved, completed, failed, cancelled, expired).",
    ("status", "mode", "format"),
    registry=REGISTRY,
)
RESERVATIONS_EXPIRED = Counter(
    "metering_reservations_expired_total",
    "Reservations the reaper expired because their lease ran out without a heartbeat.",
    registry=REGISTRY,
)
DATABASE_UP = Gauge(
    "metering_database_up",
    "1 while the last database check succeeded, else 0.",
    registry=REGISTRY,
)

for _status in EXPORT_STATUSES:
    for _mode in RENDER_MODES:
        for _format in FORMATS:
            EXPORTS.labels(_status, _mode, _format)


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


def initialize_tiers(tiers: Iterable[str]) -> None:
    """Create every tier x reason denial series at 0, so alerts on rate() see the very first denial."""
    for tier in tiers:
        for reason in DENIAL_REASONS:
            DENIALS.labels(_label(tier), reason)


def record_denial(tier: str, reason: str) -> None:
    """A reservation refused; reason is one of DENIAL_REASONS."""
    DENIALS.labels(_label(tier), _checked("reason", reason, DENIAL_REASONS)).inc()


def record_export_transition(status: object, mode: object, format: object) -> None:
    """An export entered `status` (call once per transition, after the transaction committed)."""
    EXPORTS.labels(
        _checked("status", status, EXPORT_STATUSES),
        _checked("mode", mode, RENDER_MODES),
        _checked("format", format, FORMATS),
    ).inc()


def record_reservations_expired(count: int) -> None:
    """The reaper expired `count` reservations (also count each in record_export_transition('expired', ...))."""
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    RESERVATIONS_EXPIRED.inc(count)


def set_reservations_in_flight(count: int) -> None:
    RESERVATIONS_IN_FLIGHT.set(count)


def set_database_up(up: bool) -> None:
    DATABASE_UP.set(1 if up else 0)


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
