"""The metering core: the export ledger, quotas and leases, over PostgreSQL. Knows nothing of gRPC.

Every state change of an export, its day's usage counter, its project row and the stats rollups
happen in one transaction, so they never disagree.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol

import asyncpg

from metering import archive, errors, pagination, stats, validation
from metering.batching import Batcher, SplitBatch
from metering.db import Database
from metering.domain import (
    Account,
    CompleteRequest,
    Export,
    ExportPage,
    ExportStatus,
    ListExportsRequest,
    NewExport,
    OutputFormat,
    RenderMode,
    ReserveRequest,
    ReserveResult,
    Stats,
    StatsRequest,
    Usage,
)
from metering.quota import QuotaPolicy
from metering.sql import QUERIES
from metering.tiers import Tier, TierTable

log = logging.getLogger(__name__)

# How long a batch of calls waits on a row lock before it is split and each call waits alone: longer than
# batches of one user take to follow each other under load, short enough that a lock held elsewhere (a stuck
# transaction) delays the other users of its batch by no more than this.
BATCH_LOCK_TIMEOUT = "250ms"


@dataclass(frozen=True, slots=True)
class _Expired:
    """ExtendReservation found the lease already over: the expiry is committed, then refused."""

    export: Export


class MeteringEvents(Protocol):
    """What the core reports as it goes, for metrics; calls must be cheap and must not raise."""

    def export_moved(self, status: ExportStatus, export: Export) -> None: ...

    def denied(self, tier: str, reason: str) -> None: ...


class _NoEvents:
    def export_moved(self, status: ExportStatus, export: Export) -> None:
        pass

    def denied(self, tier: str, reason: str) -> None:
        pass


class MeteringCore:
    def __init__(
        self,
        database: Database,
        *,
        tiers: TierTable,
        lease_seconds: float,
        policy: QuotaPolicy | None = None,
        events: MeteringEvents | None = None,
        reserve_batch_size: int = 64,
    ) -> None:
        self._db = database
        self._tiers = tiers
        self._lease = timedelta(seconds=lease_seconds)
        self._policy = policy or QuotaPolicy()
        self._events = events or _NoEvents()
        # (user, project, day) whose day rows and counters this replica has created or seen: a reservation for
        # any other creates them first, rather than finding them missing in a whole reservation statement.
        self._rows_ready: set[tuple[str, str, date]] = set()
        # Calls that arrive while others are being recorded are recorded together (metering/batching.py).
        self._reservations: Batcher[NewExport, ReserveResult] = Batcher(
            self._reserve_batch, key=lambda new: (new.user_id, new.idempotency_key), max_batch=reserve_batch_size
        )
        self._completions: Batcher[CompleteRequest, Export] = Batcher(
            self._complete_batch, key=lambda request: request.export_id, max_batch=reserve_batch_size
        )

    # --- reservations -------------------------------------------------------------------------------

    async def check_and_reserve(self, request: ReserveRequest) -> ReserveResult:
        new = validation.new_export(request)
        try:
            result = await self._reservations.submit(new)
        except errors.QuotaExceeded as denial:
            self._events.denied(denial.tier, "project_daily_limit" if denial.scope == "project" else "daily_limit")
            raise
        except errors.DurationTooLong as denial:
            self._events.denied(denial.tier, "duration")
            raise
        if not result.replayed:
            self._events.export_moved(ExportStatus.RESERVED, result.export)
        return result

    async def _reserve(self, connection: asyncpg.Connection, new: NewExport) -> ReserveResult:
        # One statement does the reservation (see `reserve` in queries.sql); the rest runs only when it
        # could not: a new day (create its rows, then again), a replay, or a refusal.
        fingerprint = new.fingerprint()
        now = self._policy.now()
        day = self._policy.day_of(now)
        rows = (new.user_id, new.project_id, day)
        if rows not in self._rows_ready:
            await connection.execute(QUERIES["ensure_usage_rows"], new.user_id, day, new.project_id)
        row = await self._reserve_statement(connection, new, fingerprint, day, now)
        if row["new_day"]:  # made by no one yet after all (a restored database, say)
            await connection.execute(QUERIES["ensure_usage_rows"], new.user_id, day, new.project_id)
            row = await self._reserve_statement(connection, new, fingerprint, day, now)
        self._remember_rows_ready([rows])
        if row["late"]:
            raise _DayEndedMeanwhile
        tier = self._tiers.resolve(row["tier"])
        if row["export_id"] is not None:
            export = export_from_row(row)
            used = row["used"] + 1
            log.debug(  # the call's own "rpc" line names the export at INFO
                "export reserved",
                extra={"export_id": export.export_id, "user_id": new.user_id, "used": used, "tier": tier.name},
            )
            return ReserveResult(
                export=export, usage=self._usage_of(new.user_id, tier, used, row["in_flight"], now), replayed=False
            )
        # Nothing recorded: a replay (the key is taken; answered before any limit, as always), or a refusal.
        existing = await connection.fetchrow(QUERIES["export_by_idempotency_key"], new.user_id, new.idempotency_key)
        if existing is not None:
            return await self._replay(connection, existing, fingerprint, now)
        self._policy.check(
            tier,
            user_id=new.user_id,
            project_id=new.project_id,
            duration_seconds=new.duration_seconds,
            used_today=row["used"],
            project_used_today=row["project_used"],
            moment=now,
        )
        raise RuntimeError(f"the reservation gate refused what the quota policy allows (user {new.user_id})")

    async def _reserve_statement(
        self, connection: asyncpg.Connection, new: NewExport, fingerprint: str, day: date, now: datetime
    ) -> asyncpg.Record:
        tiers = list(self._tiers.values())
        return await connection.fetchrow(
            QUERIES["reserve"],
            new.user_id,
            day,
            new.project_id,
            new.idempotency_key,
            uuid.uuid4(),
            fingerprint,
            new.render_mode.value,
            new.format.value,
            new.resolution,
            new.duration_seconds,
            now,
            now + self._lease,
            [tier.name for tier in tiers],
            [tier.daily_limit for tier in tiers],
            [tier.max_duration_seconds for tier in tiers],
            [tier.project_daily_limit for tier in tiers],
            self._tiers.default.name,
        )

    async def _reserve_batch(self, batch: Sequence[NewExport]) -> list[ReserveResult | Exception]:
        """Records a batch of reservations (distinct user and key pairs); one outcome per reservation."""
        if len(batch) == 1:  # alone: one statement beats a batch's four
            try:
                return [await self._db.autocommit(lambda connection: self._reserve(connection, batch[0]))]
            except _DayEndedMeanwhile:
                pass  # the batch's way moves the counters' history right (see `reserve` in queries.sql)
            except errors.MeteringError as error:
                return [error]
        for _ in range(3):
            now = self._policy.now()
            try:
                outcomes = await self._db.transaction(
                    lambda connection, now=now: self._reserve_many(connection, batch, now)
                )
                break
            except _KeyTakenMeanwhile:
                continue  # once more: the key is seen as taken now, and the batch's counts must not include it
            except asyncpg.exceptions.LockNotAvailableError:
                raise SplitBatch from None  # a lock held elsewhere: each call waits alone, not the batch
        else:
            raise RuntimeError("a reservation batch kept meeting keys taken meanwhile")
        for index, outcome in enumerate(outcomes):
            if outcome is _REPLAY:  # answered after the batch's commit, as a single replay is
                new = batch[index]
                try:
                    outcomes[index] = await self._db.autocommit(
                        lambda connection, new=new: self._replay_of(connection, new, now)
                    )
                except errors.MeteringError as error:
                    outcomes[index] = error
        return outcomes  # type: ignore[return-value]

    def _remember_rows_ready(self, keys: Sequence[tuple[str, str, date]]) -> None:
        if len(self._rows_ready) + len(keys) > _ROWS_READY_REMEMBERED:
            self._rows_ready.clear()  # yesterday's keys go too; a forgotten one costs one idempotent insert
        self._rows_ready.update(keys)

    async def _reserve_many(
        self, connection: asyncpg.Connection, batch: Sequence[NewExport], now: datetime
    ) -> list[ReserveResult | Exception | object]:
        # Lock the users' day rows (in user order), then the projects' (in project order); decide each
        # reservation in arrival order with QuotaPolicy on the counts so far; record the admitted ones at once.
        day = self._policy.day_of(now)
        users = sorted({new.user_id for new in batch})
        used: dict[str, int] = {}
        project_used: dict[str, int] = {}
        account_tiers: dict[str, str] = {}
        taken: set[tuple[str, str]] = set()
        for row in await connection.fetch(
            QUERIES["lock_reserve_many"],
            users,
            day,
            sorted({new.project_id for new in batch}),
            [new.user_id for new in batch],
            [new.idempotency_key for new in batch],
            BATCH_LOCK_TIMEOUT,
        ):
            if row["kind"] == "user":
                used[row["id"]] = row["used"]
            elif row["kind"] == "project":
                project_used[row["id"]] = row["used"]
            elif row["kind"] == "tier":
                account_tiers[row["id"]] = row["tier"]
            else:
                taken.add((row["id"], row["idempotency_key"]))
        self._remember_rows_ready([(new.user_id, new.project_id, day) for new in batch])
        outcomes: list[ReserveResult | Exception | object] = []
        admitted: list[tuple[int, uuid.UUID, int, Tier]] = []
        for index, new in enumerate(batch):
            if (new.user_id, new.idempotency_key) in taken:
                outcomes.append(_REPLAY)
                continue
            tier = self._tiers.resolve(account_tiers.get(new.user_id))
            try:
                self._policy.check(
                    tier,
                    user_id=new.user_id,
                    project_id=new.project_id,
                    duration_seconds=new.duration_seconds,
                    used_today=used[new.user_id],
                    project_used_today=project_used[new.project_id],
                    moment=now,
                )
            except errors.MeteringError as refusal:
                outcomes.append(refusal)
                continue
            used[new.user_id] += 1
            project_used[new.project_id] += 1
            admitted.append((index, uuid.uuid4(), used[new.user_id], tier))
            outcomes.append(None)
        if not admitted:
            return outcomes
        chosen = [batch[index] for index, *_ in admitted]
        rows = await connection.fetch(
            QUERIES["reserve_many"],
            [export_id for _, export_id, *_ in admitted],
            [new.user_id for new in chosen],
            [new.project_id for new in chosen],
            [new.idempotency_key for new in chosen],
            [new.fingerprint() for new in chosen],
            [new.render_mode.value for new in chosen],
            [new.format.value for new in chosen],
            [new.resolution for new in chosen],
            [new.duration_seconds for new in chosen],
            day,
            now,
            now + self._lease,
        )
        if len(rows) != len(admitted):
            # A key committed while the batch waited for its locks: roll back, and look again.
            raise _KeyTakenMeanwhile
        by_id = {row["export_id"]: row for row in rows}
        in_flight: dict[str, int] = {}
        for index, export_id, used_now, tier in admitted:
            row = by_id[export_id]
            user_id = row["user_id"]
            in_flight[user_id] = in_flight.get(user_id, row["in_flight_before"]) + 1
            export = export_from_row(row)
            log.debug(  # the call's own "rpc" line names the export at INFO
                "export reserved",
                extra={"export_id": export.export_id, "user_id": user_id, "used": used_now, "tier": tier.name},
            )
            outcomes[index] = ReserveResult(
                export=export, usage=self._usage_of(user_id, tier, used_now, in_flight[user_id], now), replayed=False
            )
        return outcomes

    async def _replay_of(self, connection: asyncpg.Connection, new: NewExport, now: datetime) -> ReserveResult:
        row = await connection.fetchrow(QUERIES["export_by_idempotency_key"], new.user_id, new.idempotency_key)
        return await self._replay(connection, row, new.fingerprint(), now)

    async def _replay(
        self, connection: asyncpg.Connection, row: asyncpg.Record, fingerprint: str, now: datetime
    ) -> ReserveResult:
        export = export_from_row(row)
        if row["request_fingerprint"] != fingerprint:
            raise errors.AlreadyExists(
                f"idempotency_key {export.idempotency_key!r} was already used for a different request "
                f"(export {export.export_id})"
            )
        tier = self._tiers.resolve(await connection.fetchval(QUERIES["account_tier"], export.user_id))
        used = await connection.fetchval(QUERIES["daily_used"], export.user_id, self._policy.day_of(now))
        usage = await self._usage(connection, export.user_id, tier, used or 0, now)
        return ReserveResult(export=export, usage=usage, replayed=True)

    async def _usage(
        self, connection: asyncpg.Connection, user_id: str, tier: Tier, used: int, now: datetime
    ) -> Usage:
        in_flight = await connection.fetchval(QUERIES["in_flight"], user_id)
        return self._usage_of(user_id, tier, used, in_flight, now)

    def _usage_of(self, user_id: str, tier: Tier, used: int, in_flight: int, now: datetime) -> Usage:
        return Usage(
            user_id=user_id,
            tier=tier.name,
            used=used,
            limit=tier.daily_limit,
            in_flight=in_flight,
            resets_at=self._policy.window(now).resets_at,
            max_duration_seconds=tier.max_duration_seconds,
        )

    # --- closing an export --------------------------------------------------------------------------

    async def complete(self, request: CompleteRequest) -> Export:
        checked = validation.complete(request)
        return await self._completions.submit(checked)

    async def _complete_batch(self, batch: Sequence[CompleteRequest]) -> list[Export | Exception]:
        """Records a batch of completions (distinct exports); one outcome per completion."""
        if len(batch) == 1:  # alone: one statement beats a batch's four
            try:
                return [await self._db.autocommit(lambda connection: self._complete(connection, batch[0]))]
            except errors.MeteringError as error:
                return [error]
        moved: list[tuple[ExportStatus, Export]] = []
        try:
            outcomes = await self._db.transaction(
                lambda connection: self._complete_many(connection, batch, self._policy.now(), moved)
            )
        except asyncpg.exceptions.LockNotAvailableError:
            raise SplitBatch from None  # a lock held elsewhere: each call waits alone, not the batch
        # Reported after commit: a crash right here under-counts a metric, never the ledger.
        for outcome, old in moved:
            self._report_closed(old, outcome, late=old.status is ExportStatus.EXPIRED)
        return outcomes

    async def _complete_many(
        self,
        connection: asyncpg.Connection,
        batch: Sequence[CompleteRequest],
        now: datetime,
        moved: list[tuple[ExportStatus, Export]],
    ) -> list[Export | Exception]:
        # Lock the batch's exports (in id order), decide each completion as `_complete` does, then close
        # every export that moves, and move its counts, in one statement.
        moved.clear()  # a retried transaction starts over
        ids = sorted({uuid.UUID(request.export_id) for request in batch})
        locked = await connection.fetch(QUERIES["lock_exports_many"], ids, BATCH_LOCK_TIMEOUT)
        exports = {row["export_id"]: export_from_row(row) for row in locked}
        outcomes: list[Export | Exception] = []
        closing: list[tuple[int, CompleteRequest, Export]] = []
        for index, request in enumerate(batch):
            assert request.outcome is not None
            export = exports.get(uuid.UUID(request.export_id))
            if export is None:
                outcomes.append(errors.NotFound(f"export {request.export_id} not found"))
            elif export.status == request.outcome:
                outcomes.append(export)  # the same answer again: unchanged
            elif export.status not in (ExportStatus.RESERVED, ExportStatus.EXPIRED):
                outcomes.append(_already_closed(export, request.outcome))
            else:
                outcomes.append(export)  # replaced by the closed export below
                closing.append((index, request, export))
        if not closing:
            return outcomes
        columns: list[list[object]] = [[] for _ in range(21)]
        for _, request, export in closing:
            assert request.outcome is not None
            completed = request.outcome is ExportStatus.COMPLETED
            slot_delta, deltas = _count_deltas(export.status, request.outcome)
            values = [
                *_closing_columns(request),
                export.user_id,
                export.project_id,
                export.usage_day,
                export.format.value,
                export.render_mode.value,
                slot_delta,
                *deltas,
                # A completed export counts its measured length when reported, else the length asked for.
                (request.duration_seconds or export.requested_duration_seconds) if completed else 0.0,
                request.file_size_bytes if completed else 0,
                _render_time_bucket(request),
            ]
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        closed = {
            row["export_id"]: export_from_row(row)
            for row in await connection.fetch(QUERIES["complete_many"], *columns, now)
        }
        for index, request, export in closing:
            assert request.outcome is not None
            outcomes[index] = closed[uuid.UUID(export.export_id)]
            moved.append((request.outcome, export))
        return outcomes

    async def _complete(self, connection: asyncpg.Connection, request: CompleteRequest) -> Export:
        assert request.outcome is not None
        # One statement locks, closes and moves the counts (see `complete` in queries.sql).
        row = await connection.fetchrow(
            QUERIES["complete"],
            *_closing_columns(request),
            self._policy.now(),
            _render_time_bucket(request),
        )
        if row is None:
            raise errors.NotFound(f"export {request.export_id} not found")
        export = export_from_row(row)
        if not row["changed"]:
            if export.status == request.outcome:
                return export  # the same answer again: unchanged
            raise _already_closed(export, request.outcome)
        # Reported after commit (the statement is its own transaction): a crash right here under-counts a
        # metric, never the ledger.
        self._report_closed(export, request.outcome, late=row["previous_status"] == ExportStatus.EXPIRED.value)
        return export

    def _report_closed(self, export: Export, outcome: ExportStatus, *, late: bool) -> None:
        """Metrics and the log line of an export closed; late ones (closed after their lease ran out) at INFO,
        the rest at DEBUG (the call's "rpc" line names them)."""
        self._events.export_moved(outcome, export)
        log.log(
            logging.INFO if late else logging.DEBUG,
            "export closed",
            extra={"export_id": export.export_id, "outcome": outcome.value, "late": late},
        )

    async def _lock_export(self, connection: asyncpg.Connection, export_id: str) -> Export:
        row = await connection.fetchrow(QUERIES["lock_export"], uuid.UUID(export_id))
        if row is None:
            raise errors.NotFound(f"export {export_id} not found")
        return export_from_row(row)

    async def _move(
        self,
        connection: asyncpg.Connection,
        export: Export,
        to: ExportStatus,
        *,
        completed_seconds: float = 0.0,
        completed_bytes: int = 0,
    ) -> None:
        """Moves one export's counts from its old status to `to`: the day's usage (a slot is held by
        RESERVED and COMPLETED only) and the rollup of the day it was created."""
        # Reported before commit: a transaction that then fails over-counts a metric, never the ledger.
        self._events.export_moved(to, export)
        slot_delta, deltas = _count_deltas(export.status, to)
        if slot_delta:
            await connection.execute(QUERIES["add_daily_used"], export.user_id, export.usage_day, slot_delta)
            await connection.execute(
                QUERIES["add_project_daily_used"], export.project_id, export.usage_day, slot_delta
            )
        await connection.execute(
            QUERIES["rollup_transition"],
            export.usage_day,
            export.user_id,
            export.project_id,
            export.format.value,
            export.render_mode.value,
            *deltas,
            completed_seconds,
            completed_bytes,
        )

    # --- leases -------------------------------------------------------------------------------------

    async def extend_reservation(self, export_id: str) -> datetime:
        checked = validation.export_id(export_id)
        outcome = await self._db.transaction(lambda connection: self._extend(connection, checked))
        if isinstance(outcome, _Expired):
            raise errors.FailedPrecondition(
                f"export {checked} is EXPIRED: its lease ran out at "
                f"{outcome.export.lease_expires_at.isoformat()}",
                (errors.PreconditionViolation("LEASE_EXPIRED", f"export:{checked}", "lease ran out"),),
            )
        return outcome

    async def _extend(self, connection: asyncpg.Connection, export_id: str) -> datetime | _Expired:
        export = await self._lock_export(connection, export_id)
        if export.status is not ExportStatus.RESERVED:
            raise errors.FailedPrecondition(
                f"export {export_id} is {export.status.value}; only a RESERVED export can be extended",
                (errors.PreconditionViolation("NOT_RESERVED", f"export:{export_id}", export.status.value),),
            )
        now = self._policy.now()
        if export.lease_expires_at <= now:
            # Overdue but not reaped yet: it expired all the same; record that rather than revive it.
            await self._expire(connection, export, now)
            return _Expired(export)
        row = await connection.fetchrow(QUERIES["extend_lease"], uuid.UUID(export_id), now + self._lease)
        return row["lease_expires_at"]

    async def _expire(self, connection: asyncpg.Connection, export: Export, now: datetime) -> None:
        await connection.execute(QUERIES["expire_export"], uuid.UUID(export.export_id), now)
        await self._move(connection, export, ExportStatus.EXPIRED)
        log.info("export expired", extra={"export_id": export.export_id, "user_id": export.user_id})

    async def reap_expired(self, limit: int = 100) -> int:
        """Marks overdue reservations EXPIRED, one short transaction each; safe on every replica at once."""
        reaped = 0
        while reaped < limit:
            if not await self._db.transaction(self._reap_one):
                break
            reaped += 1
        return reaped

    async def _reap_one(self, connection: asyncpg.Connection) -> bool:
        now = self._policy.now()
        row = await connection.fetchrow(QUERIES["lock_overdue_reservation"], now)
        if row is None:
            return False
        await self._expire(connection, export_from_row(row), now)
        return True

    # --- reading --------------------------------------------------------------------------------------

    async def get_usage(self, user_id: str) -> Usage:
        user_id = validation.identifier("user_id", user_id)
        async with self._db.connection() as connection:
            now = self._policy.now()
            tier = self._tiers.resolve(await connection.fetchval(QUERIES["account_tier"], user_id))
            used = await connection.fetchval(QUERIES["daily_used"], user_id, self._policy.day_of(now))
            return await self._usage(connection, user_id, tier, used or 0, now)

    async def list_exports(self, request: ListExportsRequest) -> ExportPage:
        user_id = validation.identifier("user_id", request.user_id)
        project_id = validation.optional_identifier("project_id", request.project_id)
        page_size = validation.page_size(request.page_size)
        cursor = pagination.decode(request.page_token, user_id=user_id, project_id=project_id)
        async with self._db.connection() as connection:
            if project_id is None:
                rows = await connection.fetch(
                    QUERIES["list_user_history"], user_id, cursor.created_at, cursor.export_id, page_size + 1
                )
            else:
                rows = await connection.fetch(
                    QUERIES["list_project_history"],
                    user_id,
                    project_id,
                    cursor.created_at,
                    cursor.export_id,
                    page_size + 1,
                )
        exports = tuple(export_from_row(row) for row in rows[:page_size])
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = pagination.encode(
                pagination.Cursor(last["created_at"], last["export_id"]),
                user_id=user_id,
                project_id=project_id,
            )
        return ExportPage(exports=exports, next_page_token=token)

    async def get_stats(self, request: StatsRequest) -> Stats:
        checked = validation.stats_request(request)
        async with self._db.connection() as connection:
            # One snapshot for all the queries of an answer, so its figures add up.
            async with connection.transaction(readonly=True, isolation="repeatable_read"):
                today = self._policy.day_of(self._policy.now())
                return await stats.load_stats(connection, checked, today=today, tiers=self._tiers)

    # --- retention ----------------------------------------------------------------------------------

    async def archive_closed(
        self, older_than: timedelta, *, batch_size: int = archive.DEFAULT_BATCH_SIZE
    ) -> archive.ArchiveReport:
        """Moves closed exports created and closed more than `older_than` ago to the archive (metering/archive.py);
        safe on every replica at once."""
        if older_than <= timedelta(0):
            raise ValueError(f"older_than must be positive, not {older_than}")
        now = self._policy.now()
        return await archive.archive_closed(self._db, cutoff=now - older_than, archived_at=now, batch_size=batch_size)

    async def compact_summaries(self) -> int:
        """Folds the system-wide summaries' delta rows into their rows (migrations/0003); safe on every replica
        at once (one folds, the others return 0)."""
        return await self._db.autocommit(
            lambda connection: connection.fetchval(QUERIES["compact_export_summaries"])
        )

    async def count_in_flight(self) -> int:
        """Reservations held right now, system-wide (a partial index keeps this cheap)."""
        async with self._db.connection() as connection:
            return int(await connection.fetchval(QUERIES["in_flight_total"]))

    async def count_near_limit(self) -> dict[str, int]:
        """Users near their daily limit today, system-wide, by tier (every configured tier, 0 for none)."""
        async with self._db.connection() as connection:
            today = self._policy.day_of(self._policy.now())
            near = await stats.load_near_limit(connection, today=today, tiers=self._tiers, top=0)
        return dict(near.by_tier)

    # --- accounts -----------------------------------------------------------------------------------

    async def set_account_tier(self, user_id: str, tier: str) -> Account:
        user_id = validation.identifier("user_id", user_id)
        tier = validation.tier_name(tier, list(self._tiers))
        async with self._db.connection() as connection:
            row = await connection.fetchrow(QUERIES["upsert_account_tier"], user_id, tier, self._policy.now())
        log.info("account tier set", extra={"user_id": user_id, "tier": tier})
        return Account(row["user_id"], row["tier"], row["created_at"], row["updated_at"])

    async def ping(self, max_wait: float) -> None:
        await self._db.ping(max_wait)


_ROLLUP_COLUMNS = (
    ExportStatus.RESERVED,
    ExportStatus.COMPLETED,
    ExportStatus.FAILED,
    ExportStatus.CANCELLED,
    ExportStatus.EXPIRED,
)


def _already_closed(export: Export, outcome: ExportStatus) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"export {export.export_id} is already {export.status.value}; it cannot also be {outcome.value}",
        (
            errors.PreconditionViolation(
                "EXPORT_ALREADY_CLOSED", f"export:{export.export_id}", f"status is {export.status}"
            ),
        ),
    )


def _closing_columns(request: CompleteRequest) -> tuple[object, ...]:
    """What a completion writes on its export, as `complete` and `complete_many` take it (unset: NULL)."""
    assert request.outcome is not None
    return (
        uuid.UUID(request.export_id),
        request.outcome.value,
        request.error or None,
        request.file_size_bytes or None,
        request.duration_seconds or None,
        request.output_uri or None,
        request.render_seconds or None,
    )


def _render_time_bucket(request: CompleteRequest) -> int | None:
    """The render-time histogram bucket a completion adds to: only a COMPLETED export with a render time."""
    if request.outcome is ExportStatus.COMPLETED and request.render_seconds > 0:
        return stats.render_time_bucket(request.render_seconds)
    return None


_ROWS_READY_REMEMBERED = 100_000


class _DayEndedMeanwhile(Exception):
    """The reservation's day ended while it waited for its counters: record it the batch's way."""


class _KeyTakenMeanwhile(Exception):
    """A batch's idempotency key was committed by another reservation while the batch waited for its
    locks (lock_reserve_many read the keys in a snapshot from before): the batch is rolled back and
    recorded again, and then sees the key taken."""


_REPLAY = object()  # a batch's outcome for a reservation whose key is taken: answered as a replay


def _count_deltas(old: ExportStatus, new: ExportStatus) -> tuple[int, list[int]]:
    """What moving one export from `old` to `new` does to the counts: the day's usage (a slot is held by
    RESERVED and COMPLETED only) and the rollup's status columns, in `_ROLLUP_COLUMNS` order."""
    slot_delta = int(new.holds_slot) - int(old.holds_slot)
    return slot_delta, [int(status is new) - int(status is old) for status in _ROLLUP_COLUMNS]


def export_from_row(row: asyncpg.Record) -> Export:
    return Export(
        export_id=str(row["export_id"]),
        user_id=row["user_id"],
        project_id=row["project_id"],
        idempotency_key=row["idempotency_key"],
        status=ExportStatus(row["status"]),
        render_mode=RenderMode(row["render_mode"]),
        format=OutputFormat(row["format"]),
        resolution=row["resolution"],
        requested_duration_seconds=row["requested_duration_seconds"],
        created_at=row["created_at"],
        lease_expires_at=row["lease_expires_at"],
        usage_day=row["usage_day"],
        duration_seconds=row["duration_seconds"],
        file_size_bytes=row["file_size_bytes"],
        output_uri=row["output_uri"],
        render_seconds=row["render_seconds"],
        error=row["error"],
        completed_at=row["completed_at"],
        expired_at=row["expired_at"],
    )
