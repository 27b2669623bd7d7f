"""The system-wide summaries (migrations/0003): whatever order and grouping the rollups are written in,
including exports of a day that has already ended and two writers racing at midnight, the triggers leave
exactly what rebuild_export_summaries() computes from the rollups afterwards."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, date, datetime, timedelta

import asyncpg

SUMMARIES = {
    "system_rollups": """SELECT day, shard, format, render_mode, exports, reserved, completed, failed, cancelled,
                                expired, round(completed_duration_seconds::numeric, 6), completed_bytes,
                                last_export_at
                         FROM system_rollups ORDER BY 1, 2, 3, 4""",
    "system_render_time_histogram": "SELECT day, bucket, count FROM system_render_time_histogram ORDER BY 1, 2",
    "export_counters": "SELECT * FROM export_counters ORDER BY kind, id",
    "export_counter_history": "SELECT * FROM export_counter_history ORDER BY kind, id, day",
}

UPSERT_ROLLUPS = """
INSERT INTO export_rollups AS r (day, user_id, project_id, format, render_mode, exports, reserved, last_export_at)
SELECT * FROM unnest($1::date[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $6::bigint[],
                     $7::timestamptz[])
ON CONFLICT (day, user_id, project_id, format, render_mode) DO UPDATE
SET exports = r.exports + EXCLUDED.exports, reserved = r.reserved + EXCLUDED.reserved,
    last_export_at = greatest(r.last_export_at, EXCLUDED.last_export_at)
"""

COMPLETE_SOME = """
UPDATE export_rollups
SET reserved = reserved - 1, completed = completed + 1, completed_duration_seconds = completed_duration_seconds + 2.5,
    completed_bytes = completed_bytes + 1000
WHERE reserved > 0 AND user_id = $1
"""

ADD_RENDER_TIMES = """
INSERT INTO render_time_histogram AS h (day, user_id, project_id, bucket, count)
SELECT * FROM unnest($1::date[], $2::text[], $3::text[], $4::integer[], $5::bigint[])
ON CONFLICT (day, user_id, project_id, bucket) DO UPDATE SET count = h.count + EXCLUDED.count
"""

DAY0 = date(2026, 3, 1)


async def summaries(connection: asyncpg.Connection) -> dict[str, list[tuple]]:
    return {name: [tuple(row) for row in await connection.fetch(sql)] for name, sql in SUMMARIES.items()}


async def rebuilt(connection: asyncpg.Connection) -> dict[str, list[tuple]]:
    async with connection.transaction():
        await connection.execute("SELECT rebuild_export_summaries()")
        return await summaries(connection)


def _moment(day: date, rng: random.Random) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(seconds=rng.randrange(86400))


async def test_the_triggers_agree_with_a_rebuild_whatever_the_order_of_days(database_url: str) -> None:
    rng = random.Random(7)
    connection = await asyncpg.connect(database_url)
    try:
        for _ in range(150):
            size = rng.choice([1, 1, 1, 3, 8])
            # Mostly today and later days, sometimes a day already past (a late export) or several days.
            days = [DAY0 + timedelta(days=rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 12])) for _ in range(size)]
            users = [f"u{rng.randrange(6)}" for _ in range(size)]
            columns = (
                days,
                users,
                [f"{user}-p{rng.randrange(3)}" for user in users],
                [rng.choice(["mp4", "webm", "gif"]) for _ in range(size)],
                [rng.choice(["local", "lambda"]) for _ in range(size)],
                [rng.randint(1, 3) for _ in range(size)],
                [_moment(day, rng) for day in days],
            )
            # One (day, user, project, format, mode) key at most once per statement, as in reserve_many.
            unique = {(c[0], c[1], c[2], c[3], c[4]): c for c in zip(*columns, strict=True)}
            await connection.execute(UPSERT_ROLLUPS, *map(list, zip(*unique.values(), strict=True)))
            if rng.random() < 0.4:
                await connection.execute(COMPLETE_SOME, rng.choice(users))
            if rng.random() < 0.4:
                pairs = zip(days, users, strict=True)
                buckets = {(day, user, f"{user}-p0", rng.randrange(400, 420)) for day, user in pairs}
                keys = list(zip(*buckets, strict=True))
                await connection.execute(ADD_RENDER_TIMES, *map(list, keys), [1] * len(buckets))
        kept = await summaries(connection)
        assert kept["export_counter_history"], "no day ever moved on: the test exercised nothing"
        assert kept == await rebuilt(connection)
    finally:
        await connection.close()


async def test_a_late_export_racing_the_first_of_the_next_day_is_counted_once(database_url: str) -> None:
    """The first export of day 2 holds the user's counter while an export of day 1 (its day ended while
    it was being reserved) waits for it; once the first commits, the late one must add to the history the
    first just wrote, which its own statement's snapshot cannot see."""
    first = await asyncpg.connect(database_url)
    late = await asyncpg.connect(database_url)
    try:
        day1, day2 = DAY0, DAY0 + timedelta(days=1)
        at1 = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
        at2 = datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC)
        row = ["u1", "u1-p0", "mp4", "local", 1]
        await first.execute(UPSERT_ROLLUPS, [day1], *[[value] for value in row], [at1])

        transaction = first.transaction()
        await transaction.start()
        await first.execute(UPSERT_ROLLUPS, [day2], *[[value] for value in row], [at2])
        waiting = asyncio.ensure_future(late.execute(UPSERT_ROLLUPS, [day1], *[[value] for value in row], [at1]))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "the late export did not wait for the user's counter"
        await transaction.commit()
        await asyncio.wait_for(waiting, 10)

        kept = await summaries(first)
        history = {(r[0], r[1], r[2]): r[3] for r in kept["export_counter_history"]}
        assert history[("user", "u1", day1)] == 2
        counters = {(r[0], r[1]): r for r in kept["export_counters"]}
        assert counters[("user", "u1")][2] == 3 and counters[("user", "u1")][7] == day2
        assert kept == await rebuilt(first)
    finally:
        await first.close()
        await late.close()
