"""GetStats from the rollup tables (kept in the ledger's own transactions), never from a ledger scan.
A user's or a project's stats read its own rollup rows; system-wide stats read the system summaries
(migrations/0003_system_summaries.sql), so neither grows with the rest of the ledger.

Percentiles come from a log-bucket histogram of render times: each bucket is 2% wide and reports its
geometric middle, so p50/p95 are within 1% of the nearest-rank value.

"Near the daily limit" (`near_limit`, and the `metering_users_near_limit` gauge) means at most
max(1, 20% of the tier's daily limit) exports left today, or none; tiers without a daily limit never are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg

from metering.domain import DailyStats, ProjectStats, Stats, StatsRequest, UserStats
from metering.sql import QUERIES
from metering.tiers import TierTable

HISTOGRAM_BASE_SECONDS = 0.001
HISTOGRAM_GROWTH = 1.02
TOP_N = 10
NEAR_LIMIT_TOP = 100  # users listed in near_limit; the per-tier counts cover everyone


def render_time_bucket(seconds: float) -> int:
    seconds = max(seconds, HISTOGRAM_BASE_SECONDS)
    return math.floor(math.log(seconds / HISTOGRAM_BASE_SECONDS) / math.log(HISTOGRAM_GROWTH))


def bucket_value(bucket: int) -> float:
    return HISTOGRAM_BASE_SECONDS * HISTOGRAM_GROWTH ** (bucket + 0.5)


def percentile(histogram: Sequence[tuple[int, int]], quantile: float) -> float:
    """Nearest-rank percentile of (bucket, count) pairs sorted by bucket; 0 when empty."""
    total = sum(count for _, count in histogram)
    if total == 0:
        return 0.0
    rank = max(1, math.ceil(quantile * total))
    seen = 0
    for bucket, count in histogram:
        seen += count
        if seen >= rank:
            return bucket_value(bucket)
    return bucket_value(histogram[-1][0])


def near_limit_from(daily_limit: int) -> int:
    """The day's count from which a user is near `daily_limit`: at most max(1, 20% of it) exports left."""
    return daily_limit - max(1, daily_limit // 5)


@dataclass(frozen=True, slots=True)
class NearLimit:
    users: tuple[UserStats, ...]  # most used first, at most the `top` asked for
    by_tier: Mapping[str, int]  # every configured tier, 0 when nobody on it is near its limit


async def load_near_limit(
    connection: asyncpg.Connection,
    *,
    today: date,
    tiers: TierTable,
    user_id: str | None = None,
    project_id: str | None = None,
    top: int = NEAR_LIMIT_TOP,
) -> NearLimit:
    """Who is near their daily limit on `today`, in one query over today's rollup and usage rows."""
    names = list(tiers)
    limits = [tiers[name].daily_limit for name in names]
    near_from = [None if limit is None else near_limit_from(limit) for limit in limits]
    rows = await connection.fetch(
        QUERIES["near_limit_users"], today, user_id, project_id, names, limits, near_from, tiers.default.name, top
    )
    users = sorted(
        (
            UserStats(row["user_id"], 0, None, "", row["tier"], row["used"], row["daily_limit"])
            for row in rows
            if row["tier_count"] is None
        ),
        key=lambda user: (-user.used_today, user.user_id),
    )
    by_tier = dict.fromkeys(names, 0)
    by_tier.update((row["tier"], row["tier_count"]) for row in rows if row["tier_count"] is not None)
    return NearLimit(tuple(users), by_tier)


def window(end: date, days: int) -> list[date]:
    return [end - timedelta(days=offset) for offset in range(days - 1, -1, -1)]


def _favorite(counts: dict[str, int]) -> str:
    """Most used key; ties go to the alphabetically first, so the answer is stable."""
    if not counts or max(counts.values()) == 0:
        return ""
    return min(counts, key=lambda key: (-counts[key], key))


async def load_stats(
    connection: asyncpg.Connection, request: StatsRequest, *, today: date, tiers: TierTable
) -> Stats:
    days = window(today, request.days)
    if request.user_id is None and request.project_id is None:
        # System-wide: the summaries (migrations/0003), whose size does not grow with the ledger.
        rollup = await connection.fetch(QUERIES["system_stats_rollup"], days[0], days[-1])
        histogram_rows = await connection.fetch(QUERIES["system_render_histogram"], days[0], days[-1])
        user_rows = await connection.fetch(QUERIES["system_top_users"], days[0], TOP_N, today)
        project_rows = await connection.fetch(QUERIES["system_top_projects"], days[0], TOP_N)
    else:
        scope = (days[0], days[-1], request.user_id, request.project_id)
        rollup = await connection.fetch(QUERIES["stats_rollup"], *scope)
        histogram_rows = await connection.fetch(QUERIES["stats_render_histogram"], *scope)
        user_rows = await connection.fetch(QUERIES["stats_top_users"], *scope, TOP_N, today)
        project_rows = await connection.fetch(QUERIES["stats_top_projects"], *scope, TOP_N)
    histogram = [(row["bucket"], row["count"]) for row in histogram_rows]
    near = await load_near_limit(
        connection, today=today, tiers=tiers, user_id=request.user_id, project_id=request.project_id
    )

    users = [_user_stats(row, tiers) for row in user_rows]
    if request.user_id is not None and not users:
        snapshot = await connection.fetchrow(QUERIES["user_snapshot"], request.user_id, today)
        tier = tiers.resolve(snapshot["tier"])
        users = [
            UserStats(request.user_id, 0, None, "", tier.name, snapshot["used_today"], tier.daily_limit)
        ]
    projects = [
        ProjectStats(row["project_id"], row["user_id"], row["exports"], row["last_export_at"])
        for row in project_rows
    ]
    return _assemble(rollup, histogram, days, users, projects, near.users)


def _user_stats(row: asyncpg.Record, tiers: TierTable) -> UserStats:
    tier = tiers.resolve(row["tier"])
    return UserStats(
        user_id=row["user_id"],
        total_exports=row["exports"],
        last_export_at=row["last_export_at"],
        favorite_format=row["favorite_format"],
        tier=tier.name,
        used_today=row["used_today"],
        daily_limit=tier.daily_limit,
    )


def _assemble(
    rollup: Iterable[asyncpg.Record],
    histogram: Sequence[tuple[int, int]],
    days: list[date],
    users: list[UserStats],
    projects: list[ProjectStats],
    near_limit: tuple[UserStats, ...],
) -> Stats:
    totals = None
    daily: dict[date, DailyStats] = {}
    by_format: dict[str, int] = {}
    by_mode: dict[str, int] = {}
    day_formats: dict[date, dict[str, int]] = {}
    rows = list(rollup)
    for row in rows:  # the (day, format) rows first: each day's row takes its formats
        if row["by_day"] and row["by_format"]:
            day_formats.setdefault(row["day"], {})[row["format"]] = row["exports"]
    for row in rows:
        if row["by_day"] and row["by_format"]:
            continue
        if row["by_day"]:
            daily[row["day"]] = DailyStats(
                date=row["day"],
                exports=row["exports"],
                completed=row["completed"],
                failed=row["failed"],
                cancelled=row["cancelled"],
                expired=row["expired"],
                avg_duration_seconds=_mean(row["completed_duration_seconds"], row["completed"]),
                by_format=day_formats.get(row["day"], {}),
            )
        elif row["by_format"]:
            by_format[row["format"]] = row["exports"]
        elif row["by_mode"]:
            by_mode[row["render_mode"]] = row["exports"]
        else:
            totals = row
    stats_daily = tuple(daily.get(day, DailyStats(date=day)) for day in days)
    if totals is None or not totals["exports"]:
        return Stats(
            window_start=days[0], window_end=days[-1], daily=stats_daily, users=tuple(users), near_limit=near_limit
        )
    completed, failed = totals["completed"], totals["failed"]
    return Stats(
        window_start=days[0],
        window_end=days[-1],
        total_exports=totals["exports"],
        completed=completed,
        failed=failed,
        cancelled=totals["cancelled"],
        expired=totals["expired"],
        in_flight=totals["reserved"],
        last_export_at=totals["last_export_at"],
        favorite_format=_favorite(by_format),
        avg_duration_seconds=_mean(totals["completed_duration_seconds"], completed),
        total_bytes=totals["completed_bytes"],
        daily=stats_daily,
        by_format=by_format,
        by_render_mode=by_mode,
        failure_rate=failed / (completed + failed) if completed + failed else 0.0,
        p50_render_seconds=percentile(histogram, 0.50),
        p95_render_seconds=percentile(histogram, 0.95),
        users=tuple(users),
        projects=tuple(projects),
        near_limit=near_limit,
    )


def _mean(total: float | None, count: int) -> float:
    return float(total or 0.0) / count if count else 0.0
