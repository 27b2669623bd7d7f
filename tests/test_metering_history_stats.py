"""ListExports (keyset pages) and GetStats, checked against a hand count and against the ledger itself."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
import pytest

from exportapi.metering.v1 import metering_pb2 as pb
from tests.support.metering import FakeClock, metering_stub, reserve_request, start_metering

COMPLETED, FAILED, CANCELLED = pb.EXPORT_STATUS_COMPLETED, pb.EXPORT_STATUS_FAILED, pb.EXPORT_STATUS_CANCELLED
LOCAL, LAMBDA = pb.RENDER_MODE_LOCAL, pb.RENDER_MODE_LAMBDA


async def all_pages(stub: object, request: pb.ListExportsRequest) -> list[list[pb.Export]]:
    pages = []
    while True:
        answer = await stub.ListExports(request)  # type: ignore[attr-defined]
        pages.append(list(answer.exports))
        if not answer.next_page_token:
            return pages
        request.page_token = answer.next_page_token


async def test_list_exports_pages_newest_first_without_gaps_or_repeats(database_url: str) -> None:
    # A clock that stands still: every export has the same created_at, so only the id breaks ties.
    clock = FakeClock(datetime(2032, 2, 2, 8, 0, tzinfo=UTC))
    async with start_metering(database_url, clock=clock) as metering, metering_stub(metering.target) as stub:
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="lou", tier="unlimited"))
        made = []
        for n in range(7):
            if n == 4:
                clock.advance(1)
            answer = await stub.CheckAndReserve(reserve_request(f"k{n}", user="lou", project=f"p{n % 2}"))
            made.append(answer.export)
        pages = await all_pages(stub, pb.ListExportsRequest(user_id="lou", page_size=3))
        project_pages = await all_pages(stub, pb.ListExportsRequest(user_id="lou", project_id="p1", page_size=2))
        first = await stub.ListExports(pb.ListExportsRequest(user_id="lou", page_size=3))
        with pytest.raises(grpc.aio.AioRpcError) as other_query:
            await stub.ListExports(
                pb.ListExportsRequest(user_id="lou", project_id="p0", page_token=first.next_page_token)
            )
        with pytest.raises(grpc.aio.AioRpcError) as other_user:
            await stub.ListExports(pb.ListExportsRequest(user_id="max", page_token=first.next_page_token))

    assert [len(page) for page in pages] == [3, 3, 1]
    listed = [e for page in pages for e in page]
    assert sorted(e.export_id for e in listed) == sorted(e.export_id for e in made)
    keys = [(e.created_at.ToDatetime(), e.export_id) for e in listed]
    assert keys == sorted(keys, reverse=True)
    assert {e.idempotency_key for e in listed[:3]} == {"k4", "k5", "k6"}  # the newer second comes first
    assert [len(page) for page in project_pages] == [2, 1]
    assert {e.project_id for page in project_pages for e in page} == {"p1"}
    assert other_query.value.code() == other_user.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in other_query.value.details()


async def test_list_exports_pages_hold_50_by_default_and_at_most_1000(metering_target: str) -> None:
    async with metering_stub(metering_target) as stub:
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="big", tier="unlimited"))
        await asyncio.gather(*(stub.CheckAndReserve(reserve_request(f"k{n}", user="big")) for n in range(55)))
        default = await stub.ListExports(pb.ListExportsRequest(user_id="big"))
        everything = await stub.ListExports(pb.ListExportsRequest(user_id="big", page_size=1000))
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.ListExports(pb.ListExportsRequest(user_id="big", page_size=1001))
        nobody = await stub.ListExports(pb.ListExportsRequest(user_id="nobody"))
    assert len(default.exports) == 50 and default.next_page_token
    assert len(everything.exports) == 55 and not everything.next_page_token
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in too_big.value.details()
    assert list(nobody.exports) == [] and nobody.next_page_token == ""


TODAY = date(2032, 6, 15)


def at(day_offset: int, hour: int, second: int = 0) -> datetime:
    day = TODAY + timedelta(days=day_offset)
    return datetime(day.year, day.month, day.day, hour, 0, second, tzinfo=UTC)


async def wait_status(stub: object, user: str, status: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        exports = (await stub.ListExports(pb.ListExportsRequest(user_id=user))).exports  # type: ignore[attr-defined]
        if any(e.status == status for e in exports):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no export of {user} reached {status}")


async def test_get_stats_matches_a_hand_count(database_url: str) -> None:
    clock = FakeClock(at(-2, 10))
    env = {"METERING_REAPER_INTERVAL_SECONDS": "0.05"}
    async with (
        start_metering(database_url, lease_seconds=60, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):

        async def export(key: str, user: str, project: str, fmt: str, mode: int, seconds: float) -> str:
            request = reserve_request(key, user=user, project=project, format=fmt, mode=mode, seconds=seconds)
            return (await stub.CheckAndReserve(request)).export_id

        async def close(export_id: str, outcome: int, **measured: object) -> None:
            await stub.Complete(pb.CompleteRequest(export_id=export_id, outcome=outcome, **measured))

        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="amy", tier="pro"))
        # Two days ago: amy, two completed mp4 and a failed webm.
        r1 = await export("r1", "amy", "P1", "mp4", LOCAL, 10)
        await close(r1, COMPLETED, file_size_bytes=1000, duration_seconds=10, render_seconds=1.0)
        r2 = await export("r2", "amy", "P1", "mp4", LOCAL, 20)
        await close(r2, COMPLETED, file_size_bytes=3000, duration_seconds=20, render_seconds=3.0)
        r3 = await export("r3", "amy", "P1", "webm", LAMBDA, 10)
        await close(r3, FAILED, error="lambda timed out", render_seconds=9.0)
        # Yesterday: bob, a cancelled gif and an mp4 whose lease runs out.
        clock.moment = at(-1, 10)
        r4 = await export("r4", "bob", "P2", "gif", LOCAL, 5)
        await close(r4, CANCELLED)
        await export("r5", "bob", "P2", "mp4", LAMBDA, 5)
        clock.advance(61)
        await wait_status(stub, "bob", pb.EXPORT_STATUS_EXPIRED)
        # Today: amy again, one completed without a measured length, one still rendering.
        clock.moment = at(0, 9)
        r6 = await export("r6", "amy", "P1", "mp4", LOCAL, 5)
        await close(r6, COMPLETED, file_size_bytes=500, render_seconds=2.0)
        clock.moment = at(0, 9, 1)
        await export("r7", "amy", "P1", "mp4", LOCAL, 5)

        system = await stub.GetStats(pb.GetStatsRequest(days=3))
        bob = await stub.GetStats(pb.GetStatsRequest(user_id="bob", days=3))
        p1 = await stub.GetStats(pb.GetStatsRequest(project_id="P1"))
        today = await stub.GetStats(pb.GetStatsRequest(days=1))
        idle = await stub.GetStats(pb.GetStatsRequest(user_id="idle", days=2))

    assert (system.window_start_date, system.window_end_date) == ("2032-06-13", "2032-06-15")
    assert (system.total_exports, system.completed, system.failed, system.cancelled, system.expired) == (
        7, 3, 1, 1, 1,
    )
    assert system.in_flight == 1
    assert dict(system.by_format) == {"mp4": 5, "webm": 1, "gif": 1}
    assert dict(system.by_render_mode) == {"local": 5, "lambda": 2}
    assert system.favorite_format == "mp4"
    assert system.failure_rate == pytest.approx(1 / 4)
    assert system.avg_duration_seconds == pytest.approx((10 + 20 + 5) / 3)  # unmeasured: the length asked
    assert system.total_bytes == 4500
    assert system.p50_render_seconds == pytest.approx(2.0, rel=0.011)
    assert system.p95_render_seconds == pytest.approx(3.0, rel=0.011)
    assert system.last_export_at.ToDatetime(tzinfo=UTC) == at(0, 9, 1)
    daily = [(d.date, d.exports, d.completed, d.failed, d.cancelled, d.expired) for d in system.daily]
    assert daily == [
        ("2032-06-13", 3, 2, 1, 0, 0),
        ("2032-06-14", 2, 0, 0, 1, 1),
        ("2032-06-15", 2, 1, 0, 0, 0),
    ]
    assert [d.avg_duration_seconds for d in system.daily] == pytest.approx([15.0, 0.0, 5.0])
    users = [(u.user_id, u.total_exports, u.tier, u.used_today, u.favorite_format) for u in system.users]
    assert users == [("amy", 5, "pro", 2, "mp4"), ("bob", 2, "free", 0, "gif")]  # gif/mp4 tie: alphabetical
    assert system.users[0].daily_limit == 50 and system.users[1].daily_limit == 3
    assert [(p.project_id, p.user_id, p.export_count) for p in system.projects] == [
        ("P1", "amy", 5), ("P2", "bob", 2),
    ]

    assert (bob.total_exports, bob.cancelled, bob.expired, bob.completed, bob.in_flight) == (2, 1, 1, 0, 0)
    assert bob.failure_rate == 0 and bob.p50_render_seconds == 0
    assert [u.user_id for u in bob.users] == ["bob"] and [p.project_id for p in bob.projects] == ["P2"]

    assert len(p1.daily) == 30 and p1.daily[-1].date == "2032-06-15" and p1.daily[0].date == "2032-05-17"
    assert (p1.total_exports, p1.completed, p1.failed, p1.in_flight) == (5, 3, 1, 1)
    assert dict(p1.by_format) == {"mp4": 4, "webm": 1}

    assert (today.total_exports, today.completed, today.in_flight, len(today.daily)) == (2, 1, 1, 1)
    assert today.p50_render_seconds == pytest.approx(2.0, rel=0.011)

    assert idle.total_exports == 0 and [d.exports for d in idle.daily] == [0, 0]
    assert [(u.user_id, u.tier, u.total_exports, u.daily_limit) for u in idle.users] == [("idle", "free", 0, 3)]
    assert not idle.HasField("last_export_at")


async def test_get_stats_agrees_with_the_ledger_for_a_random_workload(database_url: str) -> None:
    rng = random.Random(20240601)
    clock = FakeClock(at(-3, 12))
    env = {"METERING_REAPER_INTERVAL_SECONDS": "3600"}
    users = [f"u{n}" for n in range(5)]
    projects = ["alpha", "beta", "gamma"]
    async with (
        start_metering(database_url, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        for user in users:
            await stub.SetAccountTier(pb.SetAccountTierRequest(user_id=user, tier="unlimited"))
        for n in range(80):
            clock.moment = at(-rng.randrange(4), rng.randrange(24), rng.randrange(60))
            request = reserve_request(
                f"k{n}",
                user=rng.choice(users),
                project=rng.choice(projects),
                format=rng.choice(["mp4", "webm", "gif"]),
                mode=rng.choice([LOCAL, LAMBDA]),
                seconds=rng.choice([2.0, 7.5, 30.0]),
            )
            export_id = (await stub.CheckAndReserve(request)).export_id
            outcome = rng.choice([COMPLETED, COMPLETED, FAILED, CANCELLED, None])
            if outcome is not None:
                await stub.Complete(
                    pb.CompleteRequest(
                        export_id=export_id,
                        outcome=outcome,
                        file_size_bytes=rng.randrange(1, 10**6) if outcome == COMPLETED else 0,
                        duration_seconds=rng.choice([0.0, request.duration_seconds - 0.01]),
                        render_seconds=round(rng.uniform(0.05, 40), 3),
                    )
                )
        clock.moment = at(0, 23, 59)
        scopes = [{}, {"user_id": "u1"}, {"project_id": "beta"}, {"user_id": "u2", "project_id": "alpha"}]
        answers = [await stub.GetStats(pb.GetStatsRequest(days=3, **scope)) for scope in scopes]

    connection = await asyncpg.connect(database_url)
    try:
        for scope, answer in zip(scopes, answers, strict=True):
            where = (
                "usage_day BETWEEN $1 AND $2 AND ($3::text IS NULL OR user_id = $3)"
                " AND ($4::text IS NULL OR project_id = $4)"
            )
            args = (TODAY - timedelta(days=2), TODAY, scope.get("user_id"), scope.get("project_id"))
            counts = await connection.fetchrow(
                f"""SELECT count(*) AS total,
                       count(*) FILTER (WHERE status = 'COMPLETED') AS completed,
                       count(*) FILTER (WHERE status = 'FAILED') AS failed,
                       count(*) FILTER (WHERE status = 'CANCELLED') AS cancelled,
                       count(*) FILTER (WHERE status = 'RESERVED') AS reserved,
                       coalesce(sum(file_size_bytes) FILTER (WHERE status = 'COMPLETED'), 0) AS bytes,
                       avg(coalesce(duration_seconds, requested_duration_seconds))
                           FILTER (WHERE status = 'COMPLETED') AS avg_length,
                       percentile_disc(0.5) WITHIN GROUP (ORDER BY render_seconds)
                           FILTER (WHERE status = 'COMPLETED') AS p50,
                       percentile_disc(0.95) WITHIN GROUP (ORDER BY render_seconds)
                           FILTER (WHERE status = 'COMPLETED') AS p95
                   FROM exports WHERE {where}""",
                *args,
            )
            by_format = dict(
                await connection.fetch(f"SELECT format, count(*) FROM exports WHERE {where} GROUP BY 1", *args)
            )
            daily = dict(
                await connection.fetch(f"SELECT usage_day, count(*) FROM exports WHERE {where} GROUP BY 1", *args)
            )
            assert counts["total"] > 0, scope
            assert answer.total_exports == counts["total"], scope
            assert (answer.completed, answer.failed, answer.cancelled, answer.in_flight) == (
                counts["completed"], counts["failed"], counts["cancelled"], counts["reserved"],
            ), scope
            assert answer.total_bytes == counts["bytes"], scope
            assert answer.avg_duration_seconds == pytest.approx(float(counts["avg_length"] or 0)), scope
            assert answer.p50_render_seconds == pytest.approx(counts["p50"] or 0, rel=0.011), scope
            assert answer.p95_render_seconds == pytest.approx(counts["p95"] or 0, rel=0.011), scope
            assert dict(answer.by_format) == by_format, scope
            assert [d.exports for d in answer.daily] == [
                daily.get(TODAY - timedelta(days=offset), 0) for offset in (2, 1, 0)
            ], scope
            # The busiest users and projects of the window, exports before it left out (exports of the day
            # before the window were reserved after some of the window's: late ones).
            top_users = await connection.fetch(
                f"""SELECT user_id, count(*) AS n, max(created_at) AS last,
                           (array_agg(format ORDER BY count_per_format DESC, format))[1] AS favorite
                    FROM (SELECT user_id, format, created_at,
                                 count(*) OVER (PARTITION BY user_id, format) AS count_per_format
                          FROM exports WHERE {where}) e
                    GROUP BY user_id ORDER BY n DESC, user_id LIMIT 10""",
                *args,
            )
            assert [
                (u.user_id, u.total_exports, u.last_export_at.ToDatetime(tzinfo=UTC), u.favorite_format)
                for u in answer.users
            ] == [(r["user_id"], r["n"], r["last"], r["favorite"]) for r in top_users], scope
            top_projects = await connection.fetch(
                f"""SELECT project_id, count(*) AS n, max(created_at) AS last FROM exports WHERE {where}
                    GROUP BY project_id ORDER BY n DESC, project_id LIMIT 10""",
                *args,
            )
            assert [
                (p.project_id, p.export_count, p.last_export_at.ToDatetime(tzinfo=UTC)) for p in answer.projects
            ] == [(r["project_id"], r["n"], r["last"]) for r in top_projects], scope
    finally:
        await connection.close()
