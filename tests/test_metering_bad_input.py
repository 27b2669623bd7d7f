"""Bad input on every RPC: INVALID_ARGUMENT naming the field (with a BadRequest detail), never UNKNOWN or
INTERNAL, and nothing written."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2

from exportapi.metering.v1 import metering_pb2 as pb
from metering import pagination
from tests.support import postgres
from tests.support.metering import metering_stub, reserve_request, start_metering, status_details

SERVICE = "/exportapi.metering.v1.Metering/"
GOOD_ID = "00000000-0000-4000-8000-000000000000"


def reserve(**changes: object) -> pb.CheckAndReserveRequest:
    request = reserve_request("key", user="val", project="proj")
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def complete(**changes: object) -> pb.CompleteRequest:
    request = pb.CompleteRequest(export_id=GOOD_ID, outcome=pb.EXPORT_STATUS_COMPLETED)
    for name, value in changes.items():
        setattr(request, name, value)
    return request


def _forged_token(moment: str, export_id: object = "00000000-0000-0000-0000-000000000000") -> str:
    """A ListExports page token for user "val" built by hand: its filter tag is right, its cursor is not."""
    payload = {"v": 1, "t": moment, "id": export_id, "f": pagination._filter_tag("val", None)}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


CASES = [
    # CheckAndReserve
    ("CheckAndReserve", reserve(idempotency_key=""), "idempotency_key"),
    ("CheckAndReserve", reserve(idempotency_key="k" * 129), "idempotency_key"),
    ("CheckAndReserve", reserve(idempotency_key="line\nbreak"), "idempotency_key"),
    ("CheckAndReserve", reserve(user_id=""), "user_id"),
    ("CheckAndReserve", reserve(user_id="   "), "user_id"),
    ("CheckAndReserve", reserve(user_id="u" * 129), "user_id"),
    ("CheckAndReserve", reserve(user_id="nul\x00byte"), "user_id"),
    ("CheckAndReserve", reserve(project_id=""), "project_id"),
    ("CheckAndReserve", reserve(project_id="p" * 129), "project_id"),
    ("CheckAndReserve", reserve(render_mode=pb.RENDER_MODE_UNSPECIFIED), "render_mode"),
    ("CheckAndReserve", reserve(render_mode=99), "render_mode"),
    ("CheckAndReserve", reserve(format=""), "format"),
    ("CheckAndReserve", reserve(format="avi"), "format"),
    ("CheckAndReserve", reserve(format="MP4"), "format"),
    ("CheckAndReserve", reserve(format="mp4; DROP TABLE exports"), "format"),
    ("CheckAndReserve", reserve(duration_seconds=0), "duration_seconds"),
    ("CheckAndReserve", reserve(duration_seconds=-1), "duration_seconds"),
    ("CheckAndReserve", reserve(duration_seconds=math.nan), "duration_seconds"),
    ("CheckAndReserve", reserve(duration_seconds=math.inf), "duration_seconds"),
    ("CheckAndReserve", reserve(duration_seconds=1e12), "duration_seconds"),
    ("CheckAndReserve", reserve(resolution=""), "resolution"),
    ("CheckAndReserve", reserve(resolution="1920"), "resolution"),
    ("CheckAndReserve", reserve(resolution="1920x"), "resolution"),
    ("CheckAndReserve", reserve(resolution="0x100"), "resolution"),
    ("CheckAndReserve", reserve(resolution="100x0"), "resolution"),
    ("CheckAndReserve", reserve(resolution="99999x10"), "resolution"),
    ("CheckAndReserve", reserve(resolution="-5x5"), "resolution"),
    ("CheckAndReserve", reserve(resolution="1920x1080\n"), "resolution"),
    ("CheckAndReserve", reserve(resolution="1920x1080x3"), "resolution"),
    ("CheckAndReserve", reserve(resolution=" 1920x1080"), "resolution"),
    ("CheckAndReserve", reserve(request_digest="d" * 129), "request_digest"),
    ("CheckAndReserve", reserve(request_digest="tab\there"), "request_digest"),
    ("CheckAndReserve", reserve(request_digest="caf\u00e9"), "request_digest"),
    # Complete
    ("Complete", complete(export_id=""), "export_id"),
    ("Complete", complete(export_id="not-a-uuid"), "export_id"),
    ("Complete", complete(export_id="x" * 200), "export_id"),
    ("Complete", complete(outcome=pb.EXPORT_STATUS_UNSPECIFIED), "outcome"),
    ("Complete", complete(outcome=pb.EXPORT_STATUS_RESERVED), "outcome"),
    ("Complete", complete(outcome=pb.EXPORT_STATUS_EXPIRED), "outcome"),
    ("Complete", complete(outcome=42), "outcome"),
    ("Complete", complete(file_size_bytes=-1), "file_size_bytes"),
    ("Complete", complete(file_size_bytes=(1 << 40) + 1), "file_size_bytes"),  # sums of such would overflow
    ("Complete", complete(file_size_bytes=(1 << 63) - 1), "file_size_bytes"),
    ("Complete", complete(duration_seconds=-1), "duration_seconds"),
    ("Complete", complete(duration_seconds=math.nan), "duration_seconds"),
    ("Complete", complete(duration_seconds=math.inf), "duration_seconds"),
    ("Complete", complete(render_seconds=-0.5), "render_seconds"),
    ("Complete", complete(render_seconds=math.nan), "render_seconds"),
    ("Complete", complete(output_uri="s3://b/" + "k" * 3000), "output_uri"),
    ("Complete", complete(output_uri="file:///a\nb"), "output_uri"),
    # ExtendReservation
    ("ExtendReservation", pb.ExtendReservationRequest(export_id=""), "export_id"),
    ("ExtendReservation", pb.ExtendReservationRequest(export_id="12345"), "export_id"),
    # GetUsage
    ("GetUsage", pb.GetUsageRequest(user_id=""), "user_id"),
    ("GetUsage", pb.GetUsageRequest(user_id="u" * 129), "user_id"),
    # ListExports
    ("ListExports", pb.ListExportsRequest(user_id=""), "user_id"),
    ("ListExports", pb.ListExportsRequest(user_id="val", project_id=""), "project_id"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_size=-1), "page_size"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_size=1001), "page_size"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_token="garbage"), "page_token"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_token="!!!?"), "page_token"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_token="eyJ2IjoxfQ"), "page_token"),
    # Forged with the right filter tag: a moment before year 1 in UTC (the database cannot take it), an id not text.
    ("ListExports", pb.ListExportsRequest(user_id="val", page_token=_forged_token("0001-01-01T00:00:00+01:00")),
     "page_token"),
    ("ListExports", pb.ListExportsRequest(user_id="val", page_token=_forged_token("2030-01-01T00:00:00Z", 7)),
     "page_token"),
    # GetStats
    ("GetStats", pb.GetStatsRequest(days=-1), "days"),
    ("GetStats", pb.GetStatsRequest(days=100000), "days"),
    ("GetStats", pb.GetStatsRequest(user_id="u" * 129), "user_id"),
    ("GetStats", pb.GetStatsRequest(project_id="p" * 129), "project_id"),
    # SetAccountTier
    ("SetAccountTier", pb.SetAccountTierRequest(user_id="", tier="pro"), "user_id"),
    ("SetAccountTier", pb.SetAccountTierRequest(user_id="val", tier=""), "tier"),
    ("SetAccountTier", pb.SetAccountTierRequest(user_id="val", tier="platinum"), "tier"),
]


@pytest.fixture(scope="module")
async def shared_target(pg_dsn: str, metering_template: str) -> AsyncIterator[str]:
    """One server for the whole table: bad input writes nothing, so the cases cannot disturb each other."""
    dsn = await postgres.create_database(pg_dsn, metering_template)
    try:
        async with start_metering(dsn) as metering:
            yield metering.target
    finally:
        await postgres.drop_database(pg_dsn, dsn)


def test_the_table_covers_every_rpc() -> None:
    rpcs = {method.name for method in pb.DESCRIPTOR.services_by_name["Metering"].methods}
    assert {rpc for rpc, _, _ in CASES} == rpcs


@pytest.mark.parametrize(
    ("rpc", "request_message", "field"), CASES, ids=[f"{rpc}-{field}-{n}" for n, (rpc, _, field) in enumerate(CASES)]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    shared_target: str, rpc: str, request_message: object, field: str
) -> None:
    async with metering_stub(shared_target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(stub, rpc)(request_message)
    error = refused.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: ")
    (violation,) = status_details(error)[error_details_pb2.BadRequest].field_violations
    assert violation.field == field and violation.description


@pytest.mark.parametrize("rpc", [m.name for m in pb.DESCRIPTOR.services_by_name["Metering"].methods])
# Field 1 of every request is a string: a length running past the end, or bytes that are not UTF-8.
@pytest.mark.parametrize("payload", [b"\x0a\xff\xff", b"\x0a\x02\xff\xfe"], ids=["truncated", "bad-utf8"])
async def test_bytes_that_are_not_a_request_message_are_invalid_argument(
    shared_target: str, rpc: str, payload: bytes
) -> None:
    async with grpc.aio.insecure_channel(shared_target) as channel:
        call = channel.unary_unary(SERVICE + rpc)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(payload)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("request: ")


async def test_refused_input_writes_nothing(shared_target: str) -> None:
    async with metering_stub(shared_target) as stub:
        exports = await stub.ListExports(pb.ListExportsRequest(user_id="val"))
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="val"))).usage
        stats = await stub.GetStats(pb.GetStatsRequest())
    assert list(exports.exports) == []
    assert (usage.used, usage.tier) == (0, "free")
    assert stats.total_exports == 0
