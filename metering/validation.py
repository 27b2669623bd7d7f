"""Input validation: every value a caller sends is checked here before it reaches SQL.

Each failure is an `InvalidArgument` naming the proto field.
"""

from __future__ import annotations

import math
import re

from metering import errors
from metering.domain import (
    OUTCOMES,
    CompleteRequest,
    NewExport,
    OutputFormat,
    ReserveRequest,
    StatsRequest,
)

MAX_ID_LENGTH = 128
MAX_DIGEST_LENGTH = 128
MAX_URI_LENGTH = 2048
MAX_ERROR_BYTES = 4096
MAX_DURATION_SECONDS = 24 * 3600.0  # a sanity bound on any video; tiers cap far lower
MAX_RENDER_SECONDS = 7 * 24 * 3600.0
# 1 TiB: far above any video file, and low enough that the byte sums of rollups and summaries (bigint) cannot
# overflow; one oversized report would otherwise break every later Complete, GetStats and compaction of its rows.
MAX_FILE_SIZE_BYTES = 1 << 40
MIN_SIDE, MAX_SIDE = 1, 8192
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
DEFAULT_STATS_DAYS = 30
MAX_STATS_DAYS = 3660

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_RESOLUTION = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})\Z")  # \Z: `$` would let a trailing newline through
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def identifier(field: str, value: str) -> str:
    if not value or not value.strip():
        raise errors.InvalidArgument(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise errors.InvalidArgument(field, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise errors.InvalidArgument(field, "must not contain control characters")
    return value


def optional_identifier(field: str, value: str | None) -> str | None:
    return None if value is None else identifier(field, value)


def export_id(value: str) -> str:
    if not value:
        raise errors.InvalidArgument("export_id", "must not be empty")
    normalized = value.strip().lower()
    if not _UUID.match(normalized):
        raise errors.InvalidArgument("export_id", "is not an export id (a UUID from CheckAndReserve)")
    return normalized


def new_export(request: ReserveRequest) -> NewExport:
    idempotency_key = identifier("idempotency_key", request.idempotency_key)
    user_id = identifier("user_id", request.user_id)
    project_id = identifier("project_id", request.project_id)
    if request.render_mode is None:
        raise errors.InvalidArgument("render_mode", "must be RENDER_MODE_LOCAL or RENDER_MODE_LAMBDA")
    try:
        output_format = OutputFormat(request.format)
    except ValueError:
        shown = request.format[:32]
        raise errors.InvalidArgument(
            "format", f"unknown format {shown!r} (one of mp4, webm, gif)"
        ) from None
    duration = request.duration_seconds
    if not math.isfinite(duration) or duration <= 0:
        raise errors.InvalidArgument("duration_seconds", f"must be a finite number > 0, got {duration!r}")
    if duration > MAX_DURATION_SECONDS:
        raise errors.InvalidArgument("duration_seconds", f"must be at most {MAX_DURATION_SECONDS:g} s")
    return NewExport(
        idempotency_key=idempotency_key,
        user_id=user_id,
        project_id=project_id,
        render_mode=request.render_mode,
        format=output_format,
        duration_seconds=float(duration),
        resolution=resolution(request.resolution),
        request_digest=request_digest(request.request_digest),
    )


def request_digest(value: str) -> str:
    """The caller's digest of the rest of its request: optional (empty), else short printable ASCII."""
    if len(value) > MAX_DIGEST_LENGTH:
        raise errors.InvalidArgument(
            "request_digest", f"must be at most {MAX_DIGEST_LENGTH} characters, got {len(value)}"
        )
    if not _PRINTABLE_ASCII.fullmatch(value):
        raise errors.InvalidArgument("request_digest", "must be printable ASCII")
    return value


def resolution(value: str) -> str:
    match = _RESOLUTION.match(value)
    if not match:
        shown = value[:32]
        raise errors.InvalidArgument("resolution", f"must be WIDTHxHEIGHT like 1920x1080, got {shown!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise errors.InvalidArgument("resolution", f"each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
    return f"{width}x{height}"


def complete(request: CompleteRequest) -> CompleteRequest:
    """Checks a Complete and returns it with its export id normalized and its error text bounded."""
    checked_id = export_id(request.export_id)
    if request.outcome not in OUTCOMES:
        raise errors.InvalidArgument(
            "outcome",
            "must be EXPORT_STATUS_COMPLETED, EXPORT_STATUS_FAILED or EXPORT_STATUS_CANCELLED",
        )
    if not 0 <= request.file_size_bytes <= MAX_FILE_SIZE_BYTES:
        raise errors.InvalidArgument("file_size_bytes", f"must be from 0 to {MAX_FILE_SIZE_BYTES} (1 TiB)")
    for field, value, bound in (
        ("duration_seconds", request.duration_seconds, MAX_DURATION_SECONDS),
        ("render_seconds", request.render_seconds, MAX_RENDER_SECONDS),
    ):
        if not math.isfinite(value) or value < 0:
            raise errors.InvalidArgument(field, f"must be a finite number >= 0, got {value!r}")
        if value > bound:
            raise errors.InvalidArgument(field, f"must be at most {bound:g} s")
    if len(request.output_uri) > MAX_URI_LENGTH:
        raise errors.InvalidArgument("output_uri", f"must be at most {MAX_URI_LENGTH} characters")
    if _CONTROL.search(request.output_uri):
        raise errors.InvalidArgument("output_uri", "must not contain control characters")
    return CompleteRequest(
        export_id=checked_id,
        outcome=request.outcome,
        error=bounded_error_text(request.error),
        file_size_bytes=request.file_size_bytes,
        duration_seconds=request.duration_seconds,
        output_uri=request.output_uri,
        render_seconds=request.render_seconds,
    )


def bounded_error_text(text: str) -> str:
    """Keeps at most MAX_ERROR_BYTES of UTF-8, cut on a character boundary; NUL cannot be stored."""
    text = text.replace("\x00", "")
    encoded = text.encode("utf-8")
    if len(encoded) <= MAX_ERROR_BYTES:
        return text
    return encoded[:MAX_ERROR_BYTES].decode("utf-8", errors="ignore")


def page_size(value: int) -> int:
    if value < 0:
        raise errors.InvalidArgument("page_size", "must be >= 0 (0 means the default, 50)")
    if value > MAX_PAGE_SIZE:
        raise errors.InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def stats_request(request: StatsRequest) -> StatsRequest:
    days = request.days
    if days < 0:
        raise errors.InvalidArgument("days", "must be >= 0 (0 means 30)")
    if days > MAX_STATS_DAYS:
        raise errors.InvalidArgument("days", f"must be at most {MAX_STATS_DAYS}")
    return StatsRequest(
        user_id=optional_identifier("user_id", request.user_id),
        project_id=optional_identifier("project_id", request.project_id),
        days=days or DEFAULT_STATS_DAYS,
    )


def tier_name(value: str, known: list[str]) -> str:
    if not value:
        raise errors.InvalidArgument("tier", f"must not be empty (one of {', '.join(known)})")
    if value not in known:
        raise errors.InvalidArgument("tier", f"unknown tier {value[:32]!r} (one of {', '.join(known)})")
    return value

