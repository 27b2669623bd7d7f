"""Hostile input, property-based: every RPC of both services, real servers, real PostgreSQL.

Each request mixes valid values with hostile ones (unicode, NUL, very long strings; nan, inf, negative and
huge numbers; enum values out of range), so that some requests get past the first check and reach deeper
code; raw random bytes go in as the request itself. Whatever comes in, only documented codes come back
(never UNKNOWN or INTERNAL), an INVALID_ARGUMENT names its field, and the server still answers health.

The renderer's metering gives `free` users no exports at all (daily_limit = 0), so no hostile composition
ever renders: validation or the quota stops each one.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2 as rpb
from exportapi.renderer.v1 import renderer_pb2_grpc
from tests.support import postgres
from tests.support.metering import start_metering
from tests.support.renderer import start_renderer

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
C = grpc.StatusCode
# Every code the contract documents for a request (UNAVAILABLE only when a dependency is down: not here).
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
# "field: reason", the field a proto field name or path: user_id, composition.texts[2].text, request.
NAMES_A_FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")
METERING = "/exportapi.metering.v1.Metering/"
RENDERER = "/exportapi.renderer.v1.Renderer/"
HEALTH = "/grpc.health.v1.Health/"
AUTH_TOKEN = "hostile-tests-ops-token-0123"

# --- strategies -------------------------------------------------------------------------------------------

SPECIAL_TEXT = [
    "", " ", "\x00", "a\x00b", "\t\n\r", "\x7f", "\u202e\u0645\u0631", "\ufeff", "\U0010ffff", "💥" * 64,
    "../../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest", "s3://b/k.mp4",
    "%{pts}", "%{eif\\:1/0\\:d}", "'; DROP TABLE exports; --", "$(reboot)", "`id`", "\\", "'", '"', ":", ",",
    "x" * 129, "x" * 200_000, "a:b;c=d[e]", "1920x1080x1", "-1x-1", "99999x99999",
]
long_text = st.builds(lambda unit, times: unit * times, st.text(min_size=1, max_size=3), st.integers(100, 40_000))
hostile_text = st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=40), long_text)

SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 1e308, -1e308, 5e-324, 2.0**53 + 1, 1e-9]
hostile_float = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
hostile_int32 = st.one_of(st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]), int32)
hostile_int64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), int64)
hostile_enum = st.one_of(st.sampled_from([-1, 3, 6, 99, 2**31 - 1, -(2**31)]), int32)


Fields = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]


@st.composite
def message(draw: st.DrawFn, cls: type, fields: Fields, max_hostile: int = 2) -> Any:
    """A `cls` whose fields are valid except up to `max_hostile` hostile ones, so that a request gets past
    the first check it would fail and the deeper code sees hostile values too. A value None leaves the
    field unset."""
    hostile = draw(st.sets(st.sampled_from(sorted(fields)), max_size=max_hostile), label="hostile fields")
    values = {name: draw(bad if name in hostile else good, label=name) for name, (good, bad) in fields.items()}
    return cls(**{name: value for name, value in values.items() if value is not None})


names = st.sampled_from(["alice", "bob", "carol", "user-1", "proj-1"])
ID = (names, hostile_text)
page_tokens = st.one_of(hostile_text, st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()))


def metering_requests(known_exports: list[str]) -> dict[str, st.SearchStrategy[Any]]:
    export_id = (st.one_of(st.sampled_from(known_exports), st.uuids().map(str)), hostile_text)
    return {
        "CheckAndReserve": message(pb.CheckAndReserveRequest, {
            "idempotency_key": (st.uuids().map(str), hostile_text),
            "user_id": ID,
            "project_id": ID,
            "render_mode": (st.sampled_from([1, 2]), hostile_enum),
            "format": (st.sampled_from(["mp4", "webm", "gif"]), hostile_text),
            "duration_seconds": (st.floats(0.1, 30), hostile_float),
            "resolution": (
                st.sampled_from(["160x120", "1920x1080"]),
                st.one_of(hostile_text, st.builds("{}x{}".format, hostile_int64, hostile_int64)),
            ),
            "request_digest": (st.sampled_from(["", "0" * 64]), hostile_text),
        }),
        "Complete": message(pb.CompleteRequest, {
            "export_id": export_id,
            "outcome": (st.sampled_from([2, 3, 4]), hostile_enum),
            "error": (st.text(max_size=40), hostile_text),
            "file_size_bytes": (st.integers(0, 10**9), hostile_int64),
            "duration_seconds": (st.floats(0, 30), hostile_float),
            "output_uri": (st.just("file:///tmp/x.mp4"), hostile_text),
            "render_seconds": (st.floats(0, 30), hostile_float),
        }),
        "ExtendReservation": message(pb.ExtendReservationRequest, {"export_id": export_id}),
        "GetUsage": message(pb.GetUsageRequest, {"user_id": ID}),
        "ListExports": message(pb.ListExportsRequest, {
            "user_id": ID,
            "project_id": (st.none() | names, hostile_text),
            "page_size": (st.integers(0, 1000), hostile_int32),
            "page_token": (st.just(""), page_tokens),
        }),
        "GetStats": message(pb.GetStatsRequest, {
            "user_id": (st.just("") | names, hostile_text),
            "project_id": (st.just("") | names, hostile_text),
            "days": (st.integers(0, 400), hostile_int32),
        }),
        "SetAccountTier": message(pb.SetAccountTierRequest, {
            "user_id": ID,
            "tier": (st.sampled_from(["free", "pro", "unlimited"]), hostile_text),
        }),
    }


ZERO_OR_HOSTILE = (st.just(0.0), hostile_float)
COLOR = (st.sampled_from(["", "navy", "white", "#00ff00"]), hostile_text)
SOURCE = (
    st.sampled_from(["testsrc:", "color:red"]),
    st.one_of(st.sampled_from(["missing.mp4", "clip.png", "s3://bucket/clip.mp4", "sine:440", "color:"]), hostile_text),
)
CLIP: Fields = {"source": SOURCE, "start": ZERO_OR_HOSTILE, "trim_start": ZERO_OR_HOSTILE,
                "duration": (st.sampled_from([0.0, 0.5]), hostile_float)}
TEXT: Fields = {
    "text": (st.text(max_size=20), hostile_text), "start": ZERO_OR_HOSTILE, "end": ZERO_OR_HOSTILE,
    "x": (st.integers(0, 100), hostile_int32), "y": (st.integers(0, 100), hostile_int32),
    "font_size": (st.sampled_from([0, 16]), hostile_int32), "color": COLOR,
}
AUDIO: Fields = {
    "source": (st.just("sine:440"), st.one_of(st.sampled_from(["sine:0", "sine:1e9", "sine:nan", "testsrc:"]),
                                              hostile_text)),
    "start": ZERO_OR_HOSTILE,
    "volume": (st.sampled_from([0.0, 1.0]), hostile_float),
}


def layers(cls: type, fields: Fields, most: int) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    valid = st.lists(message(cls, fields, max_hostile=0), max_size=2)
    hostile = st.one_of(
        st.lists(message(cls, fields), min_size=1, max_size=3),
        st.lists(message(cls, fields, max_hostile=0), min_size=most + 1, max_size=most + 2),  # too many
    )
    return valid, hostile


COMPOSITION: Fields = {
    "width": (st.sampled_from([160, 320]), hostile_int32),
    "height": (st.sampled_from([120, 240]), hostile_int32),
    "fps": (st.sampled_from([10.0, 25.0]), hostile_float),
    "duration_seconds": (st.sampled_from([0.5, 1.0, 2.0]), st.one_of(hostile_float, st.just(3600.0))),
    "background": COLOR,
    "clips": layers(rpb.Clip, CLIP, 64),
    "texts": layers(rpb.TextLayer, TEXT, 64),
    "audio": layers(rpb.AudioLayer, AUDIO, 16),
}
JOB_ID = (st.uuids().map(lambda u: u.hex), hostile_text)
RENDERER_REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "StartRender": message(rpb.StartRenderRequest, {
        "idempotency_key": (st.uuids().map(str), hostile_text),
        "user_id": ID,
        "project_id": ID,
        "composition": (
            message(rpb.Composition, COMPOSITION, max_hostile=0), st.none() | message(rpb.Composition, COMPOSITION)
        ),
        "format": (st.sampled_from(["mp4", "webm", "gif"]), hostile_text),
        "mode": (st.sampled_from([0, 1]), st.one_of(st.just(2), hostile_enum)),  # 2: lambda, not configured here
    }),
    "GetRender": message(rpb.GetRenderRequest, {"job_id": JOB_ID}),
    "WatchRender": message(rpb.WatchRenderRequest, {"job_id": JOB_ID}),
    "CancelRender": message(rpb.CancelRenderRequest, {"job_id": JOB_ID}),
}

# --- servers ---------------------------------------------------------------------------------------------


class Servers:
    metering: str
    renderer: str
    metering_with_auth: str
    known_exports: list[str]


@pytest.fixture(scope="module")
async def servers(
    pg_dsn: str, metering_template: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Servers]:
    """Metering on one database (default tiers); a renderer whose metering, on another database, lets no
    free user export; and metering with tokens, for hostile credentials."""
    state = tmp_path_factory.mktemp("hostile")
    tiers = state / "no-exports.toml"
    tiers.write_text("[tiers.free]\ndaily_limit = 0\nmax_duration_seconds = 5\n")
    ledger = await postgres.create_database(pg_dsn, metering_template)
    closed = await postgres.create_database(pg_dsn, metering_template)
    try:
        async with (
            start_metering(ledger) as metering,
            start_metering(ledger, env={"METERING_AUTH_TOKENS": f"ops:{AUTH_TOKEN}"}) as metering_with_auth,
            start_metering(closed, env={"METERING_TIERS_FILE": str(tiers)}) as closed_metering,
            start_renderer(closed_metering.target, state / "renderer") as renderer,
            grpc.aio.insecure_channel(metering.target) as channel,
        ):
            # A few real exports, so that Complete and ExtendReservation reach more than NOT_FOUND.
            stub = metering_pb2_grpc.MeteringStub(channel)
            await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="owner", tier="unlimited"))
            known = []
            for n in range(4):
                answer = await stub.CheckAndReserve(
                    pb.CheckAndReserveRequest(
                        idempotency_key=f"setup-{n}", user_id="owner", project_id="p", render_mode=1, format="mp4",
                        duration_seconds=5, resolution="160x120",
                    )
                )
                known.append(answer.export_id)
            running = Servers()
            running.metering, running.renderer = metering.target, renderer.target
            running.metering_with_auth, running.known_exports = metering_with_auth.target, known
            yield running
    finally:
        for dsn in (ledger, closed):
            await postgres.drop_database(pg_dsn, dsn)


# --- checks ----------------------------------------------------------------------------------------------


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        answer = call
        if hasattr(answer, "__aiter__"):
            async for _ in answer:
                pass
        else:
            await answer
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return C.OK, ""


def assert_documented(rpc: str, code: grpc.StatusCode, details: str, request: object) -> None:
    event(code.name)  # the mix of answers shows with --hypothesis-show-statistics
    shown = str(request)[:300]
    assert code in DOCUMENTED, f"{rpc} answered {code.name}: {details[:300]!r} to {shown}"
    if code == C.INVALID_ARGUMENT:
        assert NAMES_A_FIELD.match(details), f"{rpc}: INVALID_ARGUMENT without a field: {details[:200]!r}"


async def assert_serving(channel: grpc.aio.Channel, within_seconds: float = 20.0) -> None:
    """The server still answers and is SERVING (a loaded machine may miss one database probe: allow a retry)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + within_seconds
    while True:
        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        if answer.status == health_pb2.HealthCheckResponse.SERVING:
            return
        assert asyncio.get_running_loop().time() < deadline, f"health stayed {answer.status}"
        await asyncio.sleep(0.2)


# Examples are drawn inside the test (st.data()): the strategies for Complete and ExtendReservation need the
# export ids the fixture made.


@pytest.mark.parametrize("rpc", [m.name for m in pb.DESCRIPTOR.services_by_name["Metering"].methods])
@EXAMPLES
@given(data=st.data())
async def test_metering_answers_hostile_requests_with_documented_codes(servers: Servers, rpc: str, data: Any) -> None:
    request = data.draw(metering_requests(servers.known_exports)[rpc], label="request")
    async with grpc.aio.insecure_channel(servers.metering) as channel:
        code, details = await outcome(getattr(metering_pb2_grpc.MeteringStub(channel), rpc)(request, timeout=30))
        assert_documented(rpc, code, details, request)
        await assert_serving(channel)


@pytest.mark.parametrize("rpc", [m.name for m in rpb.DESCRIPTOR.services_by_name["Renderer"].methods])
@EXAMPLES
@given(data=st.data())
async def test_renderer_answers_hostile_requests_with_documented_codes(servers: Servers, rpc: str, data: Any) -> None:
    request = data.draw(RENDERER_REQUESTS[rpc], label="request")
    async with grpc.aio.insecure_channel(servers.renderer) as channel:
        code, details = await outcome(getattr(renderer_pb2_grpc.RendererStub(channel), rpc)(request, timeout=30))
        assert_documented(rpc, code, details, request)
        # Nothing hostile may render: the quota stops whatever validation lets through.
        assert not (rpc == "StartRender" and code == C.OK), f"rendered {str(request)[:300]}"
        await assert_serving(channel)


raw_bytes = st.one_of(
    st.binary(max_size=2000),
    st.sampled_from([b"\x0a\xff\xff", b"\x0a\x02\xff\xfe", b"\xff" * 64, b"\x08" * 11, b"\x22\x80\x80\x80\x80\x10"]),
)


@pytest.mark.parametrize(
    ("service", "rpc", "streaming"),
    [(METERING, m.name, False) for m in pb.DESCRIPTOR.services_by_name["Metering"].methods]
    + [(RENDERER, m.name, m.server_streaming) for m in rpb.DESCRIPTOR.services_by_name["Renderer"].methods]
    # Health needs no credentials: anyone who reaches the port can send it garbage.
    + [(server + HEALTH, rpc, rpc == "Watch") for server in (METERING, RENDERER) for rpc in ("Check", "Watch")],
)
@EXAMPLES
@given(payload=raw_bytes)
@example(payload=b"\x0a\xff\xff")  # field 1, a length running past the end: once UNKNOWN from the renderer
@example(payload=b"\x0a\x02\xff\xfe")  # field 1, not UTF-8
async def test_random_bytes_as_the_request_get_documented_codes(
    servers: Servers, service: str, rpc: str, streaming: bool, payload: bytes
) -> None:
    target = servers.metering if service.startswith(METERING) else servers.renderer
    path = HEALTH + rpc if service.endswith(HEALTH) else service + rpc
    async with grpc.aio.insecure_channel(target) as channel:
        # Identity serializers: the bytes go on the wire as they are.
        method = (channel.unary_stream if streaming else channel.unary_unary)(path)
        if rpc == "Watch":  # a valid Watch streams forever: only its first answer matters here
            method = _first_answer(method)
        code, details = await outcome(method(payload, timeout=30))
        assert_documented(rpc, code, details, payload)
        assert not (rpc == "StartRender" and code == C.OK)
        await assert_serving(channel)


def _first_answer(method: Any) -> Any:
    """A Watch call that is cancelled after its first message (or its error)."""

    def call(payload: bytes, timeout: float) -> Any:
        return _FirstAnswer(method(payload, timeout=timeout))

    return call


class _FirstAnswer:
    def __init__(self, call: Any) -> None:
        self._call = call

    def __aiter__(self) -> Any:
        return self._first()

    async def _first(self) -> Any:
        async for item in self._call:
            yield item
            self._call.cancel()
            return


printable_ascii = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)


@EXAMPLES
@given(value=st.one_of(printable_ascii, printable_ascii.map("Bearer {}".format)), payload=raw_bytes)
async def test_hostile_credentials_are_unauthenticated(servers: Servers, value: str, payload: bytes) -> None:
    async with grpc.aio.insecure_channel(servers.metering_with_auth) as channel:
        method = channel.unary_unary(METERING + "SetAccountTier")
        code, details = await outcome(method(payload, metadata=(("authorization", value),), timeout=30))
        assert code == C.UNAUTHENTICATED, (code, details)
        assert AUTH_TOKEN not in details
        await assert_serving(channel)


def test_every_rpc_is_covered() -> None:
    assert set(metering_requests([str(uuid.uuid4())])) == {
        m.name for m in pb.DESCRIPTOR.services_by_name["Metering"].methods
    }
    assert set(RENDERER_REQUESTS) == {m.name for m in rpb.DESCRIPTOR.services_by_name["Renderer"].methods}


async def test_a_start_with_millions_of_empty_layers_is_refused_by_its_count_first(servers: Servers) -> None:
    # An empty layer is 2 bytes: 4 MB held two million, and building them all before the count was checked
    # held the renderer's event loop (every other call, stream and heartbeat) for 14 s, to refuse the request
    # for its height in the end. The count is now checked on the message, before anything is built.
    composition = rpb.Composition(width=160, height=99999, fps=10, duration_seconds=1)
    composition.texts.extend(rpb.TextLayer() for _ in range(200_000))
    request = rpb.StartRenderRequest(
        idempotency_key="many", user_id="u", project_id="p", composition=composition, format="mp4"
    )
    async with grpc.aio.insecure_channel(servers.renderer) as channel:
        code, details = await outcome(renderer_pb2_grpc.RendererStub(channel).StartRender(request, timeout=30))
        await assert_serving(channel)
    assert code == C.INVALID_ARGUMENT
    assert "composition.texts" in details and "at most 64 allowed, got 200000" in details
