"""Plain values of the metering domain: what the core takes and returns. No gRPC, no SQL."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from datetime import date, datetime


class ExportStatus(enum.StrEnum):
    RESERVED = "RESERVED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def holds_slot(self) -> bool:
        """RESERVED and COMPLETED exports count against the day's limit; the others gave their slot back."""
        return self in (ExportStatus.RESERVED, ExportStatus.COMPLETED)


# The outcomes a Complete may report.
OUTCOMES = (ExportStatus.COMPLETED, ExportStatus.FAILED, ExportStatus.CANCELLED)


class RenderMode(enum.StrEnum):
    LOCAL = "local"
    LAMBDA = "lambda"


class OutputFormat(enum.StrEnum):
    MP4 = "mp4"
    WEBM = "webm"
    GIF = "gif"


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """CheckAndReserve as the caller sent it; `metering.validation` turns it into a `NewExport`."""

    idempotency_key: str
    user_id: str
    project_id: str
    render_mode: RenderMode | None  # None: unspecified or a value this build does not know
    format: str
    duration_seconds: float
    resolution: str
    request_digest: str = ""  # the caller's digest of the rest of its request; empty: none


@dataclass(frozen=True, slots=True)
class NewExport:
    """A validated reservation request."""

    idempotency_key: str
    user_id: str
    project_id: str
    render_mode: RenderMode
    format: OutputFormat
    duration_seconds: float
    resolution: str
    request_digest: str = ""

    def fingerprint(self) -> str:
        """Identifies the request behind an idempotency key: same key + same fingerprint is a replay.

        The caller's `request_digest` counts only when it sent one, so a request without it has the
        fingerprint it always had (the rows written before the digest existed still replay)."""
        fields = [
            self.user_id,
            self.project_id,
            self.render_mode.value,
            self.format.value,
            repr(float(self.duration_seconds)),
            self.resolution,
        ]
        if self.request_digest:
            fields.append(self.request_digest)
        canonical = json.dumps(fields, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Export:
    """One row of the ledger."""

    export_id: str
    user_id: str
    project_id: str
    idempotency_key: str
    status: ExportStatus
    render_mode: RenderMode
    format: OutputFormat
    resolution: str
    requested_duration_seconds: float
    created_at: datetime
    lease_expires_at: datetime
    usage_day: date
    duration_seconds: float | None = None
    file_size_bytes: int | None = None
    output_uri: str | None = None
    render_seconds: float | None = None
    error: str | None = None
    completed_at: datetime | None = None
    expired_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    user_id: str
    tier: str
    used: int
    limit: int | None
    in_flight: int
    resets_at: datetime
    max_duration_seconds: float | None

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class ReserveResult:
    export: Export
    usage: Usage
    replayed: bool


@dataclass(frozen=True, slots=True)
class CompleteRequest:
    export_id: str
    outcome: ExportStatus | None  # None: not one of the outcomes
    error: str
    file_size_bytes: int
    duration_seconds: float
    output_uri: str
    render_seconds: float


@dataclass(frozen=True, slots=True)
class ListExportsRequest:
    user_id: str
    project_id: str | None
    page_size: int
    page_token: str


@dataclass(frozen=True, slots=True)
class ExportPage:
    exports: tuple[Export, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class StatsRequest:
    user_id: str | None
    project_id: str | None
    days: int


@dataclass(frozen=True, slots=True)
class DailyStats:
    date: date
    exports: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    avg_duration_seconds: float = 0.0
    by_format: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UserStats:
    user_id: str
    total_exports: int
    last_export_at: datetime | None
    favorite_format: str
    tier: str
    used_today: int
    daily_limit: int | None


@dataclass(frozen=True, slots=True)
class ProjectStats:
    project_id: str
    user_id: str
    export_count: int
    last_export_at: datetime | None


@dataclass(frozen=True, slots=True)
class Stats:
    window_start: date
    window_end: date
    total_exports: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    in_flight: int = 0
    last_export_at: datetime | None = None
    favorite_format: str = ""
    avg_duration_seconds: float = 0.0
    total_bytes: int = 0
    daily: tuple[DailyStats, ...] = ()
    by_format: dict[str, int] = field(default_factory=dict)
    by_render_mode: dict[str, int] = field(default_factory=dict)
    failure_rate: float = 0.0
    p50_render_seconds: float = 0.0
    p95_render_seconds: float = 0.0
    users: tuple[UserStats, ...] = ()
    projects: tuple[ProjectStats, ...] = ()
    # Users near their daily limit today, most used first (see stats.near_limit_from).
    near_limit: tuple[UserStats, ...] = ()


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    tier: str
    created_at: datetime
    updated_at: datetime
