"""CheckAndReserve through gRPC: tier limits, their error details, idempotency, concurrency across replicas."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from exportapi.metering.v1 import metering_pb2 as pb
from metering import converters, errors, validation
from metering.domain import NewExport
from tests.support.metering import (
    FakeClock,
    metering_stub,
    reserve_request,
    start_metering,
    start_metering_subprocess,
    status_details,
)
from tests.support.postgres import run_sql


def next_utc_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


async def ledger_rows(database_url: str, user: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch("SELECT * FROM exports WHERE user_id = $1 ORDER BY created_at", user)
    finally:
        await connection.close()


async def test_a_free_user_gets_three_exports_a_day_and_the_fourth_is_refused_with_details(
    metering_target: str, database_url: str
) -> None:
    async with metering_stub(metering_target) as stub:
        answers = [await stub.CheckAndReserve(reserve_request(f"k{n}", user="alice")) for n in range(3)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CheckAndReserve(reserve_request("k3", user="alice"))
    now = answers[-1].export.created_at.ToDatetime(tzinfo=UTC)

    assert [a.usage.used for a in answers] == [1, 2, 3]
    assert [a.usage.remaining for a in answers] == [2, 1, 0]
    assert [a.usage.in_flight for a in answers] == [1, 2, 3]
    last = answers[-1]
    assert (last.usage.tier, last.usage.limit, last.usage.max_duration_seconds) == ("free", 3, 30.0)
    assert last.usage.resets_at.ToDatetime(tzinfo=UTC) == next_utc_midnight(now)
    assert all(not a.replayed and a.export.status == pb.EXPORT_STATUS_RESERVED for a in answers)
    assert len({a.export_id for a in answers}) == 3
    lease = last.lease_expires_at.ToDatetime(tzinfo=UTC) - last.export.created_at.ToDatetime(tzinfo=UTC)
    assert lease == timedelta(seconds=120)

    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "Daily export limit reached (3 for free tier)"
    details = status_details(error)
    (violation,) = details[error_details_pb2.QuotaFailure].violations
    assert violation.subject == "user:alice"
    assert violation.quota_value == 3 and violation.quota_dimensions["tier"] == "free"
    retry = details[error_details_pb2.RetryInfo].retry_delay.ToTimedelta()
    assert abs((now + retry) - next_utc_midnight(now)) < timedelta(seconds=30)
    info = details[error_details_pb2.ErrorInfo]
    assert info.reason == "DAILY_EXPORT_LIMIT"
    assert datetime.fromisoformat(info.metadata["resets_at"]) == next_utc_midnight(now)

    assert len(await ledger_rows(database_url, "alice")) == 3


async def test_a_video_longer_than_the_tier_allows_is_failed_precondition(
    metering_target: str, database_url: str
) -> None:
    async with metering_stub(metering_target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.CheckAndReserve(reserve_request("long", user="bob", seconds=30.5))
        at_the_cap = await stub.CheckAndReserve(reserve_request("cap", user="bob", seconds=30))
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="bob", tier="pro"))
        pro_long = await stub.CheckAndReserve(reserve_request("pro", user="bob", seconds=120))
        with pytest.raises(grpc.aio.AioRpcError) as pro_too_long:
            await stub.CheckAndReserve(reserve_request("pro-long", user="bob", seconds=121))

    assert too_long.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "30 s" in too_long.value.details() and "free" in too_long.value.details()
    (violation,) = status_details(too_long.value)[error_details_pb2.PreconditionFailure].violations
    assert (violation.type, violation.subject) == ("TIER_MAX_DURATION", "user:bob")
    assert error_details_pb2.RetryInfo not in status_details(too_long.value)
    assert pro_too_long.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert at_the_cap.usage.used == 1 and pro_long.usage.used == 2 and pro_long.usage.limit == 50
    assert len(await ledger_rows(database_url, "bob")) == 2


async def test_an_unlimited_user_has_no_count_or_length_cap(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        account = (await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="uma", tier="unlimited"))).account
        answers = [
            await stub.CheckAndReserve(reserve_request(f"u{n}", user="uma", seconds=3600)) for n in range(60)
        ]
    assert account.tier == "unlimited" and account.created_at.seconds > 0
    last = answers[-1].usage
    assert last.used == 60
    assert not last.HasField("limit") and not last.HasField("remaining")
    assert not last.HasField("max_duration_seconds")


async def test_set_account_tier_takes_effect_at_once_and_keeps_created_at(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        for n in range(3):
            await stub.CheckAndReserve(reserve_request(f"k{n}", user="pat"))
        first = (await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="pat", tier="pro"))).account
        fourth = await stub.CheckAndReserve(reserve_request("k3", user="pat"))
        again = (await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="pat", tier="free"))).account
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="pat"))).usage
    assert fourth.usage.used == 4 and fourth.usage.tier == "pro" and fourth.usage.remaining == 46
    assert again.created_at == first.created_at and again.updated_at.ToDatetime() >= first.updated_at.ToDatetime()
    assert (usage.tier, usage.used, usage.remaining) == ("free", 4, 0)


async def test_tiers_come_from_the_tiers_file_with_a_per_project_cap(database_url: str, tmp_path: Path) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(
        "[tiers.free]\ndaily_limit = 5\nmax_duration_seconds = 10\nproject_daily_limit = 2\n"
        "[tiers.team]\ndaily_limit = 100\n"
    )
    async with (
        start_metering(database_url, env={"METERING_TIERS_FILE": str(tiers)}) as metering,
        metering_stub(metering.target) as stub,
    ):
        for n in range(2):
            await stub.CheckAndReserve(reserve_request(f"a{n}", user="tess", project="A", seconds=10))
        with pytest.raises(grpc.aio.AioRpcError) as project_full:
            await stub.CheckAndReserve(reserve_request("a2", user="tess", project="A", seconds=10))
        other_project = await stub.CheckAndReserve(reserve_request("b0", user="tess", project="B", seconds=10))
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.CheckAndReserve(reserve_request("b1", user="tess", project="B", seconds=11))
        team = (await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="tess", tier="team"))).account

    assert project_full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert project_full.value.details() == "Daily export limit reached for project A (2 for free tier)"
    details = status_details(project_full.value)
    assert details[error_details_pb2.QuotaFailure].violations[0].subject == "project:A"
    assert error_details_pb2.RetryInfo in details
    assert other_project.usage.used == 3 and other_project.usage.limit == 5
    assert too_long.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert team.tier == "team"


async def test_a_replay_returns_the_original_reservation_even_when_the_day_is_full(
    metering_target: str, database_url: str
) -> None:
    async with metering_stub(metering_target) as stub:
        original = [await stub.CheckAndReserve(reserve_request(f"k{n}", user="rita")) for n in range(3)]
        replay = await stub.CheckAndReserve(reserve_request("k2", user="rita"))
    assert replay.replayed and not original[2].replayed
    assert replay.export_id == original[2].export_id
    assert replay.export == original[2].export
    assert replay.usage.used == 3
    assert len(await ledger_rows(database_url, "rita")) == 3


async def test_the_same_key_for_a_different_request_is_already_exists(
    metering_target: str, database_url: str
) -> None:
    async with metering_stub(metering_target) as stub:
        original = await stub.CheckAndReserve(reserve_request("shared", user="sam", seconds=10))
        with pytest.raises(grpc.aio.AioRpcError) as clash:
            await stub.CheckAndReserve(reserve_request("shared", user="sam", seconds=11))
        with pytest.raises(grpc.aio.AioRpcError) as other_format:
            await stub.CheckAndReserve(reserve_request("shared", user="sam", seconds=10, format="gif"))
        # Keys are per user: another user may use the same key.
        other_user = await stub.CheckAndReserve(reserve_request("shared", user="sue", seconds=11))
    assert clash.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert original.export_id in clash.value.details()
    assert other_format.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert not other_user.replayed and other_user.export_id != original.export_id
    assert len(await ledger_rows(database_url, "sam")) == 1


def digested(request: pb.CheckAndReserveRequest, digest: str) -> pb.CheckAndReserveRequest:
    request.request_digest = digest
    return request


def legacy_fingerprint(user: str, project: str, mode: str, fmt: str, seconds: float, resolution: str) -> str:
    """The fingerprint as it was computed before `request_digest` existed (rows written then still replay)."""
    canonical = json.dumps([user, project, mode, fmt, repr(float(seconds)), resolution], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def test_the_same_key_with_another_request_digest_is_already_exists(
    metering_target: str, database_url: str
) -> None:
    """The renderer sends a digest of the composition: the same key with another composition (same length,
    size and format) is a different request, even for a renderer that never saw the first call."""
    async with metering_stub(metering_target) as stub:
        original = await stub.CheckAndReserve(digested(reserve_request("k", user="dora"), "composition-a"))
        replay = await stub.CheckAndReserve(digested(reserve_request("k", user="dora"), "composition-a"))
        clashes = []
        for digest in ("composition-b", ""):
            with pytest.raises(grpc.aio.AioRpcError) as clash:
                await stub.CheckAndReserve(digested(reserve_request("k", user="dora"), digest))
            clashes.append(clash.value)
        # Without a digest, as before: replayed on the other fields alone; a digest added later is another request.
        plain = await stub.CheckAndReserve(reserve_request("plain", user="dora"))
        plain_replay = await stub.CheckAndReserve(reserve_request("plain", user="dora"))
        with pytest.raises(grpc.aio.AioRpcError) as added:
            await stub.CheckAndReserve(digested(reserve_request("plain", user="dora"), "composition-a"))
    assert not original.replayed and replay.replayed and replay.export_id == original.export_id
    for error in clashes:
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        assert original.export_id in error.details()
    assert not plain.replayed and plain_replay.replayed and plain_replay.export_id == plain.export_id
    assert added.value.code() == grpc.StatusCode.ALREADY_EXISTS
    rows = {row["idempotency_key"]: row for row in await ledger_rows(database_url, "dora")}
    assert sorted(rows) == ["k", "plain"]
    assert rows["plain"]["request_fingerprint"] == legacy_fingerprint(
        "dora", "project-1", "local", "mp4", 10.0, "160x120"
    )
    assert rows["k"]["request_fingerprint"] != legacy_fingerprint("dora", "project-1", "local", "mp4", 10.0, "160x120")


async def test_request_digests_are_checked_in_a_batch_too(database_url: str) -> None:
    """The batch path (several calls recorded in one transaction) stores and compares the same fingerprint as
    a call alone: recorded in a batch, replayed from a batch, refused from a batch. `_reserve_batch` is called
    directly, as the batcher calls it, so that each batch surely holds several calls."""

    def new(key: str, user: str, digest: str = "") -> NewExport:
        return validation.new_export(converters.reserve_request(digested(reserve_request(key, user=user), digest)))

    async with start_metering(database_url) as metering:
        core = metering.server.core
        assert core is not None
        first = await core._reserve_batch([new("f1", "filler-1"), new("k", "bea", "a"), new("p", "bea")])
        second = await core._reserve_batch(
            [new("f2", "filler-2"), new("k", "bea", "a"), new("p", "bea"), new("f3", "filler-3")]
        )
        third = await core._reserve_batch(
            [new("f4", "filler-4"), new("k", "bea", "b"), new("p", "bea", "a"), new("f5", "filler-5")]
        )
        fourth = await core._reserve_batch([new("f6", "filler-6"), new("k", "bea")])
    assert not any(isinstance(outcome, Exception) for outcome in (*first, *second))
    keyed, plain = first[1].export.export_id, first[2].export.export_id  # type: ignore[union-attr]
    assert not first[1].replayed and not first[2].replayed  # type: ignore[union-attr]
    assert second[1].replayed and second[1].export.export_id == keyed  # type: ignore[union-attr]
    assert second[2].replayed and second[2].export.export_id == plain  # type: ignore[union-attr]
    for outcome, export_id in ((third[1], keyed), (third[2], plain), (fourth[1], keyed)):
        assert isinstance(outcome, errors.AlreadyExists) and export_id in str(outcome), outcome
    assert not isinstance(third[0], Exception) and not isinstance(fourth[0], Exception)
    rows = {row["idempotency_key"]: row for row in await ledger_rows(database_url, "bea")}
    assert sorted(rows) == ["k", "p"]
    assert rows["p"]["request_fingerprint"] == legacy_fingerprint("bea", "project-1", "local", "mp4", 10.0, "160x120")


async def test_concurrent_calls_with_one_key_and_two_digests_make_one_export(
    metering_target: str, database_url: str
) -> None:
    """Whichever digest is recorded first wins: its calls get that export, the other digest's calls
    ALREADY_EXISTS, whether each call was recorded alone or in a batch with others' reservations."""
    async with metering_stub(metering_target) as stub:
        calls = []
        for n in range(12):
            calls.append(stub.CheckAndReserve(digested(reserve_request("same", user="cleo"), "ab"[n % 2])))
            calls.append(stub.CheckAndReserve(reserve_request("own", user=f"crowd-{n}")))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    mine = outcomes[0::2]
    granted = [(n, o) for n, o in enumerate(mine) if isinstance(o, pb.CheckAndReserveResponse)]
    refused = [(n, o) for n, o in enumerate(mine) if isinstance(o, grpc.aio.AioRpcError)]
    assert len(granted) + len(refused) == 12, mine
    assert len({o.export_id for _, o in granted}) == 1
    assert sum(not o.replayed for _, o in granted) == 1
    assert len({n % 2 for n, _ in granted}) == 1  # one digest only
    assert {n % 2 for n, _ in refused} == {1 - granted[0][0] % 2}
    assert all(o.code() == grpc.StatusCode.ALREADY_EXISTS for _, o in refused)
    assert all(isinstance(o, pb.CheckAndReserveResponse) for o in outcomes[1::2])
    assert len(await ledger_rows(database_url, "cleo")) == 1


async def test_twenty_concurrent_replays_of_one_key_make_one_export(
    metering_target: str, database_url: str
) -> None:
    async with metering_stub(metering_target) as stub:
        answers = await asyncio.gather(
            *(stub.CheckAndReserve(reserve_request("same", user="zoe")) for _ in range(20))
        )
    assert len({a.export_id for a in answers}) == 1
    assert sum(not a.replayed for a in answers) == 1
    rows = await ledger_rows(database_url, "zoe")
    assert len(rows) == 1 and str(rows[0]["export_id"]) == answers[0].export_id
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT used FROM daily_usage WHERE user_id = 'zoe'") == 1
    finally:
        await connection.close()


async def test_a_hundred_concurrent_reservations_through_two_replicas_let_exactly_three_through(
    database_url: str,
) -> None:
    async with (
        start_metering(database_url) as in_process,
        start_metering_subprocess(database_url) as other_process,
        metering_stub(in_process.target) as first,
        metering_stub(other_process.target) as second,
    ):
        stubs = (first, second)
        outcomes = await asyncio.gather(
            *(stubs[n % 2].CheckAndReserve(reserve_request(f"race-{n}", user="rush")) for n in range(100)),
            return_exceptions=True,
        )
    granted = [o for o in outcomes if isinstance(o, pb.CheckAndReserveResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(granted) == 3 and len(refused) == 97, Counter(type(o).__name__ for o in outcomes)
    assert sorted(g.usage.used for g in granted) == [1, 2, 3]
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "Daily export limit reached (3 for free tier)"
        details = status_details(error)
        assert error_details_pb2.QuotaFailure in details and error_details_pb2.RetryInfo in details
    rows = await ledger_rows(database_url, "rush")
    assert sorted(str(r["export_id"]) for r in rows) == sorted(g.export_id for g in granted)


async def test_the_count_resets_at_utc_midnight(database_url: str) -> None:
    clock = FakeClock(datetime(2030, 5, 17, 23, 59, 59, 500000, tzinfo=UTC))
    async with start_metering(database_url, clock=clock) as metering, metering_stub(metering.target) as stub:
        for n in range(3):
            await stub.CheckAndReserve(reserve_request(f"d1-{n}", user="nina"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CheckAndReserve(reserve_request("d1-3", user="nina"))
        clock.advance(0.5)  # exactly midnight: a new day
        next_day = await stub.CheckAndReserve(reserve_request("d2-0", user="nina"))
    retry = status_details(refused.value)[error_details_pb2.RetryInfo].retry_delay.ToTimedelta()
    assert retry == timedelta(milliseconds=500)
    assert next_day.usage.used == 1 and next_day.usage.in_flight == 4
    assert next_day.usage.resets_at.ToDatetime(tzinfo=UTC) == datetime(2030, 5, 19, tzinfo=UTC)
    assert next_day.export.created_at.ToDatetime(tzinfo=UTC) == datetime(2030, 5, 18, tzinfo=UTC)


async def test_get_usage_of_a_user_never_seen_is_an_empty_free_day(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="newcomer"))).usage
    assert (usage.user_id, usage.tier, usage.used, usage.limit, usage.remaining, usage.in_flight) == (
        "newcomer", "free", 0, 3, 3, 0,
    )
    assert usage.max_duration_seconds == 30.0
    assert usage.resets_at.ToDatetime(tzinfo=UTC) == next_utc_midnight(datetime.now(UTC))


async def test_a_day_row_gone_from_under_a_replica_is_made_again(database_url: str) -> None:
    """A replica remembers which day rows and counters exist, to skip creating them; when they are gone after
    all (a database restored from a backup, say), the reservation creates them and counts as ever."""
    async with start_metering(database_url) as metering, metering_stub(metering.target) as stub:
        await stub.CheckAndReserve(reserve_request("first", user="restored", project="film"))
        await run_sql(
            database_url,
            "DELETE FROM daily_usage WHERE user_id = 'restored'",
            "DELETE FROM project_daily_usage WHERE project_id = 'film'",
            "DELETE FROM export_counters WHERE id IN ('restored', 'film')",
        )
        answer = await stub.CheckAndReserve(reserve_request("second", user="restored", project="film"))
    assert answer.export_id
    assert answer.usage.used == 1  # the day row was made again from nothing: only this reservation is on it
