"""After a load run: do the counters and rollups the service kept agree with its ledger, row for row?

Every reservation and completion under load must have moved the day's usage (user and project), the
rollups and the render-time histogram exactly as the exports table says; a lost or doubled update shows up
as a mismatching row here. So does a system summary (migrations/0003) that disagrees with the rollups.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.support.faults import SUMMARY_CHECKS

CHECKS = {
    "daily_usage": """
        SELECT count(*) FROM (
            SELECT user_id, usage_day AS day, count(*) FILTER (WHERE status IN ('RESERVED', 'COMPLETED')) AS used
            FROM exports GROUP BY 1, 2
        ) ledger
        FULL JOIN (SELECT user_id, day, used FROM daily_usage WHERE used <> 0) kept USING (user_id, day)
        WHERE coalesce(ledger.used, 0) <> coalesce(kept.used, 0)
    """,
    "project_daily_usage": """
        SELECT count(*) FROM (
            SELECT project_id, usage_day AS day, count(*) FILTER (WHERE status IN ('RESERVED', 'COMPLETED')) AS used
            FROM exports GROUP BY 1, 2
        ) ledger
        FULL JOIN (SELECT project_id, day, used FROM project_daily_usage WHERE used <> 0) kept USING (project_id, day)
        WHERE coalesce(ledger.used, 0) <> coalesce(kept.used, 0)
    """,
    "export_rollups": """
        SELECT count(*) FROM (
            SELECT usage_day AS day, user_id, project_id, format, render_mode, count(*) AS exports,
                   count(*) FILTER (WHERE status = 'RESERVED') AS reserved,
                   count(*) FILTER (WHERE status = 'COMPLETED') AS completed,
                   count(*) FILTER (WHERE status = 'FAILED') AS failed,
                   count(*) FILTER (WHERE status = 'CANCELLED') AS cancelled,
                   count(*) FILTER (WHERE status = 'EXPIRED') AS expired,
                   coalesce(sum(file_size_bytes) FILTER (WHERE status = 'COMPLETED'), 0) AS completed_bytes
            FROM exports GROUP BY 1, 2, 3, 4, 5
        ) ledger
        FULL JOIN export_rollups kept USING (day, user_id, project_id, format, render_mode)
        WHERE (ledger.exports, ledger.reserved, ledger.completed, ledger.failed, ledger.cancelled, ledger.expired,
               ledger.completed_bytes)
              IS DISTINCT FROM
              (kept.exports, kept.reserved, kept.completed, kept.failed, kept.cancelled, kept.expired,
               kept.completed_bytes)
    """,
    "render_time_histogram": """
        SELECT count(*) FROM (
            SELECT usage_day AS day, user_id, project_id, count(*) AS n FROM exports
            WHERE status = 'COMPLETED' AND render_seconds > 0 GROUP BY 1, 2, 3
        ) ledger
        FULL JOIN (
            SELECT day, user_id, project_id, sum(count) AS n FROM render_time_histogram GROUP BY 1, 2, 3
        ) kept USING (day, user_id, project_id)
        WHERE coalesce(ledger.n, 0) <> coalesce(kept.n, 0)
    """,
}


async def check_ledger(dsn: str) -> dict[str, Any]:
    """Mismatching rows per counter table (0 everywhere: consistent), and the ledger's size."""
    connection = await asyncpg.connect(dsn)
    try:
        mismatches = {name: int(await connection.fetchval(sql)) for name, sql in CHECKS.items()}
        for name, sql in SUMMARY_CHECKS.items():
            mismatches[name] = int(await connection.fetchval(f"SELECT count(*) FROM ({sql}) AS mismatch"))
        exports = int(await connection.fetchval("SELECT count(*) FROM exports"))
    finally:
        await connection.close()
    return {"consistent": not any(mismatches.values()), "mismatching_rows": mismatches, "exports": exports}
