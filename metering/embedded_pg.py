"""The embedded PostgreSQL used when DATABASE_URL is unset.

Start it before any gRPC object exists in the process: pgserver forks (and, as root, switches user),
and a fork while gRPC threads run can crash.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def start_embedded_postgres(data_dir: Path) -> str:
    """Starts (or joins) the PostgreSQL under `data_dir/pg`; returns the DSN of its `postgres` database.

    The server stops when the last process using it exits (cleanup_mode="stop").
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data_dir / "pg", cleanup_mode="stop")
    return server.get_uri()


def with_database(dsn: str, name: str) -> str:
    """The same server's DSN for database `name` (pgserver DSNs look like postgresql://u:@/db?host=...)."""
    head, _, query = dsn.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")
