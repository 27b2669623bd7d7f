"""PostgreSQL for tests: one embedded server per test session (or DATABASE_URL), a template database
migrated once, and a fresh database cloned from it for each test.

The embedded server must start before any gRPC object exists in the process (pgserver forks, as root
with a user switch); tests/conftest.py starts it right after collection when any test needs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from metering.migrate import migrate

_embedded: object | None = None
_embedded_dsn: str | None = None


def admin_dsn() -> str:
    """DATABASE_URL when set (it must allow CREATE DATABASE), else a session-wide embedded server."""
    external = os.environ.get("DATABASE_URL")
    if external:
        return external
    return start_embedded()


def start_embedded() -> str:
    global _embedded, _embedded_dsn
    if _embedded_dsn is not None:
        return _embedded_dsn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        data_dir = Path(tempfile.mkdtemp(prefix="metering-test-pg-"))
        try:
            server = pgserver.get_server(data_dir, cleanup_mode="delete")
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
    # Durability is worthless to a throw-away test server; speed is not.
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        " ALTER SYSTEM SET full_page_writes = off;"
        " SELECT pg_reload_conf();"
    )
    _embedded = server
    _embedded_dsn = server.get_uri()
    return _embedded_dsn


def with_database(dsn: str, name: str) -> str:
    """`dsn` with its database replaced by `name` (keeps user, host, socket dir and options)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def upstream_address(dsn: str) -> tuple[str, int] | str:
    """Where `dsn` connects: (host, port) for TCP or the unix socket path."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return (host or "127.0.0.1", port)


def via_tcp(dsn: str, host: str, port: int) -> str:
    """`dsn` pointed at host:port over TCP, for a proxy standing in front of the server."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    return urlunsplit(("postgresql", f"{user}{password}@{host}:{port}", parts.path, "", ""))


async def create_template(admin: str) -> str:
    """Creates and migrates a template database; returns its name."""
    name = f"metering_template_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    template = await asyncpg.connect(with_database(admin, name))
    try:
        await migrate(template)
    finally:
        await template.close()
    return name


async def create_database(admin: str, template: str | None = None) -> str:
    """A fresh database (cloned from `template` when given); returns its DSN."""
    name = f"metering_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(admin)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await connection.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await connection.close()
    return with_database(admin, name)


async def drop_database(admin: str, dsn_or_name: str) -> None:
    name = urlsplit(dsn_or_name).path.lstrip("/") if "://" in dsn_or_name else dsn_or_name
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def run_sql(dsn: str, *statements: str) -> None:
    """Runs each statement on one connection of its own, as an operator's session (or a fault) would."""
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()
