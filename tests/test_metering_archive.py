"""Retention: closed exports older than the window move to the monthly partitions of exports_archive.

What a user would notice if it went wrong: stats or quotas that change when rows move, history with holes or
repeats, a reservation in flight that disappears, an export moved twice by two replicas, a runbook that loses
data, a server that never archives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from metering import archive, db
from metering.config import Config, ConfigError
from metering.migrate import migrate
from tests.support import postgres
from tests.support.metering import (
    REPO_ROOT,
    FakeClock,
    metering_stub,
    reserve_request,
    run_maintenance_cli,
    start_metering,
)
from tests.test_metering_migrations import schema_snapshot

COMPLETED, FAILED, CANCELLED = pb.EXPORT_STATUS_COMPLETED, pb.EXPORT_STATUS_FAILED, pb.EXPORT_STATUS_CANCELLED
RESERVED, EXPIRED = pb.EXPORT_STATUS_RESERVED, pb.EXPORT_STATUS_EXPIRED
NOW = datetime(2032, 6, 15, 12, 0, tzinfo=UTC)
RETENTION = timedelta(days=90)  # cutoff: 2032-03-17 12:00 UTC
LEASE_SECONDS = 60
# The reaper runs once at start-up and then sleeps: old reservations stay RESERVED unless a test expires them.
QUIET_REAPER = {"METERING_REAPER_INTERVAL_SECONDS": "3600", "METERING_RETENTION_DAYS": "0"}


@dataclass
class Ledger:
    """What a workload made: export ids by what should happen to them."""

    archivable: dict[str, str] = field(default_factory=dict)  # export_id -> partition it belongs in
    kept: set[str] = field(default_factory=set)
    reserved_old: str = ""


@contextlib.asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def make(
    stub: metering_pb2_grpc.MeteringStub,
    clock: FakeClock,
    moment: datetime,
    key: str,
    outcome: int | None,
    *,
    user: str = "amy",
    project: str = "P1",
    fmt: str = "mp4",
    mode: int = pb.RENDER_MODE_LOCAL,
) -> str:
    """One export created at `moment` and closed a few seconds later with `outcome` (None: left RESERVED;
    EXPIRED: its lease runs out and a heartbeat finds it so)."""
    clock.moment = moment
    request = reserve_request(key, user=user, project=project, format=fmt, mode=mode, seconds=8)
    export_id = (await stub.CheckAndReserve(request)).export_id
    if outcome == EXPIRED:
        clock.advance(LEASE_SECONDS + 1)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=export_id))
    elif outcome is not None:
        clock.advance(5)
        await stub.Complete(
            pb.CompleteRequest(
                export_id=export_id,
                outcome=outcome,
                file_size_bytes=1000 + len(key) if outcome == COMPLETED else 0,
                duration_seconds=7.5 if outcome == COMPLETED else 0,
                render_seconds=2.5,
                error="boom" if outcome == FAILED else "",
            )
        )
    return export_id


async def workload(stub: metering_pb2_grpc.MeteringStub, clock: FakeClock) -> Ledger:
    for user in ("amy", "bob", "cyd"):
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id=user, tier="unlimited"))
    ledger = Ledger()

    async def old(moment: datetime, key: str, outcome: int, partition: str, **kw: object) -> None:
        ledger.archivable[await make(stub, clock, moment, key, outcome, **kw)] = partition  # type: ignore[arg-type]

    async def recent(moment: datetime, key: str, outcome: int | None, **kw: object) -> str:
        export_id = await make(stub, clock, moment, key, outcome, **kw)  # type: ignore[arg-type]
        ledger.kept.add(export_id)
        return export_id

    jan, feb, mar = "exports_archive_2032_01", "exports_archive_2032_02", "exports_archive_2032_03"
    await old(datetime(2032, 1, 10, 9, tzinfo=UTC), "j1", COMPLETED, jan)
    await old(datetime(2032, 1, 10, 10, tzinfo=UTC), "j2", FAILED, jan, project="P2", fmt="webm")
    await old(datetime(2032, 1, 10, 11, tzinfo=UTC), "j3", CANCELLED, jan, user="bob", project="P3", fmt="gif")
    await old(datetime(2032, 1, 31, 23, 59, 50, tzinfo=UTC), "j4", COMPLETED, jan, mode=pb.RENDER_MODE_LAMBDA)
    await old(datetime(2032, 2, 1, 0, 0, 0, tzinfo=UTC), "f1", COMPLETED, feb, user="bob", project="P3")
    await old(datetime(2032, 2, 14, 8, tzinfo=UTC), "f2", EXPIRED, feb, user="bob", project="P3")
    # Never archived, however old: still RESERVED (nothing reaped it).
    ledger.reserved_old = await recent(datetime(2032, 2, 20, 8, tzinfo=UTC), "f3", None, user="cyd", project="P4")
    # Expired in February, completed late today: closed within the window, so it stays.
    late = await recent(datetime(2032, 2, 25, 8, tzinfo=UTC), "f4", EXPIRED)
    await old(NOW - RETENTION - timedelta(hours=1), "m1", COMPLETED, mar)
    await recent(NOW - RETENTION + timedelta(hours=1), "m2", COMPLETED, user="bob", project="P3")
    await recent(datetime(2032, 5, 5, 8, tzinfo=UTC), "y1", COMPLETED)
    await recent(datetime(2032, 5, 5, 9, tzinfo=UTC), "y2", FAILED, user="bob", project="P3")
    await recent(NOW - timedelta(hours=1), "t1", COMPLETED)
    await recent(NOW - timedelta(minutes=30), "t2", None, user="bob", project="P3")
    clock.moment = NOW
    await stub.Complete(pb.CompleteRequest(export_id=late, outcome=COMPLETED, file_size_bytes=10))
    return ledger


STATS_SCOPES = [
    {"days": 200},
    {"days": 30},
    {"days": 1},
    {"days": 200, "user_id": "amy"},
    {"days": 200, "user_id": "bob"},
    {"days": 200, "project_id": "P3"},
    {"days": 200, "user_id": "amy", "project_id": "P2"},
]


async def everything_a_user_sees(stub: metering_pb2_grpc.MeteringStub) -> dict[str, object]:
    """Every GetStats scope, every user's usage, every history (page by page) and one project's history."""
    seen: dict[str, object] = {}
    for scope in STATS_SCOPES:
        seen[f"stats {sorted(scope.items())}"] = await stub.GetStats(pb.GetStatsRequest(**scope))
    for user in ("amy", "bob", "cyd"):
        seen[f"usage {user}"] = (await stub.GetUsage(pb.GetUsageRequest(user_id=user))).usage
        seen[f"history {user}"] = await history_pages(stub, pb.ListExportsRequest(user_id=user, page_size=3))
    seen["history bob P3"] = await history_pages(
        stub, pb.ListExportsRequest(user_id="bob", project_id="P3", page_size=2)
    )
    return seen


async def history_pages(stub: metering_pb2_grpc.MeteringStub, request: pb.ListExportsRequest) -> list[list[pb.Export]]:
    pages = []
    while True:
        answer = await stub.ListExports(request)
        pages.append(list(answer.exports))
        if not answer.next_page_token:
            return pages
        request.page_token = answer.next_page_token


async def where_rows_are(database_url: str) -> tuple[set[str], dict[str, str]]:
    """Export ids in the ledger, and export id -> partition in the archive."""
    async with connect(database_url) as connection:
        ledger = {row[0] for row in await connection.fetch("SELECT export_id::text FROM exports")}
        archived = {
            row[0]: row[1]
            for row in await connection.fetch("SELECT export_id::text, tableoid::regclass::text FROM exports_archive")
        }
    return ledger, archived


async def test_archiving_moves_the_old_closed_exports_to_their_months_and_nothing_a_user_sees_changes(
    database_url: str,
) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        made = await workload(stub, clock)
        before = await everything_a_user_sees(stub)
        assert metering.server.core is not None
        report = await metering.server.core.archive_closed(RETENTION, batch_size=2)
        after = await everything_a_user_sees(stub)
        again = await metering.server.core.archive_closed(RETENTION, batch_size=2)

    assert report.cutoff == NOW - RETENTION
    assert report.moved == len(made.archivable) == 7
    assert report.by_partition == {
        "exports_archive_2032_01": 4, "exports_archive_2032_02": 2, "exports_archive_2032_03": 1,
    }
    ledger, archived = await where_rows_are(database_url)
    assert archived == made.archivable  # exactly these, each in the month it was created in
    assert ledger == made.kept and made.reserved_old in ledger
    assert again.moved == 0
    # Stats (whole responses), usage and quotas, and every history page are the same as before.
    assert after.keys() == before.keys()
    for what in before:
        assert after[what] == before[what], what
    assert before["stats [('days', 200)]"].total_exports == 14  # type: ignore[attr-defined]
    assert [len(page) for page in before["history amy"]] == [3, 3, 1]  # type: ignore[arg-type]


async def test_history_read_across_an_archive_run_lists_every_export_once(database_url: str) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        await workload(stub, clock)
        full = await history_pages(stub, pb.ListExportsRequest(user_id="amy", page_size=2))
        request = pb.ListExportsRequest(user_id="amy", page_size=2)
        first = await stub.ListExports(request)
        assert metering.server.core is not None
        await metering.server.core.archive_closed(RETENTION)
        request.page_token = first.next_page_token
        rest = await history_pages(stub, request)
    assert [list(first.exports), *rest] == full
    listed = [e.export_id for page in full for e in page]
    assert len(listed) == len(set(listed)) == 7


async def test_a_replay_after_archiving_is_a_new_request_and_an_archived_export_is_not_found(
    database_url: str,
) -> None:
    clock = FakeClock(datetime(2032, 1, 10, 9, tzinfo=UTC))
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        old_id = await make(stub, clock, clock.moment, "once", COMPLETED, user="dan")
        replay_within_window = await stub.CheckAndReserve(reserve_request("once", user="dan", project="P1", seconds=8))
        clock.moment = NOW
        assert metering.server.core is not None
        await metering.server.core.archive_closed(RETENTION)
        replay_after = await stub.CheckAndReserve(reserve_request("once", user="dan", project="P1", seconds=8))
        with pytest.raises(grpc.aio.AioRpcError) as complete_archived:
            await stub.Complete(pb.CompleteRequest(export_id=old_id, outcome=COMPLETED))
        with pytest.raises(grpc.aio.AioRpcError) as extend_archived:
            await stub.ExtendReservation(pb.ExtendReservationRequest(export_id=old_id))
        history = (await stub.ListExports(pb.ListExportsRequest(user_id="dan"))).exports
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="dan"))).usage

    assert replay_within_window.export_id == old_id
    assert replay_after.export_id != old_id and replay_after.export.status == RESERVED
    assert complete_archived.value.code() == extend_archived.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(e.export_id, e.idempotency_key, e.status) for e in history] == [
        (replay_after.export_id, "once", RESERVED), (old_id, "once", COMPLETED),
    ]
    assert (usage.used, usage.in_flight) == (1, 1)


async def test_two_archivers_at_once_move_each_export_once(database_url: str) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="eve", tier="unlimited"))
        for n in range(90):
            moment = datetime(2031, 10 + n % 3, 1 + n % 28, n % 24, tzinfo=UTC)
            await make(stub, clock, moment, f"k{n}", (COMPLETED, FAILED, CANCELLED)[n % 3], user="eve")
        before = await everything_a_user_sees(stub)
        # Two replicas: a pool each; small batches, so their runs interleave.
        pools = [
            await db.create_pool(database_url, size=2, connect_timeout=5, command_timeout=30) for _ in range(2)
        ]
        try:
            reports = await asyncio.gather(
                *(
                    archive.archive_closed(db.Database(pool), cutoff=NOW - RETENTION, archived_at=NOW, batch_size=3)
                    for pool in pools
                )
            )
        finally:
            for pool in pools:
                await pool.close()
        after = await everything_a_user_sees(stub)

    assert sum(report.moved for report in reports) == 90
    async with connect(database_url) as connection:
        rows = await connection.fetch("SELECT export_id FROM exports_archive")
        left = await connection.fetchval("SELECT count(*) FROM exports WHERE user_id = 'eve'")
    assert len(rows) == len({row[0] for row in rows}) == 90
    assert left == 0
    assert after == before


async def test_an_export_another_transaction_holds_is_skipped_not_waited_for(database_url: str) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        made = await workload(stub, clock)
        held = next(iter(made.archivable))
        assert metering.server.core is not None
        core = metering.server.core
        async with connect(database_url) as holder, holder.transaction():
            await holder.execute("SELECT 1 FROM exports WHERE export_id = $1 FOR UPDATE", held)
            # Bounded only so that a regression fails instead of hanging: a wait would last until the commit.
            first = await asyncio.wait_for(core.archive_closed(RETENTION), timeout=60)
            ledger_while_held, _ = await where_rows_are(database_url)
        second = await core.archive_closed(RETENTION)
    assert first.moved == len(made.archivable) - 1 and held in ledger_while_held
    assert second.moved == 1
    _, archived = await where_rows_are(database_url)
    assert archived == made.archivable


async def test_the_archive_refuses_a_reserved_export_and_a_second_copy(database_url: str) -> None:
    async with connect(database_url) as connection:
        await connection.fetchval("SELECT exports_archive_partition($1)", NOW)
        row = dict(
            export_id=uuid.UUID(int=1), user_id="u", project_id="p", idempotency_key="k",
            request_fingerprint="f", status="RESERVED", render_mode="local", format="mp4", resolution="1x1",
            requested_duration_seconds=1.0, usage_day=NOW.date(), created_at=NOW, lease_expires_at=NOW,
            archived_at=NOW,
        )
        insert = (
            f"INSERT INTO exports_archive ({', '.join(row)}) "
            f"VALUES ({', '.join(f'${n}' for n in range(1, len(row) + 1))})"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await connection.execute(insert, *row.values())
        row["status"] = "COMPLETED"
        await connection.execute(insert, *row.values())
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(insert, *row.values())


async def test_migrations_rerun_cleanly_over_an_archive_with_partitions(database_url: str) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        made = await workload(stub, clock)
        assert metering.server.core is not None
        await metering.server.core.archive_closed(RETENTION)
        listed = await listed_ids(stub)
    rows = "SELECT * FROM {} ORDER BY export_id"
    async with connect(database_url) as connection:
        schema_before = await schema_snapshot(connection)
        data_before = [await connection.fetch(rows.format(table)) for table in ("exports", "exports_archive")]
        assert await migrate(connection) == []
        assert await migrate(connection) == []
        schema_after = await schema_snapshot(connection)
        data_after = [await connection.fetch(rows.format(table)) for table in ("exports", "exports_archive")]
    assert schema_after == schema_before and data_after == data_before
    assert {"exports_archive_2032_01", "exports_archive_2032_03"} <= {t for t, *_ in schema_before["indexes"]}
    # A server starting on it lists the same exports. (Its reaper expires the overdue reservations at once,
    # so their status may differ; which exports are listed may not.)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        assert await listed_ids(stub) == listed
    _, archived = await where_rows_are(database_url)
    assert archived == made.archivable


async def listed_ids(stub: metering_pb2_grpc.MeteringStub) -> dict[str, list[str]]:
    listed = {}
    for user in ("amy", "bob", "cyd"):
        pages = await history_pages(stub, pb.ListExportsRequest(user_id=user, page_size=2))
        listed[user] = [export.export_id for page in pages for export in page]
    return listed


def _pg_tool(name: str) -> str:
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    assert found, f"{name} not found"
    return found


async def test_runbook_detach_dump_and_drop_an_old_month(database_url: str, pg_dsn: str, tmp_path: Path) -> None:
    """deploy/README.md, "Retention and archive": the commands it gives, in its order."""
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        made = await workload(stub, clock)
        assert metering.server.core is not None
        await metering.server.core.archive_closed(RETENTION)
        before = await everything_a_user_sees(stub)
        january = {e for e, partition in made.archivable.items() if partition == "exports_archive_2032_01"}

        dump = tmp_path / "exports_archive_2032_01.dump"
        async with connect(database_url) as connection:
            await connection.execute(
                "ALTER TABLE exports_archive DETACH PARTITION exports_archive_2032_01 CONCURRENTLY"
            )
        await asyncio.to_thread(
            subprocess.run,
            [_pg_tool("pg_dump"), "--format=custom", "--table=exports_archive_2032_01", f"--file={dump}", database_url],
            check=True,
        )
        listing = await asyncio.to_thread(
            subprocess.run, [_pg_tool("pg_restore"), "--list", str(dump)], check=True, capture_output=True, text=True
        )
        assert "TABLE DATA public exports_archive_2032_01" in listing.stdout
        async with connect(database_url) as connection:
            await connection.execute("DROP TABLE exports_archive_2032_01")
        after = await everything_a_user_sees(stub)

    # Stats and usage never read the archive; history now ends at the oldest attached month.
    for what in before:
        if what.startswith("history"):
            listed = {e.export_id for page in after[what] for e in page}  # type: ignore[attr-defined]
            assert listed == {e.export_id for page in before[what] for e in page} - january, what  # type: ignore[attr-defined]
        else:
            assert after[what] == before[what], what
    # The dump restores into another database with every row of the month.
    restored = await postgres.create_database(pg_dsn)
    try:
        await asyncio.to_thread(
            subprocess.run, [_pg_tool("pg_restore"), "--no-owner", f"--dbname={restored}", str(dump)], check=True
        )
        async with connect(restored) as connection:
            ids = {row[0] for row in await connection.fetch("SELECT export_id::text FROM exports_archive_2032_01")}
    finally:
        await postgres.drop_database(pg_dsn, restored)
    assert ids == january
    # Bringing the month back: restore, attach with the month's bounds.
    await asyncio.to_thread(
        subprocess.run, [_pg_tool("pg_restore"), f"--dbname={database_url}", str(dump)], check=True
    )
    async with connect(database_url) as connection:
        await connection.execute(
            "ALTER TABLE exports_archive ATTACH PARTITION exports_archive_2032_01"
            " FOR VALUES FROM ('2032-01-01 00:00+00') TO ('2032-02-01 00:00+00')"
        )
        back = {row[0] for row in await connection.fetch("SELECT export_id::text FROM exports_archive")}
    assert january <= back


async def test_a_month_detached_but_not_dropped_stops_the_archiver_with_a_hint(database_url: str) -> None:
    clock = FakeClock(NOW)
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        first = await make(stub, clock, datetime(2032, 1, 5, tzinfo=UTC), "a", COMPLETED, user="fay")
        clock.moment = NOW
        assert metering.server.core is not None
        assert (await metering.server.core.archive_closed(RETENTION)).moved == 1
        async with connect(database_url) as connection:
            await connection.execute("ALTER TABLE exports_archive DETACH PARTITION exports_archive_2032_01")
        second = await make(stub, clock, datetime(2032, 1, 6, tzinfo=UTC), "b", COMPLETED, user="fay")
        clock.moment = NOW
        with pytest.raises(asyncpg.RaiseError) as refused:
            await metering.server.core.archive_closed(RETENTION)
        ledger, _ = await where_rows_are(database_url)
    assert "exports_archive_2032_01 exists but is not a partition" in str(refused.value)
    assert second in ledger and first not in ledger


async def test_each_server_archives_on_its_own_and_retention_zero_never_does(database_url: str) -> None:
    clock = FakeClock(NOW - timedelta(days=40))
    env = {**QUIET_REAPER, "METERING_RETENTION_DAYS": "30", "METERING_ARCHIVE_INTERVAL_SECONDS": "0.05"}
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=env, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="gus", tier="unlimited"))
        old = await make(stub, clock, clock.moment, "old", COMPLETED, user="gus")
        kept = await make(stub, clock, NOW - timedelta(days=10), "new", COMPLETED, user="gus")
        clock.moment = NOW
        deadline = time.monotonic() + 30
        while (archived := (await where_rows_are(database_url))[1]) == {}:
            assert time.monotonic() < deadline, "the server did not archive"
            await asyncio.sleep(0.05)
    assert archived == {old: "exports_archive_2032_05"}
    assert kept in (await where_rows_are(database_url))[0]

    async with start_metering(database_url, env={"METERING_RETENTION_DAYS": "0"}) as never:
        names = {task.get_name() for task in never.server._tasks}
    assert "metering-reaper" in names and "metering-archiver" not in names


def test_retention_settings_are_validated() -> None:
    assert Config.from_env({}).retention_days == 90
    assert Config.from_env({}).archive_interval_seconds == 3600
    assert Config.from_env({"METERING_RETENTION_DAYS": "0"}).retention_days == 0
    assert Config.from_env({"METERING_RETENTION_DAYS": "400"}).retention_days == 400
    assert Config.from_env({"METERING_RETENTION_DAYS": "36500"}).retention_days == 36500
    for bad in ("-1", "ninety", "1.5", "36501", "1000000000"):  # past a century the cut-off is before year 1
        with pytest.raises(ConfigError, match="METERING_RETENTION_DAYS"):
            Config.from_env({"METERING_RETENTION_DAYS": bad})
    with pytest.raises(ConfigError, match="METERING_ARCHIVE_INTERVAL_SECONDS"):
        Config.from_env({"METERING_ARCHIVE_INTERVAL_SECONDS": "0"})


# --- python -m metering.cli archive ------------------------------------------------------------------------


async def test_cli_archive_moves_what_is_older_than_asked(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_now = datetime.now(UTC)
    clock = FakeClock(real_now - timedelta(days=200))
    async with (
        start_metering(database_url, lease_seconds=LEASE_SECONDS, env=QUIET_REAPER, clock=clock) as metering,
        metering_stub(metering.target) as stub,
    ):
        await stub.SetAccountTier(pb.SetAccountTierRequest(user_id="hal", tier="unlimited"))
        oldest = await make(stub, clock, real_now - timedelta(days=200), "a", COMPLETED, user="hal")
        older = await make(stub, clock, real_now - timedelta(days=120), "b", FAILED, user="hal")
        recent = await make(stub, clock, real_now - timedelta(days=20), "c", COMPLETED, user="hal")
    env = {"DATABASE_URL": database_url}

    code, out, _ = await run_maintenance_cli(
        monkeypatch, {**env, "METERING_RETENTION_DAYS": "150"}, "archive", "--json"
    )
    assert code == 0
    answer = json.loads(out)
    assert answer["moved"] == 1 and answer["by_partition"] == {archive_partition(real_now - timedelta(days=200)): 1}

    # `python -m metering.cli` for real, the window given on the command line.
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_") and k != "DATABASE_URL"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "metering.cli", "archive", "--older-than-days", "100", "--batch-size", "1"],
        cwd=REPO_ROOT, env={**child_env, **env}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Archived 1 exports created and closed before ")
    assert archive_partition(real_now - timedelta(days=120)) in done.stdout

    code, out, _ = await run_maintenance_cli(monkeypatch, env, "archive")
    assert code == 0 and out.startswith("Nothing to archive")
    ledger, archived = await where_rows_are(database_url)
    assert set(archived) == {oldest, older} and recent in ledger


async def test_cli_archive_refuses_bad_settings_and_says_when_the_database_is_away(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"DATABASE_URL": database_url}
    code, _, err = await run_maintenance_cli(monkeypatch, {**env, "METERING_RETENTION_DAYS": "0"}, "archive")
    assert code == 2 and "METERING_RETENTION_DAYS=0" in err and "--older-than-days" in err
    code, _, err = await run_maintenance_cli(monkeypatch, env, "archive", "--older-than-days", "0")
    assert code == 2 and "--older-than-days: must be from 1 to 36500, got 0" in err
    code, _, err = await run_maintenance_cli(monkeypatch, env, "archive", "--older-than-days", "1000000000")
    assert code == 2 and "--older-than-days: must be from 1 to 36500" in err and "Traceback" not in err
    code, _, err = await run_maintenance_cli(monkeypatch, {**env, "METERING_RETENTION_DAYS": "soon"}, "archive")
    assert code == 2 and "METERING_RETENTION_DAYS" in err and "Traceback" not in err
    unreachable = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/metering"}
    code, _, err = await run_maintenance_cli(monkeypatch, unreachable, "archive", "--older-than-days", "30")
    assert code == 3 and "cannot reach the database" in err
    for malformed in ("postgresql://u@db.internal:54x2/metering", "notadsn"):
        code, _, err = await run_maintenance_cli(
            monkeypatch, {"DATABASE_URL": malformed}, "archive", "--older-than-days", "30"
        )
        assert code == 2 and "DATABASE_URL is not a PostgreSQL URL" in err and "Traceback" not in err


def archive_partition(moment: datetime) -> str:
    start, _ = archive.month_bounds(moment)
    return f"exports_archive_{start:%Y_%m}"
