"""Complete, ExtendReservation and lease expiry: what closes an export and what gives a slot back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from exportapi.metering.v1 import metering_pb2 as pb
from tests.support.metering import FakeClock, metering_stub, reserve_request, start_metering, status_details

COMPLETED, FAILED, CANCELLED = pb.EXPORT_STATUS_COMPLETED, pb.EXPORT_STATUS_FAILED, pb.EXPORT_STATUS_CANCELLED


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def fetchval(database_url: str, query: str, *args: object) -> object:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def test_complete_records_the_outcome_and_every_measurement(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        reserved = await stub.CheckAndReserve(reserve_request("k", user="ann", seconds=12))
        done = (
            await stub.Complete(
                pb.CompleteRequest(
                    export_id=reserved.export_id,
                    outcome=COMPLETED,
                    file_size_bytes=123456,
                    duration_seconds=11.96,
                    output_uri="s3://bucket/ann/k.mp4",
                    render_seconds=4.25,
                )
            )
        ).export
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="ann"))).usage
    assert done.export_id == reserved.export_id and done.status == COMPLETED
    assert (done.file_size_bytes, done.duration_seconds, done.output_uri, done.render_seconds) == (
        123456, 11.96, "s3://bucket/ann/k.mp4", 4.25,
    )
    assert done.requested_duration_seconds == 12
    assert done.completed_at.ToDatetime() >= done.created_at.ToDatetime()
    assert (usage.used, usage.in_flight) == (1, 0)  # a completed export still counts


async def test_complete_again_with_the_same_outcome_is_ok_and_changes_nothing(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        reserved = await stub.CheckAndReserve(reserve_request("k", user="ben"))
        first = await stub.Complete(
            pb.CompleteRequest(export_id=reserved.export_id, outcome=COMPLETED, file_size_bytes=10)
        )
        again = await stub.Complete(
            pb.CompleteRequest(export_id=reserved.export_id, outcome=COMPLETED, file_size_bytes=99)
        )
        with pytest.raises(grpc.aio.AioRpcError) as different:
            await stub.Complete(pb.CompleteRequest(export_id=reserved.export_id, outcome=FAILED, error="late"))
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="ben"))).usage
    assert again.export == first.export and again.export.file_size_bytes == 10
    assert different.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPLETED" in different.value.details()
    assert error_details_pb2.PreconditionFailure in status_details(different.value)
    assert usage.used == 1


@pytest.mark.parametrize("outcome", [FAILED, CANCELLED])
async def test_failed_and_cancelled_exports_give_their_slot_back(metering_target: str, outcome: int) -> None:
    async with metering_stub(metering_target) as stub:
        reserved = [await stub.CheckAndReserve(reserve_request(f"k{n}", user="cat")) for n in range(3)]
        closed = await stub.Complete(
            pb.CompleteRequest(export_id=reserved[0].export_id, outcome=outcome, error="ffmpeg exited 1")
        )
        fourth = await stub.CheckAndReserve(reserve_request("k3", user="cat"))
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.CheckAndReserve(reserve_request("k4", user="cat"))
    assert closed.export.status == outcome and closed.export.error == "ffmpeg exited 1"
    assert fourth.usage.used == 3
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_error_text_is_kept_but_bounded_to_4_kib(metering_target: str) -> None:
    text = "é" * 5000 + "\x00tail"  # 10 000 bytes of UTF-8, and a NUL PostgreSQL cannot store
    async with metering_stub(metering_target) as stub:
        reserved = await stub.CheckAndReserve(reserve_request("k", user="dan"))
        closed = await stub.Complete(pb.CompleteRequest(export_id=reserved.export_id, outcome=FAILED, error=text))
        (listed,) = (await stub.ListExports(pb.ListExportsRequest(user_id="dan"))).exports
    assert closed.export.error == "é" * 2048
    assert listed.error == closed.export.error and len(listed.error.encode()) == 4096


async def test_unknown_exports_are_not_found(metering_target: str) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    async with metering_stub(metering_target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as complete:
            await stub.Complete(pb.CompleteRequest(export_id=unknown, outcome=COMPLETED))
        with pytest.raises(grpc.aio.AioRpcError) as extend:
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=unknown))
    assert complete.value.code() == extend.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown in complete.value.details()


async def test_extend_reservation_renews_only_a_reserved_export(database_url: str) -> None:
    clock = FakeClock(datetime(2031, 1, 10, 12, 0, tzinfo=UTC))
    env = {"METERING_REAPER_INTERVAL_SECONDS": "3600"}  # this test drives expiry itself
    async with (
        start_metering(database_url, lease_seconds=60, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        reserved = await stub.CheckAndReserve(reserve_request("k", user="eve"))
        clock.advance(50)
        extended = await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=reserved.export_id))
        clock.advance(50)  # past the first lease, inside the renewed one
        still = await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=reserved.export_id))
        await stub.Complete(pb.CompleteRequest(export_id=reserved.export_id, outcome=CANCELLED))
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=reserved.export_id))
    start = datetime(2031, 1, 10, 12, 0, tzinfo=UTC)
    assert reserved.lease_expires_at.ToDatetime(tzinfo=UTC) == start + timedelta(seconds=60)
    assert extended.lease_expires_at.ToDatetime(tzinfo=UTC) == start + timedelta(seconds=110)
    assert still.lease_expires_at.ToDatetime(tzinfo=UTC) == start + timedelta(seconds=160)
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in closed.value.details()


async def test_extending_a_lease_that_already_ran_out_expires_it_instead(database_url: str) -> None:
    clock = FakeClock(datetime(2031, 1, 10, 12, 0, tzinfo=UTC))
    env = {"METERING_REAPER_INTERVAL_SECONDS": "3600"}
    async with (
        start_metering(database_url, lease_seconds=60, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        reserved = await stub.CheckAndReserve(reserve_request("k", user="fay"))
        clock.advance(61)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=reserved.export_id))
        (listed,) = (await stub.ListExports(pb.ListExportsRequest(user_id="fay"))).exports
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="fay"))).usage
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "EXPIRED" in late.value.details()
    assert listed.status == pb.EXPORT_STATUS_EXPIRED
    assert (usage.used, usage.in_flight) == (0, 0)


async def test_an_unrenewed_reservation_expires_and_a_late_complete_is_still_recorded(database_url: str) -> None:
    async with start_metering(database_url, lease_seconds=1) as metering, metering_stub(metering.target) as stub:
        reserved = [await stub.CheckAndReserve(reserve_request(f"k{n}", user="gus")) for n in range(3)]

        async def slots_returned() -> bool:
            usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="gus"))).usage
            return usage.used == 0 and usage.in_flight == 0

        await eventually(slots_returned)
        expired = (await stub.ListExports(pb.ListExportsRequest(user_id="gus"))).exports
        fresh = await stub.CheckAndReserve(reserve_request("k3", user="gus"))
        late_done = await stub.Complete(
            pb.CompleteRequest(
                export_id=reserved[0].export_id, outcome=COMPLETED, file_size_bytes=5, output_uri="file:///x.mp4"
            )
        )
        late_failed = await stub.Complete(
            pb.CompleteRequest(export_id=reserved[1].export_id, outcome=FAILED, error="worker died")
        )
        with pytest.raises(grpc.aio.AioRpcError) as extend:
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=reserved[2].export_id))
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="gus"))).usage

    assert {e.status for e in expired} == {pb.EXPORT_STATUS_EXPIRED}
    assert fresh.usage.used == 1
    assert late_done.export.status == COMPLETED and late_done.export.output_uri == "file:///x.mp4"
    assert late_failed.export.status == FAILED and late_failed.export.error == "worker died"
    assert extend.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The fresh reservation plus the late COMPLETED, which counts again; the late FAILED does not.
    assert (usage.used, usage.in_flight) == (2, 1)
    expired_at = await fetchval(
        database_url, "SELECT expired_at FROM exports WHERE export_id = $1::uuid", reserved[0].export_id
    )
    assert expired_at is not None


async def test_a_late_completed_counts_against_the_day_the_export_was_made(database_url: str) -> None:
    clock = FakeClock(datetime(2031, 3, 1, 23, 59, 30, tzinfo=UTC))
    env = {"METERING_REAPER_INTERVAL_SECONDS": "0.1"}
    async with (
        start_metering(database_url, lease_seconds=20, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        reserved = await stub.CheckAndReserve(reserve_request("k", user="hal"))
        clock.advance(60)  # the next day, the lease long gone

        async def expired() -> bool:
            return await fetchval(database_url, "SELECT used FROM daily_usage WHERE user_id = 'hal'") == 0

        await eventually(expired)
        await stub.Complete(pb.CompleteRequest(export_id=reserved.export_id, outcome=COMPLETED))
        today = (await stub.GetUsage(pb.GetUsageRequest(user_id="hal"))).usage
    first_day = await fetchval(
        database_url, "SELECT used FROM daily_usage WHERE user_id = 'hal' AND day = $1", date(2031, 3, 1)
    )
    assert first_day == 1
    assert today.used == 0


async def test_two_replicas_reap_each_overdue_reservation_exactly_once(database_url: str) -> None:
    env = {"METERING_REAPER_INTERVAL_SECONDS": "0.05"}
    async with (
        start_metering(database_url, lease_seconds=1, env=env) as first,
        start_metering(database_url, lease_seconds=1, env=env) as second,
        metering_stub(first.target) as stub,
    ):
        users = [f"user-{n}" for n in range(20)]
        for user in users:
            await stub.CheckAndReserve(reserve_request("k", user=user))

        async def all_expired() -> bool:
            return await fetchval(database_url, "SELECT count(*) FROM exports WHERE status = 'EXPIRED'") == 20

        await eventually(all_expired)
        await asyncio.sleep(0.3)  # let both reapers take more turns: nothing may change any more
        assert second.server.core is not None
    assert await fetchval(database_url, "SELECT sum(used) FROM daily_usage") == 0
    assert await fetchval(database_url, "SELECT sum(expired) FROM export_rollups") == 20
    assert await fetchval(database_url, "SELECT sum(reserved) FROM export_rollups") == 0
