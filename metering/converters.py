"""Protobuf <-> domain values. No rules here: validation lives in the core (metering.validation)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from exportapi.metering.v1 import metering_pb2 as pb
from metering.domain import (
    OUTCOMES,
    Account,
    CompleteRequest,
    Export,
    ExportPage,
    ExportStatus,
    ListExportsRequest,
    RenderMode,
    ReserveRequest,
    ReserveResult,
    Stats,
    StatsRequest,
    Usage,
    UserStats,
)

_STATUS_TO_PROTO = {
    ExportStatus.RESERVED: pb.EXPORT_STATUS_RESERVED,
    ExportStatus.COMPLETED: pb.EXPORT_STATUS_COMPLETED,
    ExportStatus.FAILED: pb.EXPORT_STATUS_FAILED,
    ExportStatus.CANCELLED: pb.EXPORT_STATUS_CANCELLED,
    ExportStatus.EXPIRED: pb.EXPORT_STATUS_EXPIRED,
}
_STATUS_FROM_PROTO = {number: status for status, number in _STATUS_TO_PROTO.items()}
_MODE_TO_PROTO = {RenderMode.LOCAL: pb.RENDER_MODE_LOCAL, RenderMode.LAMBDA: pb.RENDER_MODE_LAMBDA}
_MODE_FROM_PROTO = {number: mode for mode, number in _MODE_TO_PROTO.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)  # a naive datetime is UTC, as Timestamp.FromDatetime takes it


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    # What FromDatetime computes, without its generic path (a third of the time).
    since = moment - (_NAIVE_EPOCH if moment.tzinfo is None else _EPOCH)
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


# --- requests -------------------------------------------------------------------------------------------


def reserve_request(request: pb.CheckAndReserveRequest) -> ReserveRequest:
    return ReserveRequest(
        idempotency_key=request.idempotency_key,
        user_id=request.user_id,
        project_id=request.project_id,
        render_mode=_MODE_FROM_PROTO.get(request.render_mode),
        format=request.format,
        duration_seconds=request.duration_seconds,
        resolution=request.resolution,
        request_digest=request.request_digest,
    )


def complete_request(request: pb.CompleteRequest) -> CompleteRequest:
    outcome = _STATUS_FROM_PROTO.get(request.outcome)
    return CompleteRequest(
        export_id=request.export_id,
        outcome=outcome if outcome in OUTCOMES else None,
        error=request.error,
        file_size_bytes=request.file_size_bytes,
        duration_seconds=request.duration_seconds,
        output_uri=request.output_uri,
        render_seconds=request.render_seconds,
    )


def list_exports_request(request: pb.ListExportsRequest) -> ListExportsRequest:
    return ListExportsRequest(
        user_id=request.user_id,
        project_id=request.project_id if request.HasField("project_id") else None,
        page_size=request.page_size,
        page_token=request.page_token,
    )


def stats_request(request: pb.GetStatsRequest) -> StatsRequest:
    return StatsRequest(user_id=request.user_id or None, project_id=request.project_id or None, days=request.days)


# --- responses ------------------------------------------------------------------------------------------


def export(value: Export) -> pb.Export:
    return pb.Export(
        export_id=value.export_id,
        user_id=value.user_id,
        project_id=value.project_id,
        idempotency_key=value.idempotency_key,
        status=_STATUS_TO_PROTO[value.status],
        render_mode=_MODE_TO_PROTO[value.render_mode],
        format=value.format.value,
        resolution=value.resolution,
        requested_duration_seconds=value.requested_duration_seconds,
        duration_seconds=value.duration_seconds or 0.0,
        file_size_bytes=value.file_size_bytes or 0,
        output_uri=value.output_uri or "",
        render_seconds=value.render_seconds or 0.0,
        error=value.error or "",
        created_at=timestamp(value.created_at),
        completed_at=timestamp(value.completed_at),
        lease_expires_at=timestamp(value.lease_expires_at),
    )


def usage(value: Usage) -> pb.Usage:
    return pb.Usage(
        user_id=value.user_id,
        tier=value.tier,
        used=value.used,
        limit=value.limit,
        in_flight=value.in_flight,
        resets_at=timestamp(value.resets_at),
        max_duration_seconds=value.max_duration_seconds,
        remaining=value.remaining,
    )


def reserve_response(result: ReserveResult) -> pb.CheckAndReserveResponse:
    return pb.CheckAndReserveResponse(
        export_id=result.export.export_id,
        lease_expires_at=timestamp(result.export.lease_expires_at),
        usage=usage(result.usage),
        export=export(result.export),
        replayed=result.replayed,
    )


def list_exports_response(page: ExportPage) -> pb.ListExportsResponse:
    return pb.ListExportsResponse(
        exports=[export(item) for item in page.exports], next_page_token=page.next_page_token
    )


def stats_response(value: Stats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        total_exports=value.total_exports,
        completed=value.completed,
        failed=value.failed,
        cancelled=value.cancelled,
        expired=value.expired,
        in_flight=value.in_flight,
        last_export_at=timestamp(value.last_export_at),
        favorite_format=value.favorite_format,
        avg_duration_seconds=value.avg_duration_seconds,
        total_bytes=value.total_bytes,
        daily=[
            pb.DailyStats(
                date=day.date.isoformat(),
                exports=day.exports,
                completed=day.completed,
                failed=day.failed,
                cancelled=day.cancelled,
                expired=day.expired,
                avg_duration_seconds=day.avg_duration_seconds,
                by_format=day.by_format,
            )
            for day in value.daily
        ],
        by_format=value.by_format,
        by_render_mode=value.by_render_mode,
        failure_rate=value.failure_rate,
        p50_render_seconds=value.p50_render_seconds,
        p95_render_seconds=value.p95_render_seconds,
        users=[user_stats(user) for user in value.users],
        projects=[
            pb.ProjectStats(
                project_id=project.project_id,
                user_id=project.user_id,
                export_count=project.export_count,
                last_export_at=timestamp(project.last_export_at),
            )
            for project in value.projects
        ],
        window_start_date=value.window_start.isoformat(),
        window_end_date=value.window_end.isoformat(),
        near_limit=[user_stats(user) for user in value.near_limit],
    )


def user_stats(value: UserStats) -> pb.UserStats:
    return pb.UserStats(
        user_id=value.user_id,
        total_exports=value.total_exports,
        last_export_at=timestamp(value.last_export_at),
        favorite_format=value.favorite_format,
        tier=value.tier,
        used_today=value.used_today,
        daily_limit=value.daily_limit,
    )


def account(value: Account) -> pb.Account:
    return pb.Account(
        user_id=value.user_id,
        tier=value.tier,
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
    )
