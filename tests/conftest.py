"""Shared fixtures: PostgreSQL (embedded, or DATABASE_URL), a fresh migrated database per test, and an
in-process metering server.

    pg_dsn            session   admin DSN of the server (creates and drops databases)
    database_url      function  DSN of a fresh database cloned from a template migrated once
    metering_target   function  "127.0.0.1:PORT" of an in-process metering server on a fresh database
"""

from __future__ import annotations

import os

# Before anything imports grpc: pgserver forks, and gRPC's fork handlers crash now and then when it does.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from collections.abc import AsyncIterator

import pytest

from tests.support import postgres


def pytest_collection_finish(session: pytest.Session) -> None:
    # Start the embedded PostgreSQL now, before any test can create a gRPC server or channel.
    if any("pg_dsn" in getattr(item, "fixturenames", ()) for item in session.items):
        postgres.admin_dsn()


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    return postgres.admin_dsn()


@pytest.fixture(scope="session")
async def metering_template(pg_dsn: str) -> AsyncIterator[str]:
    """Name of a database migrated once per session; `database_url` clones it."""
    name = await postgres.create_template(pg_dsn)
    yield name
    await postgres.drop_database(pg_dsn, name)


@pytest.fixture
async def database_url(pg_dsn: str, metering_template: str) -> AsyncIterator[str]:
    dsn = await postgres.create_database(pg_dsn, metering_template)
    yield dsn
    await postgres.drop_database(pg_dsn, dsn)


@pytest.fixture
async def metering_target(database_url: str) -> AsyncIterator[str]:
    from tests.support.metering import start_metering

    async with start_metering(database_url) as metering:
        yield metering.target
