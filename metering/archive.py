"""Retention: closed exports older than the retention window move from the ledger to `exports_archive`.

What moves: exports that are closed (COMPLETED, FAILED, CANCELLED or EXPIRED; never RESERVED), created before
the cutoff and closed before it too (a late Complete of an EXPIRED export restarts its clock). Where: the
archive's partition of the month (UTC) of created_at, created on demand. How: batches of one statement each
(DELETE ... RETURNING into INSERT, rows picked FOR UPDATE SKIP LOCKED), so every replica may run this at
once, each export moves once, and no batch holds locks for long.

Nothing else changes: GetStats reads the rollups, GetUsage the day counters, and both were counted when the
export was; ListExports reads the ledger and the archive together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from metering.db import Database
from metering.sql import QUERIES

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
_BEGINNING = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    cutoff: datetime  # exports created and closed before this moved
    moved: int
    by_partition: dict[str, int] = field(default_factory=dict)  # partition name -> exports moved into it


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month holding `moment`, as [start, end): one archive partition."""
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def archive_closed(
    database: Database, *, cutoff: datetime, archived_at: datetime, batch_size: int = DEFAULT_BATCH_SIZE
) -> ArchiveReport:
    """Moves every archivable export created and closed before `cutoff`, oldest month first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    by_partition: dict[str, int] = {}
    after = _BEGINNING
    while True:
        async with database.connection() as connection:
            oldest = await connection.fetchval(QUERIES["oldest_archivable_export"], cutoff, after)
        if oldest is None:
            break
        start, end = month_bounds(oldest)
        async with database.connection() as connection:
            partition = await connection.fetchval(QUERIES["ensure_archive_partition"], start)
        moved_here = 0
        while True:
            # Autocommit: each batch is one statement and its own transaction.
            async with database.connection() as connection:
                moved = await connection.fetchval(
                    QUERIES["archive_closed_exports"], start, min(end, cutoff), cutoff, batch_size, archived_at
                )
            moved_here += moved
            # A short batch: the month is done, or what is left is held by another archiver, which moves it.
            if moved < batch_size:
                break
        if moved_here:
            by_partition[partition] = moved_here
            log.info("exports archived", extra={"partition": partition, "count": moved_here})
        after = end
    return ArchiveReport(cutoff=cutoff, moved=sum(by_partition.values()), by_partition=by_partition)
