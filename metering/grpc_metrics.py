"""The gRPC half of both services' Prometheus metrics: the RPC counter and histogram, a grpc.aio server
interceptor that records them with the real final status code, and the HTTP endpoint: `/metrics`, and
`/healthz` for probes that cannot speak gRPC over TLS (Kubernetes' gRPC probes are plaintext only).

Each service keeps its own registry and metric objects (`metering.metrics`, `renderer.metrics`) and builds them
with `rpc_metrics(registry)`; only the mechanics live here, once.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

# Same names and labels as go-grpc-prometheus, so stock dashboards work. 1 ms .. 10 s: every unary call of both
# services is short; WatchRender streams for a whole render and lands in +Inf (render time has its own).
RPC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Codes whose series exist from start-up for every method given to MetricsInterceptor(services=...).
PREINITIALIZED_CODES = (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def rpc_metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
    handled = Counter(
        "grpc_server_handled_total",
        "RPCs completed on the server, by final status code.",
        ("grpc_service", "grpc_method", "grpc_code"),
        registry=registry,
    )
    seconds = Histogram(
        "grpc_server_handling_seconds",
        "Time from receiving an RPC to its final status (for streams: until the last message).",
        ("grpc_service", "grpc_method"),
        buckets=RPC_LATENCY_BUCKETS,
        registry=registry,
    )
    return handled, seconds


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is no news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scraper must not hold up the process's exit


def health_app(metrics_app: Callable[..., Any], serving: Callable[[], bool]) -> Callable[..., Any]:
    """`/healthz`: 200 `SERVING` or 503 `NOT_SERVING`, as the gRPC health check would answer; the rest: metrics."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        ok = serving()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"SERVING\n" if ok else b"NOT_SERVING\n"]

    return app


def start_http(
    listen: str, registry: CollectorRegistry, *, serving: Callable[[], bool] | None = None
) -> tuple[int, Callable[[], None]]:
    """Serves `registry` (and `/healthz` from `serving`, called from the HTTP thread: it must only read state)
    from a daemon thread; returns the bound port and a function that stops the server."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics listen address must be host:port, not {listen!r}")
    host = host.strip("[]")
    family = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    app = make_wsgi_app(registry)
    if serving is not None:
        app = health_app(app, serving)
    httpd = make_server(host, int(port_text), app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()

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


class MethodRecorder:
    """The series of one method, looked up once: `.labels()` on every call costs more than the increment."""

    def __init__(self, handled: Counter, seconds: Histogram, service: str, method: str) -> None:
        self._handled = handled
        self._service = service
        self._method = method
        self._seconds = seconds.labels(service, method)
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def record(self, elapsed: float, code: grpc.StatusCode) -> None:
        self._seconds.observe(elapsed)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._handled.labels(self._service, self._method, code.name)
        counter.inc()

    def done(self, started: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        self.record(time.perf_counter() - started, _final_code(context, error))

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
        handled: Counter,
        seconds: Histogram,
    ) -> None:
        """`services`: protobuf service descriptors whose methods get their OK and error series created at 0
        now, so that increase()/rate() in alerts see the first UNKNOWN or INTERNAL; a series that first
        appears with value 1 looks like no increase at all."""
        self._handled = handled
        self._seconds = seconds
        self._recorders: dict[str, MethodRecorder] = {}
        for service in services:
            for method in service.methods:
                for code in PREINITIALIZED_CODES:
                    handled.labels(service.full_name, method.name, code.name)

    def recorder(self, full_method: str) -> MethodRecorder:
        """The recorder of one method (made on its first call; unknown methods never get here)."""
        recorder = self._recorders.get(full_method)
        if recorder is None:
            recorder = MethodRecorder(self._handled, self._seconds, *_split_method(full_method))
            self._recorders[full_method] = recorder
        return recorder

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; not worth a series per typo
            return None
        recorder = self.recorder(handler_call_details.method)
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
