"""A durable outbox for completions: no finished render is lost because metering was down.

Every completion is written to SQLite, durably, while its first delivery is under way, so neither a metering
outage nor a renderer crash between the render's end and metering's acknowledgement loses it. A drain loop
retries pending rows with capped exponential backoff and jitter, also after a restart.

The write and the first delivery run at the same time: a crash loses a completion only when it was neither
written nor acknowledged, the same window as writing first, without the write's latency on every render.
Once metering has acknowledged, the row is deleted in the background: a crash before that only means one
more delivery after the restart, which metering answers as a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from renderer.metering_port import Completion, MeteringRejected, MeteringUnavailable, Outcome

log = logging.getLogger(__name__)

_FIRST_ATTEMPT_GRACE_SECONDS = 10.0

Deliver = Callable[[Completion], Awaitable[None]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_completions (
    export_id TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS dead_completions (
    export_id TEXT PRIMARY KEY,
    payload TEXT NOT NULL,
    error TEXT NOT NULL,
    failed_at REAL NOT NULL
);
"""


class Outbox:
    def __init__(
        self,
        path: Path,
        deliver: Deliver,
        *,
        base_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db_lock = threading.Lock()
        self._deliver = deliver
        self._base_backoff = base_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._acknowledged: set[str] = set()  # delivered, row not deleted yet (not counted by `depth`)
        self._forgetting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        # What an earlier process left behind is due now: its backoff (up to max_backoff) was waiting for a
        # metering that may long be back, and no first attempt of this process is running yet.
        with self._db_lock:
            self._db.execute("UPDATE pending_completions SET next_attempt_at = min(next_attempt_at, ?)", (time.time(),))
        self._drainer = asyncio.create_task(self._drain_forever(), name="outbox-drain")

    async def close(self) -> None:
        if self._drainer:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)  # a cancelled close() still raises
        if self._forgetting:
            await asyncio.gather(*self._forgetting, return_exceptions=True)
        self._db.close()

    async def submit(self, completion: Completion) -> bool:
        """Persist while delivering for the first time. True when metering acknowledged it now."""
        payload = json.dumps(dataclasses.asdict(completion))
        # Not due for the drain loop while this first attempt runs; after a crash, due once the grace has passed.
        written = asyncio.ensure_future(
            self._run(
                "INSERT OR IGNORE INTO pending_completions (export_id, payload, next_attempt_at) VALUES (?, ?, ?)",
                (completion.export_id, payload, time.time() + _FIRST_ATTEMPT_GRACE_SECONDS),
            )
        )
        try:
            failure = await self._try_delivery(completion)
        finally:
            # Whatever happened, the row must exist before the outcome is written to it (or it is deleted).
            write_error = (await asyncio.gather(written, return_exceptions=True))[0]
        if isinstance(write_error, BaseException):
            if failure is not None:
                raise write_error  # neither written nor delivered: the caller must know
            log.warning(
                "completion delivered but not written to the outbox",
                extra={"export_id": completion.export_id, "error": repr(write_error)},
            )
            return True
        delivered = await self._settle(completion, failure, attempts=0)
        if not delivered:
            self._wake.set()
        return delivered

    def depth(self) -> int:
        """Completions that metering has not acknowledged yet."""
        with self._db_lock:
            rows = int(self._db.execute("SELECT count(*) FROM pending_completions").fetchone()[0])
            return rows - len(self._acknowledged)

    def dead_letters(self) -> list[tuple[str, str]]:
        with self._db_lock:
            return self._db.execute("SELECT export_id, error FROM dead_completions ORDER BY failed_at").fetchall()

    async def _attempt(self, completion: Completion, *, attempts: int) -> bool:
        return await self._settle(completion, await self._try_delivery(completion), attempts=attempts)

    async def _try_delivery(self, completion: Completion) -> Exception | None:
        """None when metering acknowledged, else why not (an error `_settle` knows)."""
        try:
            await self._deliver(completion)
        except (MeteringRejected, MeteringUnavailable, OSError) as error:
            return error
        return None

    async def _settle(self, completion: Completion, failure: Exception | None, *, attempts: int) -> bool:
        """Records a delivery's outcome on the completion's row; True when it was acknowledged."""
        if failure is None:
            self._forget(completion.export_id)
            return True
        if isinstance(failure, MeteringRejected):
            if not failure.permanent:
                await self._reschedule(completion.export_id, attempts, str(failure))
                return False
            log.error(
                "metering refused a completion for good; kept as a dead letter",
                extra={"export_id": completion.export_id, "error": str(failure)},
            )
            await self._run_many(
                [
                    (
                        "INSERT OR REPLACE INTO dead_completions VALUES (?, ?, ?, ?)",
                        (completion.export_id, json.dumps(dataclasses.asdict(completion)), str(failure), time.time()),
                    ),
                    ("DELETE FROM pending_completions WHERE export_id = ?", (completion.export_id,)),
                ]
            )
            return False
        await self._reschedule(completion.export_id, attempts, str(failure))
        return False

    def _forget(self, export_id: str) -> None:
        """Deletes an acknowledged completion's row, off the render's path."""

        def delete() -> None:
            with self._db_lock:
                try:
                    self._db.execute("DELETE FROM pending_completions WHERE export_id = ?", (export_id,))
                finally:
                    self._acknowledged.discard(export_id)

        with self._db_lock:
            self._acknowledged.add(export_id)
        task = asyncio.create_task(asyncio.to_thread(delete), name="outbox-forget")
        self._forgetting.add(task)
        task.add_done_callback(self._forgot)

    def _forgot(self, task: asyncio.Task[None]) -> None:
        self._forgetting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not delete an acknowledged completion", extra={"error": repr(task.exception())})

    async def _reschedule(self, export_id: str, attempts: int, error: str) -> None:
        delay = min(self._max_backoff, self._base_backoff * 2**attempts) * random.uniform(0.5, 1.0)
        await self._run(
            "UPDATE pending_completions SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE export_id = ?",
            (attempts + 1, time.time() + delay, error[:1000], export_id),
        )

    async def _drain_forever(self) -> None:
        while True:
            next_due = await self.drain_due()
            self._wake.clear()
            timeout = max(0.05, next_due - time.time()) if next_due is not None else self._max_backoff
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that arrives as the
            # event is set (close() right after a failed submit), and close() then waited out the whole timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def drain_due(self) -> float | None:
        """Deliver every row that is due; returns when the next one falls due (None: nothing pending)."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT export_id, payload, attempts FROM pending_completions WHERE next_attempt_at <= ?"
                " ORDER BY next_attempt_at",
                (time.time(),),
            ).fetchall()
            rows = [(payload, attempts) for export_id, payload, attempts in rows if export_id not in self._acknowledged]
        for payload, attempts in rows:
            fields = json.loads(payload)
            fields["outcome"] = Outcome(fields["outcome"])
            await self._attempt(Completion(**fields), attempts=attempts)
        with self._db_lock:
            (next_due,) = self._db.execute("SELECT min(next_attempt_at) FROM pending_completions").fetchone()
        return next_due

    async def _run(self, sql: str, params: tuple[object, ...]) -> None:
        await self._run_many([(sql, params)])

    async def _run_many(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        def write() -> None:
            with self._db_lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        self._db.execute(sql, params)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")

        await asyncio.to_thread(write)
