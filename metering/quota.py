"""Pure quota decisions: which day a moment belongs to, when it resets, and whether a reservation fits.

No I/O. The clock is injected so tests can stand at any moment (e.g. one microsecond before midnight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from metering import errors
from metering.tiers import Tier

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class DayWindow:
    """The quota day a moment falls in: `day` in the configured zone, starting at `starts_at`."""

    day: date
    starts_at: datetime
    resets_at: datetime


class QuotaPolicy:
    """Decides reservations against a tier. Days are calendar days in `zone` (UTC unless configured)."""

    def __init__(self, clock: Clock = system_clock, zone: tzinfo = UTC) -> None:
        self._clock = clock
        self.zone = zone

    def now(self) -> datetime:
        moment = self._clock()
        if moment.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        return moment.astimezone(UTC)

    def day_of(self, moment: datetime) -> date:
        return moment.astimezone(self.zone).date()

    def window(self, moment: datetime | None = None) -> DayWindow:
        moment = self.now() if moment is None else moment
        day = self.day_of(moment)
        return DayWindow(day, self.start_of(day), self.start_of(day + timedelta(days=1)))

    def start_of(self, day: date) -> datetime:
        # Local midnight; zoneinfo picks the right offset even on days when clocks change.
        return datetime.combine(day, time(0), tzinfo=self.zone).astimezone(UTC)

    def check(
        self,
        tier: Tier,
        *,
        user_id: str,
        project_id: str,
        duration_seconds: float,
        used_today: int,
        project_used_today: int,
        moment: datetime,
    ) -> None:
        """Raise the domain error that refuses this reservation, or return when it fits.

        The video length is checked first: a retry tomorrow would not help it, so it must not be
        answered with a RetryInfo.
        """
        if tier.max_duration_seconds is not None and duration_seconds > tier.max_duration_seconds:
            raise errors.DurationTooLong(
                user_id=user_id,
                tier=tier.name,
                requested_seconds=duration_seconds,
                max_seconds=tier.max_duration_seconds,
            )
        window = self.window(moment)
        retry_after = max((window.resets_at - moment).total_seconds(), 0.0)
        if tier.daily_limit is not None and used_today >= tier.daily_limit:
            raise errors.QuotaExceeded(
                scope="user",
                subject_id=user_id,
                tier=tier.name,
                limit=tier.daily_limit,
                used=used_today,
                resets_at=window.resets_at,
                retry_after_seconds=retry_after,
            )
        if tier.project_daily_limit is not None and project_used_today >= tier.project_daily_limit:
            raise errors.QuotaExceeded(
                scope="project",
                subject_id=project_id,
                tier=tier.name,
                limit=tier.project_daily_limit,
                used=project_used_today,
                resets_at=window.resets_at,
                retry_after_seconds=retry_after,
            )
