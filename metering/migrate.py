"""Versioned SQL migrations (metering/migrations/NNNN_name.sql), applied at start-up.

Every replica runs this when it starts. A PostgreSQL advisory lock makes replicas that start together
take turns: the first applies what is missing, the others then find nothing to do. Each migration runs
in its own transaction together with its row in `schema_migrations`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from metering.sql import QUERIES

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# pg_advisory_lock key of the migrator: the bytes "metering" as a signed 64-bit integer.
MIGRATION_LOCK_KEY = int.from_bytes(b"metering", "big", signed=True)
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(f"migration versions must run 1, 2, 3... without gaps; found {versions}")
    return migrations


async def migrate(connection: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Applies the migrations this database lacks; returns the versions applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    await connection.execute(QUERIES["advisory_lock"], MIGRATION_LOCK_KEY)
    try:
        await connection.execute(QUERIES["create_migrations_table"])
        applied = {row["version"]: row for row in await connection.fetch(QUERIES["applied_migrations"])}
        newly_applied = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was "
                        "applied; add a new migration instead of editing an applied one"
                    )
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    QUERIES["record_migration"], migration.version, migration.name, migration.checksum
                )
            log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
            newly_applied.append(migration.version)
        unknown = sorted(set(applied) - {migration.version for migration in migrations})
        if unknown:
            # A newer replica migrated further (rolling upgrade); migrations are additive, so carry on.
            log.warning("database has migrations this build does not know", extra={"versions": unknown})
        return newly_applied
    finally:
        await connection.execute(QUERIES["advisory_unlock"], MIGRATION_LOCK_KEY)
