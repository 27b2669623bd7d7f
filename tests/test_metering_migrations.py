"""Migrations: idempotent re-runs, concurrent migrators, the migrated schema equals schema.sql, and every
named query prepares against it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from exportapi.metering.v1 import metering_pb2 as pb
from metering.migrate import Migration, MigrationError, load_migrations, migrate
from metering.sql import QUERIES
from tests.support import postgres
from tests.support.metering import metering_stub, reserve_request, start_metering

METERING_DIR = Path(__file__).resolve().parents[1] / "metering"


@contextlib.asynccontextmanager
async def empty_database(pg_dsn: str) -> AsyncIterator[str]:
    dsn = await postgres.create_database(pg_dsn)
    try:
        yield dsn
    finally:
        await postgres.drop_database(pg_dsn, dsn)


async def schema_snapshot(connection: asyncpg.Connection) -> dict[str, list[tuple]]:
    """Tables, columns, constraints, indexes, functions, triggers and composite types of the public schema,
    migration bookkeeping left out."""
    skip = "schema_migrations"
    columns = await connection.fetch(
        """SELECT table_name, column_name, data_type, is_nullable, column_default
           FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> $1
           ORDER BY 1, 2""",
        skip,
    )
    constraints = await connection.fetch(
        """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
           FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> $1
           ORDER BY 1, 2""",
        skip,
    )
    indexes = await connection.fetch(
        """SELECT tablename, indexname, indexdef FROM pg_indexes
           WHERE schemaname = 'public' AND tablename <> $1 ORDER BY 1, 2""",
        skip,
    )
    functions = await connection.fetch(
        """SELECT proname, pg_get_functiondef(oid) FROM pg_proc
           WHERE pronamespace = 'public'::regnamespace ORDER BY 1"""
    )
    triggers = await connection.fetch(
        """SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
           WHERE NOT tgisinternal AND tgrelid::regclass::text <> $1 ORDER BY 1, 2""",
        skip,
    )
    types = await connection.fetch(
        """SELECT t.typname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnum
           FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid JOIN pg_attribute a ON a.attrelid = c.oid
           WHERE t.typnamespace = 'public'::regnamespace AND c.relkind = 'c' AND a.attnum > 0
           ORDER BY 1, 4"""
    )
    return {
        "columns": [tuple(row) for row in columns],
        "triggers": [tuple(row) for row in triggers],
        "types": [tuple(row) for row in types],
        "constraints": [tuple(row) for row in constraints],
        "indexes": [tuple(row) for row in indexes],
        "functions": [tuple(row) for row in functions],
    }


async def test_the_migrated_schema_equals_schema_sql(pg_dsn: str) -> None:
    async with empty_database(pg_dsn) as migrated, empty_database(pg_dsn) as declared:
        first = await asyncpg.connect(migrated)
        second = await asyncpg.connect(declared)
        try:
            await migrate(first)
            await second.execute((METERING_DIR / "schema.sql").read_text())
            from_migrations = await schema_snapshot(first)
            from_schema_sql = await schema_snapshot(second)
        finally:
            await first.close()
            await second.close()
    assert from_migrations["columns"], "the migrations created nothing"
    assert from_migrations == from_schema_sql


async def test_rerunning_the_migrations_on_an_existing_database_changes_nothing(database_url: str) -> None:
    async with start_metering(database_url) as metering, metering_stub(metering.target) as stub:
        kept = await stub.CheckAndReserve(reserve_request("k", user="kim"))
    connection = await asyncpg.connect(database_url)
    try:
        before = await schema_snapshot(connection)
        assert await migrate(connection) == []
        assert await migrate(connection) == []
        after = await schema_snapshot(connection)
        recorded = await connection.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
        rows = await connection.fetch("SELECT export_id::text FROM exports")
    finally:
        await connection.close()
    assert before == after
    assert [(r["version"], r["name"], r["checksum"]) for r in recorded] == [
        (m.version, m.name, m.checksum) for m in load_migrations()
    ]
    assert [r["export_id"] for r in rows] == [kept.export_id]
    # A server starting on the migrated database finds the data where it was.
    async with start_metering(database_url) as metering, metering_stub(metering.target) as stub:
        usage = (await stub.GetUsage(pb.GetUsageRequest(user_id="kim"))).usage
    assert usage.used == 1


async def test_two_migrators_at_once_apply_each_migration_once(pg_dsn: str) -> None:
    async with empty_database(pg_dsn) as dsn:
        first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            applied = await asyncio.gather(migrate(first), migrate(second))
            recorded = await first.fetchval("SELECT count(*) FROM schema_migrations")
        finally:
            await first.close()
            await second.close()
    everything = [m.version for m in load_migrations()]
    assert sorted(applied, key=len) == [[], everything]
    assert recorded == len(everything)


async def test_two_servers_starting_at_once_on_an_empty_database_both_serve(pg_dsn: str) -> None:
    async with empty_database(pg_dsn) as dsn, contextlib.AsyncExitStack() as stack:
        first, second = await asyncio.gather(
            stack.enter_async_context(start_metering(dsn)), stack.enter_async_context(start_metering(dsn))
        )
        async with metering_stub(first.target) as one, metering_stub(second.target) as two:
            await one.CheckAndReserve(reserve_request("a", user="ivy"))
            usage = (await two.GetUsage(pb.GetUsageRequest(user_id="ivy"))).usage
    assert usage.used == 1


async def test_an_applied_migration_that_was_edited_is_refused(database_url: str) -> None:
    edited = [Migration(m.version, m.name, m.sql + "\n-- edited\n") for m in load_migrations()]
    connection = await asyncpg.connect(database_url)
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(connection, edited)
        # The lock was released: a correct migrator still runs.
        assert await migrate(connection) == []
    finally:
        await connection.close()


async def test_the_ledger_has_a_column_for_every_field_of_the_proto_export(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        columns = {
            row["column_name"]
            for row in await connection.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'exports'"
            )
        }
        unique = await connection.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'exports_user_idempotency_key'"
        )
    finally:
        await connection.close()
    proto_fields = {field.name for field in pb.Export.DESCRIPTOR.fields}
    assert proto_fields - columns == set()
    assert {"request_fingerprint", "lease_expires_at", "usage_day"} <= columns
    assert unique == "UNIQUE (user_id, idempotency_key)"


async def test_every_named_query_is_used_and_prepares_against_the_schema(database_url: str) -> None:
    source = "\n".join(path.read_text() for path in METERING_DIR.glob("*.py"))
    used = set(re.findall(r'QUERIES\["([a-z_]+)"\]', source))
    assert used - set(QUERIES) == set(), "code names queries that queries.sql lacks"
    assert set(QUERIES) - used == set(), "queries.sql has queries nothing uses"
    connection = await asyncpg.connect(database_url)
    try:
        for name, sql in QUERIES.items():
            if name == "create_migrations_table":
                continue  # DDL: run by every migrate() above
            await connection.prepare(sql)
    finally:
        await connection.close()
