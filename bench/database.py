"""PostgreSQL for the benchmarks: a dedicated server (embedded, through pgserver) or BENCH_DATABASE_URL, and a
fresh migrated database per measurement.

The embedded server must start before any gRPC object exists in this process (pgserver forks; as root it
switches user), so `python -m bench` starts it first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from metering.migrate import migrate

PGBENCH_CANDIDATES = ("/usr/lib/postgresql/15/bin/pgbench",)


def with_database(dsn: str, name: str) -> str:
    """`dsn` with its database replaced by `name` (keeps user, host, socket directory and options)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def database_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


@dataclass(frozen=True, slots=True)
class Libpq:
    """Where a DSN points, as libpq command-line tools (pgbench, psql) take it."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, dsn: str) -> Libpq:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        port = int(query.get("port", [parts.port or 5432])[0])
        return cls(host, port, parts.username or "postgres", parts.password or "", parts.path.lstrip("/"))

    def args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user, self.database]

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


def find_pgbench() -> str | None:
    """BENCH_PGBENCH, the PostgreSQL 15 binaries, `pgbench` on PATH, else the one pgserver bundles."""
    explicit = os.environ.get("BENCH_PGBENCH")
    if explicit:
        return explicit
    for candidate in PGBENCH_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("pgbench")
    if found:
        return found
    try:
        import pgserver

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
    except ImportError:
        return None
    return str(bundled) if os.access(bundled, os.X_OK) else None


@dataclass
class BenchPostgres:
    admin_dsn: str
    embedded: object | None = None
    data_dir: Path | None = None
    databases: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> BenchPostgres:
        """BENCH_DATABASE_URL (a role that may CREATE DATABASE) when set, else a throw-away embedded server."""
        external = os.environ.get("BENCH_DATABASE_URL")
        if external:
            return cls(external)
        data_dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            import pgserver

            try:
                server = pgserver.get_server(data_dir, cleanup_mode="delete")
            except BaseException:
                shutil.rmtree(data_dir, ignore_errors=True)
                raise
        return cls(server.get_uri(), server, data_dir)

    async def server_version(self) -> str:
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()

    async def settings(self) -> dict[str, str]:
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            rows = await connection.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                ["fsync", "synchronous_commit", "shared_buffers", "max_connections"],
            )
        finally:
            await connection.close()
        return {row["name"]: row["setting"] for row in rows}

    async def create_database(self, prefix: str = "bench") -> str:
        """A fresh database with metering's migrations applied; returns its DSN."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        self.databases.append(name)
        dsn = with_database(self.admin_dsn, name)
        connection = await asyncpg.connect(dsn)
        try:
            await migrate(connection)
        finally:
            await connection.close()
        return dsn

    async def drop_database(self, dsn: str) -> None:
        name = database_name(dsn)
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()
        if name in self.databases:
            self.databases.remove(name)

    async def close(self) -> None:
        for name in list(self.databases):
            await self.drop_database(with_database(self.admin_dsn, name))
        if self.embedded is not None:
            self.embedded.cleanup()  # type: ignore[attr-defined]
            self.embedded = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)


async def settle(dsn: str, *, vacuum: bool = False) -> None:
    """Leaves the database as a steady state would before anything is measured. With `vacuum`, what autovacuum
    would have done about an earlier run's dead rows (else the next run prunes them on first access, and pays
    for it: a half-load run's p50 was 9.5 ms right after a saturated run, 6 ms after a vacuum). Then writes
    what is dirty: PostgreSQL's buffers (CHECKPOINT) and the kernel's page cache (sync); otherwise the kernel
    writes those 100 MB or so back about 30 s later, in the middle of a measurement, and every commit's fsync
    waits behind it for 100-200 ms (seen in the open loop as a p99 of 130-170 ms against 13-24 ms without)."""
    connection = await asyncpg.connect(dsn)
    try:
        if vacuum:
            await connection.execute("VACUUM")
        await connection.execute("CHECKPOINT")
    except asyncpg.exceptions.InsufficientPrivilegeError:
        pass  # BENCH_DATABASE_URL without the right: the sync below still helps when the server is local
    finally:
        await connection.close()
    await asyncio.to_thread(os.sync)
