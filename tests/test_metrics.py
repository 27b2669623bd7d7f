"""The metrics modules of both services: a real grpc.aio server with the interceptor, a real /metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from types import ModuleType

import grpc
import prometheus_client
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from metering import metrics as metering_metrics
from metering.domain import ExportStatus
from metering.domain import OutputFormat as MeteringFormat
from metering.domain import RenderMode as MeteringMode
from renderer import metrics as renderer_metrics
from tests.support.metering import http_health

MODULES = [metering_metrics, renderer_metrics]
PROBE = "test.v1.Probe"


class DomainError(Exception):
    """Stands in for a service's domain error, turned into a status code by an inner interceptor."""


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such export")
    raise AssertionError("abort returned")


async def _abort_with_details(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.QuotaFailure())
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="Daily export limit reached", details=[detail])
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort returned")


async def _raise(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("a bug")


async def _set_code(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.ALREADY_EXISTS)
    context.set_details("same key, different request")
    return b""


async def _domain_error(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise DomainError("export too long")


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for index in range(3):
        yield bytes([index])


async def _stream_abort(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong role")


async def _stream_forever(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    while True:
        yield b"tick"
        await asyncio.sleep(0.01)


async def _echo_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def _count_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    total = 0
    async for _ in requests:
        total += 1
    return bytes([total])


def _probe_handler() -> grpc.GenericRpcHandler:
    unary = {
        "Ok": _ok,
        "Abort": _abort,
        "AbortWithDetails": _abort_with_details,
        "Raise": _raise,
        "SetCode": _set_code,
        "DomainError": _domain_error,
    }
    handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in unary.items()}
    handlers["Stream"] = grpc.unary_stream_rpc_method_handler(_stream)
    handlers["StreamAbort"] = grpc.unary_stream_rpc_method_handler(_stream_abort)
    handlers["StreamForever"] = grpc.unary_stream_rpc_method_handler(_stream_forever)
    handlers["Echo"] = grpc.stream_stream_rpc_method_handler(_echo_stream)
    handlers["Count"] = grpc.stream_unary_rpc_method_handler(_count_stream)
    return grpc.method_handlers_generic_handler(PROBE, handlers)


class DomainErrorMapping(grpc.aio.ServerInterceptor):
    """Like a service's one error-mapping interceptor: DomainError -> FAILED_PRECONDITION via abort."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def mapped(request, context):  # type: ignore[no-untyped-def]
            try:
                return await inner(request, context)
            except DomainError as error:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

        return grpc.unary_unary_rpc_method_handler(
            mapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextlib.asynccontextmanager
async def serving(module: ModuleType) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[module.MetricsInterceptor(), DomainErrorMapping()])
    server.add_generic_rpc_handlers((_probe_handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


def handled(module: ModuleType, service: str, method: str, code: str) -> float:
    labels = {"grpc_service": service, "grpc_method": method, "grpc_code": code}
    return module.sample_value("grpc_server_handled_total", labels)


def timed(module: ModuleType, service: str, method: str) -> float:
    labels = {"grpc_service": service, "grpc_method": method}
    return module.sample_value("grpc_server_handling_seconds_count", labels)


async def call_code(call: grpc.aio.Call | grpc.aio.UnaryUnaryCall) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def eventually(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    """Server-side bookkeeping of a cancelled call finishes after the client has moved on: wait for it."""
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


UNARY_CASES = [
    ("Ok", "OK"),
    ("Abort", "NOT_FOUND"),
    ("AbortWithDetails", "RESOURCE_EXHAUSTED"),
    ("Raise", "UNKNOWN"),
    ("SetCode", "ALREADY_EXISTS"),
    ("DomainError", "FAILED_PRECONDITION"),
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize(("method", "expected"), UNARY_CASES)
async def test_unary_calls_are_counted_with_the_code_the_client_saw(module, method, expected) -> None:
    async with serving(module) as channel:
        before, before_timed = handled(module, PROBE, method, expected), timed(module, PROBE, method)
        seen = await call_code(channel.unary_unary(f"/{PROBE}/{method}")(b"x"))
    assert seen.name == expected
    assert handled(module, PROBE, method, expected) == before + 1
    assert handled(module, PROBE, method, "UNKNOWN") == (before + 1 if expected == "UNKNOWN" else 0)
    assert timed(module, PROBE, method) == before_timed + 1


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
async def test_server_streams_are_counted_once_when_they_end(module) -> None:
    async with serving(module) as channel:
        before_ok = handled(module, PROBE, "Stream", "OK")
        before_denied = handled(module, PROBE, "StreamAbort", "PERMISSION_DENIED")
        replies = [reply async for reply in channel.unary_stream(f"/{PROBE}/Stream")(b"")]
        assert replies == [b"\x00", b"\x01", b"\x02"]
        aborted = channel.unary_stream(f"/{PROBE}/StreamAbort")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in aborted:
                pass
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert handled(module, PROBE, "Stream", "OK") == before_ok + 1
    assert handled(module, PROBE, "StreamAbort", "PERMISSION_DENIED") == before_denied + 1
    assert handled(module, PROBE, "StreamAbort", "UNKNOWN") == 0


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
async def test_a_stream_the_client_cancels_is_counted_as_cancelled(module) -> None:
    async with serving(module) as channel:
        before = handled(module, PROBE, "StreamForever", "CANCELLED")
        call = channel.unary_stream(f"/{PROBE}/StreamForever")(b"")
        async for _ in call:
            break
        call.cancel()
        await eventually(lambda: handled(module, PROBE, "StreamForever", "CANCELLED") == before + 1, "CANCELLED")
    assert handled(module, PROBE, "StreamForever", "UNKNOWN") == 0


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
async def test_client_streaming_calls_are_counted(module) -> None:
    async def three() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x"

    async with serving(module) as channel:
        before_echo, before_count = handled(module, PROBE, "Echo", "OK"), handled(module, PROBE, "Count", "OK")
        echoed = [reply async for reply in channel.stream_stream(f"/{PROBE}/Echo")(three())]
        counted = await channel.stream_unary(f"/{PROBE}/Count")(three())
    assert echoed == [b"x"] * 3 and counted == b"\x03"
    assert handled(module, PROBE, "Echo", "OK") == before_echo + 1
    assert handled(module, PROBE, "Count", "OK") == before_count + 1


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
async def test_grpc_health_service_through_the_interceptor(module) -> None:
    service, stub_request = "grpc.health.v1.Health", health_pb2.HealthCheckRequest
    async with serving(module) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        before_ok = handled(module, service, "Check", "OK")
        before_missing = handled(module, service, "Check", "NOT_FOUND")
        before_watch = handled(module, service, "Watch", "CANCELLED")
        answer = await stub.Check(stub_request())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert await call_code(stub.Check(stub_request(service="nope"))) is grpc.StatusCode.NOT_FOUND
        # Watch is a coroutine that sends with context.write(), not an async generator.
        watch = stub.Watch(stub_request())
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        await eventually(lambda: handled(module, service, "Watch", "CANCELLED") == before_watch + 1, "Watch counted")
    assert handled(module, service, "Check", "OK") == before_ok + 1
    assert handled(module, service, "Check", "NOT_FOUND") == before_missing + 1


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
async def test_unknown_methods_create_no_series(module) -> None:
    async with serving(module) as channel:
        code = await call_code(channel.unary_unary(f"/{PROBE}/NoSuchMethod")(b""))
    assert code is grpc.StatusCode.UNIMPLEMENTED
    assert timed(module, PROBE, "NoSuchMethod") == 0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def test_both_endpoints_in_one_process_serve_their_own_registry() -> None:
    assert metering_metrics.REGISTRY is not prometheus_client.REGISTRY
    assert renderer_metrics.REGISTRY is not metering_metrics.REGISTRY
    metering_port, stop_metering = metering_metrics.start_metrics_server("127.0.0.1:0")
    renderer_port, stop_renderer = renderer_metrics.start_metrics_server("127.0.0.1:0")
    try:
        assert metering_port != renderer_port and 0 not in (metering_port, renderer_port)
        metering_text, renderer_text = scrape(metering_port), scrape(renderer_port)
    finally:
        stop_metering()
        stop_renderer()
    assert "metering_reservations_in_flight" in metering_text and "\nrenderer_" not in metering_text
    assert "renderer_outbox_depth" in renderer_text and "\nmetering_" not in renderer_text
    assert "# TYPE grpc_server_handling_seconds histogram" in metering_text
    with pytest.raises(urllib.error.URLError):
        scrape(metering_port)


def test_healthz_answers_what_the_service_says_now_and_metrics_stay_beside_it() -> None:
    serving = False
    port, stop = metering_metrics.start_metrics_server("127.0.0.1:0", serving=lambda: serving)
    try:
        down = http_health(port)
        serving = True
        up = http_health(port)
        text = scrape(port)
    finally:
        stop()
    assert down == (503, "NOT_SERVING") and up == (200, "SERVING")
    assert "metering_reservations_in_flight" in text


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_metrics_server_listens_on_ipv6_loopback() -> None:
    port, stop = renderer_metrics.start_metrics_server("[::1]:0", serving=lambda: True)
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as response:
            body = response.read()
    finally:
        stop()
    assert body == b"SERVING\n"


def test_metrics_server_rejects_a_listen_address_without_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        metering_metrics.start_metrics_server("127.0.0.1")


def test_metering_helpers_record_what_they_say() -> None:
    m = metering_metrics
    m.initialize_tiers(["free", "pro"])
    # The series exists (at 0 unless another test in this process already denied a pro export).
    assert m.REGISTRY.get_sample_value("metering_denials_total", {"tier": "pro", "reason": "duration"}) is not None
    before = m.sample_value("metering_denials_total", {"tier": "free", "reason": "daily_limit"})
    m.record_denial("free", "daily_limit")
    assert m.sample_value("metering_denials_total", {"tier": "free", "reason": "daily_limit"}) == before + 1
    with pytest.raises(ValueError, match="reason"):
        m.record_denial("free", "too_many")

    labels = {"status": "completed", "mode": "lambda", "format": "webm"}
    before = m.sample_value("metering_exports_total", labels)
    m.record_export_transition(ExportStatus.COMPLETED, MeteringMode.LAMBDA, MeteringFormat.WEBM)
    m.record_export_transition("completed", "lambda", "webm")
    assert m.sample_value("metering_exports_total", labels) == before + 2
    with pytest.raises(ValueError, match="format"):
        m.record_export_transition("completed", "lambda", "avi")

    before = m.sample_value("metering_reservations_expired_total")
    m.record_reservations_expired(3)
    assert m.sample_value("metering_reservations_expired_total") == before + 3
    m.set_reservations_in_flight(7)
    assert m.sample_value("metering_reservations_in_flight") == 7
    m.set_database_up(False)
    assert m.sample_value("metering_database_up") == 0
    m.set_database_up(True)
    assert m.sample_value("metering_database_up") == 1


def test_renderer_helpers_record_what_they_say() -> None:
    m = renderer_metrics
    labels = {"mode": "local", "format": "gif", "state": "failed"}
    before = m.sample_value("renderer_jobs_total", labels)
    m.record_job_state("local", "gif", "failed")
    assert m.sample_value("renderer_jobs_total", labels) == before + 1

    histogram = {"mode": "lambda", "format": "mp4", "outcome": "succeeded"}
    before = m.sample_value("renderer_render_seconds_count", histogram)
    m.observe_render("lambda", "mp4", "succeeded", 42.0)
    assert m.sample_value("renderer_render_seconds_count", histogram) == before + 1
    assert m.sample_value("renderer_render_seconds_bucket", {**histogram, "le": "30.0"}) == before
    with pytest.raises(ValueError, match="outcome"):
        m.observe_render("lambda", "mp4", "exploded", 1.0)

    with pytest.raises(RuntimeError), m.job_in_progress("local"):
        assert m.sample_value("renderer_jobs_in_progress", {"mode": "local"}) == 1
        raise RuntimeError("render failed")
    assert m.sample_value("renderer_jobs_in_progress", {"mode": "local"}) == 0

    before = {o: m.sample_value("renderer_lambda_invocations_total", {"outcome": o}) for o in m.LAMBDA_OUTCOMES}
    m.record_lambda_invocation("timeout")
    assert m.sample_value("renderer_lambda_invocations_total", {"outcome": "timeout"}) == before["timeout"] + 1
    assert m.sample_value("renderer_lambda_invocations_total", {"outcome": "ok"}) == before["ok"]
    before_throttles = m.sample_value("renderer_lambda_throttles_total")
    before_unavailable = m.sample_value("renderer_metering_unavailable_total")
    m.record_lambda_throttle()
    m.record_metering_unavailable()
    assert m.sample_value("renderer_lambda_throttles_total") == before_throttles + 1
    assert m.sample_value("renderer_metering_unavailable_total") == before_unavailable + 1


def test_outbox_gauges_are_read_at_scrape_time() -> None:
    m = renderer_metrics
    pending = [1, 2, 3]
    m.track_outbox(lambda: len(pending), lambda: 1)
    port, stop = m.start_metrics_server("127.0.0.1:0")
    try:
        assert "renderer_outbox_depth 3.0" in scrape(port)
        pending.clear()
        text = scrape(port)
    finally:
        stop()
        m.set_outbox(0, 0)  # back to plain values for other tests
    assert "renderer_outbox_depth 0.0" in text and "renderer_outbox_dead_letters 1.0" in text


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_interceptor_creates_error_series_at_zero_for_the_services_it_is_given(module) -> None:
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    module.MetricsInterceptor([service])
    for method in ("Check", "Watch"):
        for code in ("OK", "UNKNOWN", "INTERNAL"):
            labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": method, "grpc_code": code}
            assert module.REGISTRY.get_sample_value("grpc_server_handled_total", labels) is not None


async def test_metering_wiring_records_the_codes_its_status_mapping_produces() -> None:
    """Metering's own interceptor, with its metrics, as metering/server.py installs it."""
    from datetime import UTC, datetime

    from metering import errors
    from metering.interceptors import MeteringInterceptor

    service = "exportapi.metering.v1.Metering"

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.QuotaExceeded(
            scope="user",
            subject_id="u",
            tier="free",
            limit=3,
            used=3,
            resets_at=datetime.now(UTC),
            retry_after_seconds=60.0,
        )

    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug")

    handler = grpc.method_handlers_generic_handler(
        service,
        {
            "CheckAndReserve": grpc.unary_unary_rpc_method_handler(refuse),
            "GetStats": grpc.unary_unary_rpc_method_handler(crash),
        },
    )
    server = grpc.aio.server(interceptors=[MeteringInterceptor(metrics=metering_metrics.MetricsInterceptor())])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    m = metering_metrics
    before_refused = handled(m, service, "CheckAndReserve", "RESOURCE_EXHAUSTED")
    before_internal = handled(m, service, "GetStats", "INTERNAL")
    before_unknown = handled(m, service, "GetStats", "UNKNOWN")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            refused = await call_code(channel.unary_unary(f"/{service}/CheckAndReserve")(b""))
            crashed = await call_code(channel.unary_unary(f"/{service}/GetStats")(b""))
    finally:
        await server.stop(0)
    assert (refused, crashed) == (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    assert handled(m, service, "CheckAndReserve", "RESOURCE_EXHAUSTED") == before_refused + 1
    assert handled(m, service, "GetStats", "INTERNAL") == before_internal + 1
    assert handled(m, service, "GetStats", "UNKNOWN") == before_unknown
