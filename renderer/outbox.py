"""A durable outbox for completions: no finished render is lost because metering was down.

Every completion is written to SQLite before the first delivery attempt (write-ahead), so neither a metering
outage nor a renderer crash between the render's end and metering's acknowledgement loses it. A drain loop
retries pending rows with capped exponential backoff and jitter, also after a restart.
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

    def start(self) -> None:
        # What an earlier process left behind is due now: its backoff (up to max_backoff) was waiting for a
        # metering that may long be back, and no first attempt of this process is running yet.
        with self._db_lock:
            self._db.execute("UPDATE pending_completions SET next_attempt_at = min(next_attempt_at, ?)", (time.time(),))
        self._drainer = asyncio.create_task(self._drain_forever(), name="outbox-drain")

    async def close(self) -> None:
        if self._drainer:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        self._db.close()

    async def submit(self, completion: Completion) -> bool:
        """Persist, then try to deliver at once. True when metering acknowledged it now."""
        payload = json.dumps(dataclasses.asdict(completion))
        # Not due for the drain loop while this first attempt runs; after a crash, due once the grace has passed.
        await self._run(
            "INSERT OR IGNORE INTO pending_completions (export_id, payload, next_attempt_at) VALUES (?, ?, ?)",
            (completion.export_id, payload, time.time() + _FIRST_ATTEMPT_GRACE_SECONDS),
        )
        delivered = await self._attempt(completion, attempts=0)
        if not delivered:
            self._wake.set()
        return delivered

    def depth(self) -> int:
        with self._db_lock:
            return int(self._db.execute("SELECT count(*) FROM pending_completions").fetchone()[0])

    def dead_letters(self) -> list[tuple[str, str]]:
        with self._db_lock:
            return self._db.execute("SELECT export_id, error FROM dead_completions ORDER BY failed_at").fetchall()

    async def _attempt(self, completion: Completion, *, attempts: int) -> bool:
        try:
            await self._deliver(completion)
        except MeteringRejected as error:
            if not error.permanent:
                await self._reschedule(completion.export_id, attempts, str(error))
                return False
            log.error(
                "metering refused a completion for good; kept as a dead letter",
                extra={"export_id": completion.export_id, "error": str(error)},
            )
            await self._run_many(
                [
                    (
                        "INSERT OR REPLACE INTO dead_completions VALUES (?, ?, ?, ?)",
                        (completion.export_id, json.dumps(dataclasses.asdict(completion)), str(error), time.time()),
                    ),
                    ("DELETE FROM pending_completions WHERE export_id = ?", (completion.export_id,)),
                ]
            )
            return False
        except (MeteringUnavailable, OSError) as error:
            await self._reschedule(completion.export_id, attempts, str(error))
            return False
        await self._run("DELETE FROM pending_completions WHERE export_id = ?", (completion.export_id,))
        return True

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def drain_due(self) -> float | None:
        """Deliver every row that is due; returns when the next one falls due (None: nothing pending)."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT payload, attempts FROM pending_completions WHERE next_attempt_at <= ? ORDER BY next_attempt_at",
                (time.time(),),
            ).fetchall()
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
