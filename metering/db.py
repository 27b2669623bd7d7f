"""The connection pool and the one place where "the database is unreachable" becomes `Unavailable`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg

from metering import errors
from metering.sql import QUERIES

log = logging.getLogger(__name__)
T = TypeVar("T")

# Lost or refused connections, server shutdowns, overload, timeouts: the caller may retry later.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidCatalogNameError,  # the database itself is gone
)
# Two transactions that chose each other as victims: running again is the fix.
_RETRYABLE_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def is_unavailable(error: BaseException) -> bool:
    if isinstance(error, _UNAVAILABLE_ERRORS):
        return True
    # asyncpg reports a connection closed under it as a plain InterfaceError.
    return isinstance(error, asyncpg.exceptions.InterfaceError) and "closed" in str(error)


@contextlib.contextmanager
def unavailable_on_connection_errors() -> Iterator[None]:
    try:
        yield
    except errors.MeteringError:
        raise
    except Exception as error:
        if is_unavailable(error):
            raise errors.Unavailable(f"the metering database is unavailable ({type(error).__name__})") from error
        raise


class Database:
    """A pool plus transactions that retry on deadlock and report lost connections as `Unavailable`."""

    def __init__(self, pool: asyncpg.Pool, *, attempts: int = 3) -> None:
        self.pool = pool
        self._attempts = attempts

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        with unavailable_on_connection_errors():
            async with self.pool.acquire() as connection:
                yield connection

    async def transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        for attempt in range(1, self._attempts + 1):
            try:
                async with self.connection() as connection, connection.transaction():
                    return await work(connection)
            except _RETRYABLE_ERRORS:
                if attempt == self._attempts:
                    raise
                log.warning("transaction retried", extra={"attempt": attempt})
        raise AssertionError("unreachable")

    async def autocommit(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Like `transaction`, for work whose statements each stand alone (each is its own transaction):
        no BEGIN and COMMIT round trips. Retried on deadlock too, so `work` must be safe to run again."""
        for attempt in range(1, self._attempts + 1):
            try:
                async with self.connection() as connection:
                    return await work(connection)
            except _RETRYABLE_ERRORS:
                if attempt == self._attempts:
                    raise
                log.warning("statement retried", extra={"attempt": attempt})
        raise AssertionError("unreachable")

    async def ping(self, max_wait: float) -> None:
        async with asyncio.timeout(max_wait), self.connection() as connection:
            with unavailable_on_connection_errors():
                await connection.fetchval(QUERIES["ping"])


async def _skip_session_reset(connection: asyncpg.Connection) -> None:
    """Replaces the pool's reset query on release (one round trip per call): asyncpg still rolls back a
    transaction left open, and metering keeps no other session state (no SET, LISTEN or cursors; the
    migrator releases its advisory lock itself)."""


async def create_pool(
    dsn: str, *, size: int, connect_timeout: float, command_timeout: float
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        server_settings={"application_name": "metering"},
        reset=_skip_session_reset,
    )
    assert pool is not None
    return pool


async def connect_with_retry(
    dsn: str, *, size: int, connect_timeout: float, command_timeout: float, deadline_seconds: float
) -> asyncpg.Pool:
    """Waits for the database at start-up (it may be starting too), up to `deadline_seconds`."""
    deadline = time.monotonic() + deadline_seconds
    delay = 0.2
    while True:
        try:
            return await create_pool(
                dsn, size=size, connect_timeout=connect_timeout, command_timeout=command_timeout
            )
        except Exception as error:
            if not is_unavailable(error) or time.monotonic() + delay > deadline:
                raise errors.Unavailable(f"cannot connect to the database: {error}") from error
            log.warning("database not reachable yet; retrying", extra={"error": str(error)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Creates database `name` on the server of `admin_dsn` if it does not exist (embedded PostgreSQL)."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        exists = await connection.fetchval(QUERIES["database_exists"], name)
        if not exists:
            with contextlib.suppress(asyncpg.exceptions.DuplicateDatabaseError):
                # An identifier cannot be a bind parameter; `name` is a constant of this program.
                await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
