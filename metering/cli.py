"""Operators' command line for a running metering service (at METERING_TARGET, default 127.0.0.1:50051).

    python -m metering.cli stats [--user U] [--project P] [--days N]     (--days 2: yesterday by format)
    python -m metering.cli near-limit [--user U] [--project P]         (who is near the daily limit today)
    python -m metering.cli usage U
    python -m metering.cli history U [--project P] [--limit N]
    python -m metering.cli set-tier U TIER
    python -m metering.cli archive [--older-than-days N]
    python -m metering.cli rebuild-summaries                              (system-wide stats, from the rollups)
    python -m metering.cli --json ...      (any command: the answer as JSON)

Credentials: METERING_TOKEN (or --token) is sent as `authorization: Bearer <token>`; METERING_TLS_CA_FILE
switches to TLS, METERING_TLS_CLIENT_CERT_FILE / METERING_TLS_CLIENT_KEY_FILE add a client certificate.

`archive` and `rebuild-summaries` are maintenance, like a migration: they connect to the database itself
(DATABASE_URL, else the embedded PostgreSQL under .data that `python -m metering` uses), not to a metering
server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, TypeVar

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from metering import errors
from metering.auth import AuthConfigError, ClientTls, sync_channel
from metering.config import MAX_RETENTION_DAYS
from metering.validation import MAX_STATS_DAYS

DEFAULT_TARGET = "127.0.0.1:50051"
CALL_TIMEOUT_SECONDS = 15.0
BAR_WIDTH = 40
_STATUS_NAMES = {value: name.removeprefix("EXPORT_STATUS_") for name, value in pb.ExportStatus.items()}
_MODE_NAMES = {pb.RENDER_MODE_LOCAL: "local", pb.RENDER_MODE_LAMBDA: "lambda"}
T = TypeVar("T")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # a usage error (argparse has said why on stderr), or --help
        return stop.code if isinstance(stop.code, int) else 2
    if args.command == "archive":
        return _archive(args, out)
    if args.command == "rebuild-summaries":
        return _rebuild_summaries(args, out)
    target = args.target or os.environ.get("METERING_TARGET") or DEFAULT_TARGET
    token = args.token or os.environ.get("METERING_TOKEN") or ""
    try:
        tls = ClientTls.from_env(
            os.environ, "METERING_TLS_CA_FILE", "METERING_TLS_CLIENT_CERT_FILE", "METERING_TLS_CLIENT_KEY_FILE"
        )
    except AuthConfigError as error:
        print(f"metering: {error}", file=sys.stderr)
        return 2
    try:
        with sync_channel(target, tls, token) as channel:
            stub = metering_pb2_grpc.MeteringStub(channel)
            return args.run(stub, args, out)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            print(f"metering: cannot reach metering at {target} ({error.details()})", file=sys.stderr)
            return 3
        hint = ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = " (set METERING_TOKEN or --token)" if not token else " (check METERING_TOKEN / --token)"
        elif code == grpc.StatusCode.PERMISSION_DENIED:
            hint = " (this token's role may not do that)"
        print(f"metering: {code.name}: {error.details()}{hint}", file=sys.stderr)
        return 1


def _whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`, else a usage error (not a traceback later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own --json must not reset one given before the subcommand.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument("--target", default=argparse.SUPPRESS, help="metering host:port (METERING_TARGET)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (METERING_TOKEN)")
    parser = argparse.ArgumentParser(prog="python -m metering.cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument("--target", default=None, help=f"metering host:port (METERING_TARGET, {DEFAULT_TARGET})")
    parser.add_argument(
        "--token", default=None, help="bearer token (default: METERING_TOKEN; the variable keeps it out of ps)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    stats = commands.add_parser("stats", parents=[common], help="export analytics, system-wide or narrowed")
    stats.add_argument("--user", default="", help="one user's stats")
    stats.add_argument("--project", default="", help="one project's stats")
    stats.add_argument(
        "--days", type=_whole(0, MAX_STATS_DAYS), default=30, help="window in days ending today (30)"
    )
    stats.set_defaults(run=_stats)

    near_limit = commands.add_parser(
        "near-limit", parents=[common], help="users near their daily limit today, most used first"
    )
    near_limit.add_argument("--user", default="", help="only this user")
    near_limit.add_argument("--project", default="", help="only users who exported in this project today")
    near_limit.set_defaults(run=_near_limit)

    usage = commands.add_parser("usage", parents=[common], help="a user's quota today")
    usage.add_argument("user")
    usage.set_defaults(run=_usage)

    history = commands.add_parser("history", parents=[common], help="a user's exports, newest first")
    history.add_argument("user")
    history.add_argument("--project", default=None, help="only this project")
    history.add_argument("--limit", type=_whole(1, 1_000_000), default=20, help="how many exports (20)")
    history.set_defaults(run=_history)

    set_tier = commands.add_parser("set-tier", parents=[common], help="move a user to another tier")
    set_tier.add_argument("user")
    set_tier.add_argument("tier")
    set_tier.set_defaults(run=_set_tier)

    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    archive = commands.add_parser(
        "archive",
        parents=[json_only],
        help="move old closed exports to the archive now (connects to DATABASE_URL, not to metering)",
    )
    archive.add_argument(
        "--older-than-days",
        type=_whole(1, MAX_RETENTION_DAYS),
        default=None,
        help="archive exports created and closed more than N days ago (METERING_RETENTION_DAYS, 90)",
    )
    archive.add_argument(
        "--batch-size", type=_whole(1, 100_000), default=None, help="exports moved per statement (1000)"
    )
    commands.add_parser(
        "rebuild-summaries",
        parents=[json_only],
        help="recompute the system-wide stats summaries from the rollups (after upgrading to migration 0003, "
        "or a bulk load); writers wait while it runs (connects to DATABASE_URL)",
    )
    return parser


def _print_json(message: object, out: TextIO) -> None:
    print(json.dumps(message, indent=2, sort_keys=True), file=out)


def _as_dict(message: object) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)  # type: ignore[arg-type]


# --- commands -----------------------------------------------------------------------------------------


def _stats(stub: metering_pb2_grpc.MeteringStub, args: argparse.Namespace, out: TextIO) -> int:
    answer = stub.GetStats(
        pb.GetStatsRequest(user_id=args.user, project_id=args.project, days=args.days),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    if args.json:
        _print_json(_as_dict(answer), out)
        return 0
    scope = " and ".join(
        part for part in (f"user {args.user}" if args.user else "", f"project {args.project}" if args.project else "")
        if part
    ) or "system-wide"
    days = len(answer.daily)
    print(f"Exports {scope}, {answer.window_start_date} .. {answer.window_end_date} ({days} days)", file=out)
    print(file=out)
    print(
        _table(
            ["exports", "completed", "failed", "cancelled", "expired", "in flight", "failure rate"],
            [[
                answer.total_exports, answer.completed, answer.failed, answer.cancelled, answer.expired,
                answer.in_flight, f"{answer.failure_rate:.1%}",
            ]],
        ),
        file=out,
    )
    print(file=out)
    print(
        _table(
            ["avg length", "total size", "p50 render", "p95 render", "favorite", "last export"],
            [[
                f"{answer.avg_duration_seconds:.1f} s", _size(answer.total_bytes),
                f"{answer.p50_render_seconds:.2f} s", f"{answer.p95_render_seconds:.2f} s",
                answer.favorite_format or "-", _when(answer.last_export_at),
            ]],
        ),
        file=out,
    )
    if answer.by_format or answer.by_render_mode:
        print(file=out)
        rows = [["format", name, count] for name, count in sorted(answer.by_format.items())]
        rows += [["render mode", name, count] for name, count in sorted(answer.by_render_mode.items())]
        print(_table(["by", "name", "exports"], rows), file=out)
    print(file=out)
    print("Daily exports", file=out)
    print(bar_chart([(day.date, day.exports) for day in answer.daily]), file=out)
    if answer.by_format:
        print(file=out)
        print("Daily exports by format", file=out)
        print(_daily_formats_table(answer), file=out)
    if answer.near_limit:
        print(file=out)
        print("Near their daily limit today", file=out)
        print(_near_limit_table(answer.near_limit), file=out)
    if answer.users:
        print(file=out)
        print("Busiest users", file=out)
        print(
            _table(
                ["user", "tier", "exports", "today", "favorite", "last export"],
                [
                    [
                        user.user_id, user.tier, user.total_exports,
                        f"{user.used_today}/{user.daily_limit}" if user.HasField("daily_limit") else user.used_today,
                        user.favorite_format or "-", _when(user.last_export_at),
                    ]
                    for user in answer.users
                ],
            ),
            file=out,
        )
    if answer.projects:
        print(file=out)
        print("Busiest projects", file=out)
        print(
            _table(
                ["project", "user", "exports", "last export"],
                [[p.project_id, p.user_id, p.export_count, _when(p.last_export_at)] for p in answer.projects],
            ),
            file=out,
        )
    return 0


def _daily_formats_table(answer: pb.GetStatsResponse) -> str:
    """One row a day, oldest first, one column per format seen in the window; today and yesterday named."""
    formats = sorted(answer.by_format)
    names = {answer.window_end_date: "today"}
    if len(answer.daily) > 1:
        names[answer.daily[-2].date] = "yesterday"
    rows = [
        [day.date, names.get(day.date, ""), *(day.by_format.get(name, 0) for name in formats), day.exports]
        for day in answer.daily
    ]
    return _table(["date", "", *formats, "total"], rows)


def _near_limit_table(users: Sequence[pb.UserStats]) -> str:
    return _table(
        ["user", "tier", "used today", "limit", "left"],
        [
            [user.user_id, user.tier, user.used_today, user.daily_limit, max(0, user.daily_limit - user.used_today)]
            for user in users
        ],
    )


def _near_limit(stub: metering_pb2_grpc.MeteringStub, args: argparse.Namespace, out: TextIO) -> int:
    answer = stub.GetStats(
        pb.GetStatsRequest(user_id=args.user, project_id=args.project, days=1), timeout=CALL_TIMEOUT_SECONDS
    )
    if args.json:
        _print_json([_as_dict(user) for user in answer.near_limit], out)
        return 0
    scope = ", ".join(
        part for part in (f"user {args.user}" if args.user else "", f"project {args.project}" if args.project else "")
        if part
    ) or "system-wide"
    if not answer.near_limit:
        print(f"Nobody is near their daily limit today ({answer.window_end_date}, {scope}).", file=out)
        return 0
    count = len(answer.near_limit)
    print(
        f"Near their daily limit today ({answer.window_end_date}, {scope}): {count} user{'s' if count > 1 else ''}"
        " with at most max(1, 20% of the limit) left",
        file=out,
    )
    print(_near_limit_table(answer.near_limit), file=out)
    return 0


def _usage(stub: metering_pb2_grpc.MeteringStub, args: argparse.Namespace, out: TextIO) -> int:
    usage = stub.GetUsage(pb.GetUsageRequest(user_id=args.user), timeout=CALL_TIMEOUT_SECONDS).usage
    if args.json:
        _print_json(_as_dict(usage), out)
        return 0
    limit = f"of {usage.limit} ({usage.remaining} left)" if usage.HasField("limit") else "(no daily limit)"
    longest = f"{usage.max_duration_seconds:g} s" if usage.HasField("max_duration_seconds") else "no limit"
    rows = [
        ["tier", usage.tier],
        ["used today", f"{usage.used} {limit}"],
        ["in flight", usage.in_flight],
        ["longest video", longest],
        ["resets at", _when(usage.resets_at)],
    ]
    print(f"User {usage.user_id}", file=out)
    print(_table(None, rows), file=out)
    return 0


def _history(stub: metering_pb2_grpc.MeteringStub, args: argparse.Namespace, out: TextIO) -> int:
    exports: list[pb.Export] = []
    token = ""
    while len(exports) < args.limit:
        request = pb.ListExportsRequest(
            user_id=args.user, page_size=min(args.limit - len(exports), 1000), page_token=token
        )
        if args.project is not None:
            request.project_id = args.project
        page = stub.ListExports(request, timeout=CALL_TIMEOUT_SECONDS)
        exports.extend(page.exports)
        token = page.next_page_token
        if not token:
            break
    if args.json:
        _print_json([_as_dict(export) for export in exports], out)
        return 0
    if not exports:
        print(f"No exports for {args.user}.", file=out)
        return 0
    print(
        _table(
            ["created", "project", "status", "format", "mode", "length", "size", "render", "export id"],
            [
                [
                    _when(e.created_at), e.project_id, _STATUS_NAMES.get(e.status, "?"), e.format,
                    _MODE_NAMES.get(e.render_mode, "?"),
                    f"{(e.duration_seconds or e.requested_duration_seconds):g} s",
                    _size(e.file_size_bytes) if e.file_size_bytes else "-",
                    f"{e.render_seconds:.1f} s" if e.render_seconds else "-",
                    e.export_id,
                ]
                for e in exports
            ],
        ),
        file=out,
    )
    failed = [e for e in exports if e.error]
    for export in failed[:5]:
        print(f"  {export.export_id}: {export.error.splitlines()[0][:120]}", file=out)
    return 0


def _set_tier(stub: metering_pb2_grpc.MeteringStub, args: argparse.Namespace, out: TextIO) -> int:
    account = stub.SetAccountTier(
        pb.SetAccountTierRequest(user_id=args.user, tier=args.tier), timeout=CALL_TIMEOUT_SECONDS
    ).account
    if args.json:
        _print_json(_as_dict(account), out)
        return 0
    print(f"{account.user_id} is now on the {account.tier} tier.", file=out)
    return 0


def _archive(args: argparse.Namespace, out: TextIO) -> int:
    from metering import archive, config, db

    try:
        days = config.retention_days(os.environ) if args.older_than_days is None else args.older_than_days
    except config.ConfigError as error:
        print(f"metering: {error}", file=sys.stderr)
        return 2
    if days < 1:  # only METERING_RETENTION_DAYS=0 gets here: the option's type refuses it
        print("metering: METERING_RETENTION_DAYS=0 means never; pass --older-than-days N", file=sys.stderr)
        return 2
    batch_size = args.batch_size if args.batch_size is not None else archive.DEFAULT_BATCH_SIZE
    database_url = os.environ.get("DATABASE_URL") or _embedded_database_url()
    now = datetime.now(UTC)

    async def run() -> archive.ArchiveReport:
        pool = await db.create_pool(database_url, size=1, connect_timeout=10, command_timeout=300)
        try:
            return await archive.archive_closed(
                db.Database(pool), cutoff=now - timedelta(days=days), archived_at=now, batch_size=batch_size
            )
        finally:
            await pool.close()

    try:
        report = _on_the_database(run(), lacking="export archive", doing="archiving")
    except _MaintenanceFailed as failed:
        print(f"metering: {failed}", file=sys.stderr)
        return failed.exit_code
    if args.json:
        _print_json(
            {"cutoff": report.cutoff.isoformat(), "moved": report.moved, "by_partition": report.by_partition}, out
        )
        return 0
    cutoff = report.cutoff.strftime("%Y-%m-%d %H:%M:%S UTC")
    if not report.moved:
        print(f"Nothing to archive: no closed export was created and closed before {cutoff}.", file=out)
        return 0
    print(f"Archived {report.moved} exports created and closed before {cutoff} ({days} days ago):", file=out)
    print(_table(["partition", "exports"], [[name, count] for name, count in report.by_partition.items()]), file=out)
    return 0


class _MaintenanceFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _on_the_database(work: Coroutine[Any, Any, T], *, lacking: str, doing: str) -> T:
    """Runs a maintenance command's work; its failures as one line for the operator and an exit code."""
    from metering import db

    try:
        with db.unavailable_on_connection_errors():
            return asyncio.run(work)
    except errors.Unavailable as error:
        raise _MaintenanceFailed(f"cannot reach the database ({error.message})", 3) from error
    except ValueError as error:  # asyncpg parsing DATABASE_URL (its ClientConfigurationError is one too)
        raise _MaintenanceFailed(f"DATABASE_URL is not a PostgreSQL URL asyncpg can use: {error}", 2) from error
    except (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.UndefinedFunctionError) as error:
        raise _MaintenanceFailed(
            f"this database has no {lacking} yet; start a metering server of this version once "
            "(it applies the migrations)",
            1,
        ) from error
    except asyncpg.PostgresError as error:
        raise _MaintenanceFailed(f"{doing} stopped: {error}", 1) from error


def _rebuild_summaries(args: argparse.Namespace, out: TextIO) -> int:
    database_url = os.environ.get("DATABASE_URL") or _embedded_database_url()
    tables = ("system_rollups", "system_render_time_histogram", "export_counters", "export_counter_history")

    async def run() -> dict[str, int]:
        connection = await asyncpg.connect(database_url, timeout=10, command_timeout=3600)
        try:
            async with connection.transaction():
                await connection.execute("SELECT rebuild_export_summaries()")
            return {table: int(await connection.fetchval(f"SELECT count(*) FROM {table}")) for table in tables}
        finally:
            await connection.close()

    started = datetime.now(UTC)
    try:
        rows = _on_the_database(run(), lacking="system summaries", doing="rebuilding")
    except _MaintenanceFailed as failed:
        print(f"metering: {failed}", file=sys.stderr)
        return failed.exit_code
    seconds = (datetime.now(UTC) - started).total_seconds()
    if args.json:
        _print_json({"rows": rows, "seconds": round(seconds, 3)}, out)
        return 0
    print(f"Rebuilt the system-wide summaries from the rollups in {seconds:.1f} s:", file=out)
    print(_table(["table", "rows"], [[table, count] for table, count in rows.items()]), file=out)
    return 0


def _embedded_database_url() -> str:
    """The embedded PostgreSQL of `python -m metering` (joined when running, started when not)."""
    from pathlib import Path

    from metering.__main__ import EMBEDDED_DATABASE
    from metering.config import REPO_ROOT
    from metering.embedded_pg import start_embedded_postgres, with_database

    data_dir = Path(os.environ.get("METERING_DATA_DIR") or REPO_ROOT / ".data")
    return with_database(start_embedded_postgres(data_dir), EMBEDDED_DATABASE)


# --- formatting ---------------------------------------------------------------------------------------


def _when(moment: Timestamp) -> str:
    if not moment.seconds and not moment.nanos:
        return "-"
    return moment.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _table(headers: list[str] | None, rows: list[list[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    lines = ([headers] if headers else []) + cells
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    rendered = []
    for index, line in enumerate(lines):
        parts = [
            cell.rjust(width) if headers and index and _numeric(cell) else cell.ljust(width)
            for cell, width in zip(line, widths, strict=True)
        ]
        rendered.append("  " + "  ".join(parts).rstrip())
        if headers and index == 0:
            rendered.append("  " + "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("/", "", 1).replace("%", "").isdigit()


def bar_chart(points: list[tuple[str, int]], width: int = BAR_WIDTH) -> str:
    """One line a day: the date, a bar scaled to the busiest day, the count."""
    if not points:
        return "  (no days)"
    peak = max(count for _, count in points)
    lines = []
    for label, count in points:
        length = 0 if peak == 0 else round(count / peak * width)
        if count and not length:
            length = 1  # a day with exports never looks empty
        lines.append(f"  {label} │{'█' * length}{' ' * (width - length)} {count}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
