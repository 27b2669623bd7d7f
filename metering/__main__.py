"""`python -m metering`: one metering server (see README.md, "Metering")."""

from __future__ import annotations

import logging
import os
import sys

from metering.config import Config, ConfigError
from metering.logs import configure_logging

EMBEDDED_DATABASE = "metering"


def main() -> int:
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        print(f"metering: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    log = logging.getLogger("metering")
    database_url = config.database_url
    embedded_admin_url = None
    if database_url is None:
        # Before any gRPC object exists in this process (pgserver forks; see embedded_pg).
        from metering.embedded_pg import start_embedded_postgres, with_database

        embedded_admin_url = start_embedded_postgres(config.data_dir)
        database_url = with_database(embedded_admin_url, EMBEDDED_DATABASE)
        log.info("embedded PostgreSQL", extra={"data_dir": str(config.data_dir / "pg")})

    from metering.server import serve  # creates gRPC objects only after the embedded database forked

    async def run() -> int:
        if embedded_admin_url is not None:
            from metering.db import ensure_database

            await ensure_database(embedded_admin_url, EMBEDDED_DATABASE)
        return await serve(config, database_url)

    # uvloop: a C event loop; the server spends much of its time in socket I/O with clients and PostgreSQL.
    import gc

    import uvloop

    # The objects of start-up (modules, descriptors) never become garbage: keep them out of every collection,
    # and collect the young generation less often (bench: 695 -> 720 pairs/s, spread).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    return uvloop.run(run())


if __name__ == "__main__":
    sys.exit(main())
