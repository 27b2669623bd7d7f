"""Domain errors of the metering core.

The core raises these and knows nothing of gRPC; `metering.interceptors` maps each class to a status code
(and its google.rpc details) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


class MeteringError(Exception):
    """Base class: every failure a caller can be told about."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeteringError):
    """Something the caller sent is malformed. `field` names it (proto field name)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(MeteringError):
    pass


class AlreadyExists(MeteringError):
    pass


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


class FailedPrecondition(MeteringError):
    """The request is well formed but the system is not in a state that allows it."""

    def __init__(self, message: str, violations: tuple[PreconditionViolation, ...] = ()) -> None:
        super().__init__(message)
        self.violations = violations


class DurationTooLong(FailedPrecondition):
    """The video is longer than the user's tier allows. Retrying later does not help."""

    def __init__(self, *, user_id: str, tier: str, requested_seconds: float, max_seconds: float) -> None:
        message = (
            f"Video too long ({requested_seconds:g} s; the {tier} tier allows at most {max_seconds:g} s)"
        )
        super().__init__(
            message,
            (PreconditionViolation("TIER_MAX_DURATION", f"user:{user_id}", message),),
        )
        self.tier = tier
        self.requested_seconds = requested_seconds
        self.max_seconds = max_seconds


class QuotaExceeded(MeteringError):
    """A daily export limit is reached. `scope` is "user" or "project"; retry after `resets_at`."""

    def __init__(
        self,
        *,
        scope: str,
        subject_id: str,
        tier: str,
        limit: int,
        used: int,
        resets_at: datetime,
        retry_after_seconds: float,
    ) -> None:
        if scope == "project":
            message = f"Daily export limit reached for project {subject_id} ({limit} for {tier} tier)"
        else:
            message = f"Daily export limit reached ({limit} for {tier} tier)"
        super().__init__(message)
        self.scope = scope
        self.subject_id = subject_id
        self.tier = tier
        self.limit = limit
        self.used = used
        self.resets_at = resets_at
        self.retry_after_seconds = retry_after_seconds


class Unavailable(MeteringError):
    """The database cannot be reached (or did not answer in time); the caller may retry."""
