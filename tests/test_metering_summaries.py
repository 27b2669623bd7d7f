"""The system-wide summaries (migrations/0003): whatever order the days come in, alone or in batches, and
when a reservation's day ends while it waits for the first reservation of the next day, the service leaves
exactly what rebuild_export_summaries() computes from the rollups afterwards; folding the deltas while
writers append them neither loses nor doubles one."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from exportapi.metering.v1 import metering_pb2 as pb
from tests.support.faults import ledger_violations
from tests.support.metering import FakeClock, metering_stub, reserve_request, run_maintenance_cli, start_metering
from tests.support.postgres import run_sql

SUMMARIES = {
    "system_rollups": """SELECT day, format, render_mode, exports, reserved, completed, failed, cancelled,
                                expired, round(completed_duration_seconds::numeric, 6), completed_bytes,
                                last_export_at
                         FROM system_rollups ORDER BY 1, 2, 3""",
    "system_render_time_histogram": "SELECT day, bucket, count FROM system_render_time_histogram ORDER BY 1, 2",
    "export_counters": "SELECT * FROM export_counters WHERE exports > 0 ORDER BY kind, id",
    "export_counter_history": "SELECT * FROM export_counter_history WHERE exports > 0 ORDER BY kind, id, day",
}
DAY0 = datetime(2032, 3, 1, tzinfo=UTC)
UNLIMITED = {"METERING_REAPER_INTERVAL_SECONDS": "3600"}


async def summaries(connection: asyncpg.Connection) -> dict[str, list[tuple]]:
    """The summaries with every delta folded in."""
    await connection.execute("SELECT compact_export_summaries()")
    assert await connection.fetchval("SELECT count(*) FROM system_rollup_deltas") == 0
    return {name: [tuple(row) for row in await connection.fetch(sql)] for name, sql in SUMMARIES.items()}


async def rebuilt(connection: asyncpg.Connection) -> dict[str, list[tuple]]:
    async with connection.transaction():
        await connection.execute("SELECT rebuild_export_summaries()")
        return await summaries(connection)


async def kept_equals_rebuilt(database_url: str) -> dict[str, list[tuple]]:
    assert await ledger_violations(database_url) == []
    connection = await asyncpg.connect(database_url)
    try:
        kept = await summaries(connection)
        assert kept == await rebuilt(connection)
        return kept
    finally:
        await connection.close()


async def test_the_summaries_agree_with_a_rebuild_whatever_the_order_of_days(database_url: str) -> None:
    rng = random.Random(7)
    clock = FakeClock(DAY0)
    users = [f"u{n}" for n in range(5)]
    async with start_metering(database_url, env=UNLIMITED, clock=clock) as metering, metering_stub(
        metering.target
    ) as stub:
        for user in users:
            await stub.SetAccountTier(pb.SetAccountTierRequest(user_id=user, tier="unlimited"))
        for burst in range(40):
            # Mostly a later day, sometimes one already past; a burst of concurrent calls is recorded in batches.
            clock.moment = DAY0 + timedelta(days=rng.choice([0, 1, 2, 3, 5, 8]), seconds=burst)
            requests = [
                reserve_request(
                    f"k{burst}-{n}", user=rng.choice(users), project=f"p{rng.randrange(3)}",
                    format=rng.choice(["mp4", "webm", "gif"]), seconds=2.0,
                )
                for n in range(rng.choice([1, 1, 4, 12]))
            ]
            answers = await asyncio.gather(*(stub.CheckAndReserve(request) for request in requests))
            for answer in answers[: len(answers) // 2]:
                await stub.Complete(
                    pb.CompleteRequest(
                        export_id=answer.export_id, outcome=pb.EXPORT_STATUS_COMPLETED, file_size_bytes=10,
                        render_seconds=rng.uniform(0.5, 5),
                    )
                )
    kept = await kept_equals_rebuilt(database_url)
    assert kept["export_counter_history"], "no day ever moved on: the test exercised nothing"
    assert sum(row[3] for row in kept["system_rollups"]) == sum(
        row[2] for row in kept["export_counters"] if row[0] == "user"
    )


async def test_a_reservation_whose_day_ended_while_it_waited_is_counted_once(database_url: str) -> None:
    """The first reservation of day 2 takes the user's counter while one of day 1 (its day ended while it
    waited) queues behind it; the late one must add to the history the first wrote, which its statement's
    snapshot, taken before the first committed, cannot see."""
    clock = FakeClock(DAY0 + timedelta(hours=23, minutes=59))
    async with start_metering(database_url, env=UNLIMITED, clock=clock) as metering, metering_stub(
        metering.target
    ) as stub:
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="night", tier="unlimited"))
        await stub.CheckAndReserve(reserve_request("before", user="night", project="owl"))
        holder = await asyncpg.connect(database_url)
        try:
            held = holder.transaction()
            await held.start()
            await holder.execute("SELECT FROM export_counters WHERE kind = 'user' AND id = 'night' FOR UPDATE")
            clock.moment = DAY0 + timedelta(days=1, seconds=1)
            first_of_day_2 = asyncio.ensure_future(
                stub.CheckAndReserve(reserve_request("day-2", user="night", project="lark"))
            )
            await asyncio.sleep(0.5)
            clock.moment = DAY0 + timedelta(hours=23, minutes=59, seconds=59)
            late_of_day_1 = asyncio.ensure_future(
                stub.CheckAndReserve(reserve_request("day-1", user="night", project="hawk"))
            )
            await asyncio.sleep(0.5)
            assert not first_of_day_2.done() and not late_of_day_1.done(), "neither waited for the counter"
            await held.rollback()
            day2, day1 = await asyncio.wait_for(asyncio.gather(first_of_day_2, late_of_day_1), 10)
        finally:
            await holder.close()
    assert day1.export.created_at.ToDatetime(tzinfo=UTC).date() == DAY0.date()
    assert day2.export.created_at.ToDatetime(tzinfo=UTC).date() == (DAY0 + timedelta(days=1)).date()
    kept = await kept_equals_rebuilt(database_url)
    history = {(row[0], row[1], row[2]): row[3] for row in kept["export_counter_history"]}
    assert history[("user", "night", DAY0.date())] == 2


async def test_folding_the_deltas_while_writers_append_loses_and_doubles_nothing(database_url: str) -> None:
    """Writers append deltas (and a row of their own to count them, in the same transaction) while two
    folders (two replicas) fold them in a loop; every snapshot sees each delta exactly once, folded or not."""
    writers_done = asyncio.Event()
    setup = await asyncpg.connect(database_url)
    await setup.execute("CREATE TABLE written (n integer)")
    await setup.close()
    append = """
        WITH delta AS (
            INSERT INTO system_rollup_deltas (day, format, render_mode, exports, reserved, completed, failed,
                                              cancelled, expired, completed_duration_seconds, completed_bytes)
            VALUES ('2032-03-01', $1, 'local', 1, 1, 0, 0, 0, 0, 0, 0)
        )
        INSERT INTO written VALUES (1)"""
    seen_sql = """
        SELECT (SELECT coalesce(sum(exports), 0) FROM (SELECT exports FROM system_rollups
                                                      UNION ALL SELECT exports FROM system_rollup_deltas) AS s),
               (SELECT count(*) FROM written)"""

    async def write(seed: int) -> None:
        rng = random.Random(seed)
        connection = await asyncpg.connect(database_url)
        try:
            for _ in range(150):
                await connection.execute(append, rng.choice(["mp4", "gif"]))
        finally:
            await connection.close()

    async def fold() -> int:
        connection = await asyncpg.connect(database_url)
        folded = 0
        try:
            while not writers_done.is_set():
                folded += await connection.fetchval("SELECT compact_export_summaries()")
                async with connection.transaction(isolation="repeatable_read"):
                    summed, written = await connection.fetchrow(seen_sql)
                    assert summed == written
        finally:
            await connection.close()
        return folded

    folders = [asyncio.ensure_future(fold()) for _ in range(2)]
    await asyncio.gather(*(write(seed) for seed in range(4)))
    writers_done.set()
    assert sum(await asyncio.gather(*folders)) > 0, "nothing was folded while the writers ran"
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("SELECT compact_export_summaries()")
        assert tuple(await connection.fetchrow(seen_sql)) == (600, 600)
        assert await connection.fetchval("SELECT count(*) FROM system_rollup_deltas") == 0
    finally:
        await connection.close()


async def test_a_running_server_folds_the_deltas(database_url: str) -> None:
    async with start_metering(database_url) as metering, metering_stub(metering.target) as stub:
        for n in range(3):
            await stub.CheckAndReserve(reserve_request(f"fold-{n}", user=f"folder-{n}"))
        connection = await asyncpg.connect(database_url)
        try:
            for _ in range(50):
                pending = await connection.fetchval("SELECT count(*) FROM system_rollup_deltas")
                if pending == 0:
                    break
                await asyncio.sleep(0.1)
            assert pending == 0, "the server did not fold the deltas within 5 s"
            assert await connection.fetchval("SELECT sum(exports) FROM system_rollups") == 3
        finally:
            await connection.close()


async def test_the_cli_rebuilds_summaries_that_went_wrong(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with start_metering(database_url) as metering, metering_stub(metering.target) as stub:
        for n in range(4):
            await stub.CheckAndReserve(reserve_request(f"cli-{n}", user=f"cli-{n % 2}", project=f"cli-p{n}"))
        before = await stub.GetStats(pb.GetStatsRequest(days=2))
        await run_sql(
            database_url,
            "SELECT compact_export_summaries()",
            "DELETE FROM export_counters WHERE kind = 'user'",
            "UPDATE system_rollups SET exports = exports + 100",
        )
        assert await ledger_violations(database_url), "the damage went unnoticed"

        env = {"DATABASE_URL": database_url}
        code, out, err = await run_maintenance_cli(monkeypatch, env, "rebuild-summaries", "--json")
        assert code == 0, err
        assert json.loads(out)["rows"]["export_counters"] == 6  # 2 users, 4 projects
        assert await ledger_violations(database_url) == []
        after = await stub.GetStats(pb.GetStatsRequest(days=2))
    assert after.total_exports == before.total_exports == 4
    assert list(after.users) == list(before.users)

    away = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    code, _, err = await run_maintenance_cli(monkeypatch, away, "rebuild-summaries")
    assert code == 3 and "cannot reach the database" in err
    malformed = {"DATABASE_URL": "postgresql://u@db.internal:54x2/metering"}
    code, _, err = await run_maintenance_cli(monkeypatch, malformed, "rebuild-summaries")
    assert code == 2 and "DATABASE_URL is not a PostgreSQL URL" in err
