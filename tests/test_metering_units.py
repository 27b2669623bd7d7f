"""The pure parts of metering, without a database: quota decisions on an injected clock, tiers files,
page tokens, percentiles, named SQL, and the error -> status mapping."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from google.rpc import code_pb2, error_details_pb2

from metering import errors, pagination, stats, validation
from metering.interceptors import status_for
from metering.quota import QuotaPolicy
from metering.sql import Queries
from metering.tiers import Tier, TierConfigError, TierTable
from tests.support.metering import FakeClock

FREE = Tier("free", daily_limit=3, max_duration_seconds=30.0)


def check(policy: QuotaPolicy, tier: Tier, *, used: int = 0, project_used: int = 0, seconds: float = 10) -> None:
    policy.check(
        tier, user_id="u", project_id="p", duration_seconds=seconds, used_today=used,
        project_used_today=project_used, moment=policy.now(),
    )


def test_the_daily_limit_and_the_longest_video_are_decided_together() -> None:
    clock = FakeClock(datetime(2030, 1, 1, 18, 0, tzinfo=UTC))
    policy = QuotaPolicy(clock)
    check(policy, FREE, used=2, seconds=30)
    with pytest.raises(errors.QuotaExceeded) as full:
        check(policy, FREE, used=3)
    assert full.value.retry_after_seconds == 6 * 3600
    assert full.value.resets_at == datetime(2030, 1, 2, tzinfo=UTC)
    assert full.value.message == "Daily export limit reached (3 for free tier)"
    # Too long AND over the limit: the length wins, since waiting for tomorrow would not help.
    with pytest.raises(errors.DurationTooLong):
        check(policy, FREE, used=3, seconds=30.01)
    check(policy, Tier("unlimited"), used=10**9, seconds=10**5)


def test_the_per_project_cap_is_refused_like_the_daily_limit() -> None:
    policy = QuotaPolicy(FakeClock(datetime(2030, 1, 1, 23, 59, 59, tzinfo=UTC)))
    capped = Tier("free", daily_limit=10, project_daily_limit=2)
    check(policy, capped, used=5, project_used=1)
    with pytest.raises(errors.QuotaExceeded) as full:
        check(policy, capped, used=5, project_used=2)
    assert (full.value.scope, full.value.subject_id, full.value.limit) == ("project", "p", 2)
    assert full.value.retry_after_seconds == 1


def test_a_configured_day_zone_moves_midnight_including_on_clock_change_days() -> None:
    zone = ZoneInfo("Europe/Berlin")
    # 2030-03-31 is a DST day in Berlin: the local day is 23 hours long.
    policy = QuotaPolicy(FakeClock(datetime(2030, 3, 30, 23, 30, tzinfo=UTC)), zone)
    window = policy.window()
    assert window.day == date(2030, 3, 31)
    assert window.starts_at == datetime(2030, 3, 30, 23, 0, tzinfo=UTC)
    assert window.resets_at == datetime(2030, 3, 31, 22, 0, tzinfo=UTC)
    assert QuotaPolicy(FakeClock(datetime(2030, 3, 30, 22, 59, tzinfo=UTC)), zone).window().day == date(2030, 3, 30)


def test_a_clock_without_a_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        QuotaPolicy(lambda: datetime(2030, 1, 1)).now()


def test_tiers_files_override_and_add_tiers(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        "[tiers.free]\ndaily_limit = 5\nproject_daily_limit = 10\n[tiers.studio]\nmax_duration_seconds = 600\n"
    )
    tiers = TierTable.load(path)
    assert tiers["free"] == Tier("free", daily_limit=5, project_daily_limit=10)  # replaced whole: no length cap
    assert tiers["pro"] == Tier("pro", daily_limit=50, max_duration_seconds=120.0)
    assert tiers["studio"] == Tier("studio", max_duration_seconds=600.0)
    assert tiers.resolve("gone-from-config") == tiers.default == tiers["free"]
    assert TierTable.load(None) == TierTable.built_in()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tiers.free]\ndaily_limit = -1\n", "daily_limit must be a whole number"),
        ("[tiers.free]\ndaily_limit = 2.5\n", "daily_limit must be a whole number"),
        ("[tiers.free]\nmax_duration_seconds = 0\n", "max_duration_seconds must be a number > 0"),
        ("[tiers.free]\nmax_duration_seconds = nan\n", "max_duration_seconds must be a number > 0"),
        ("[tiers.free]\ndialy_limit = 3\n", "unknown keys ['dialy_limit']"),
        ("[tiers.\"Bad Name\"]\n", "a tier name is"),
        ("[tiers.\"pro\\n\"]\n", "a tier name is"),  # a trailing newline, as `$` in a pattern would allow
        # Above what PostgreSQL's bigint and protobuf's int64 carry: every reservation would fail, not start-up.
        ("[tiers.free]\ndaily_limit = 99999999999999999999\n", "daily_limit must be a whole number from 0 to 2**62"),
        ("[tiers.free]\nproject_daily_limit = 9223372036854775807\n", "project_daily_limit must be a whole number"),
        ("tiers = 3\n", "[tiers] must be a table"),
        ("[plans.free]\n", "unknown top-level keys"),
        ("[tiers.free\n", "not valid TOML"),
    ],
)
def test_bad_tiers_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    with pytest.raises(TierConfigError) as refused:
        TierTable.load(path)
    assert message in str(refused.value) and str(path) in str(refused.value)


def test_error_text_is_cut_on_a_character_boundary() -> None:
    assert validation.bounded_error_text("a" * 4096) == "a" * 4096
    assert validation.bounded_error_text("a" * 4095 + "€") == "a" * 4095  # 3 bytes would not fit
    assert validation.bounded_error_text("x\x00y") == "xy"


def _forged(**fields: object) -> str:
    """A page token built by hand, with the filter tag of user "u" and no project."""
    payload = {"v": 1, **fields, "f": pagination._filter_tag("u", None)}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_page_tokens_round_trip_and_refuse_tampering() -> None:
    cursor = pagination.Cursor(datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC), uuid.uuid4())
    token = pagination.encode(cursor, user_id="u", project_id=None)
    assert pagination.decode(token, user_id="u", project_id=None) == cursor
    assert pagination.decode("", user_id="u", project_id=None).created_at.year == 9999
    for bad, user, project in [
        (token, "other", None),
        (token, "u", "p"),
        (token[:-3], "u", None),
        (token + "x" * 600, "u", None),
        ("eyJ2IjoyfQ", "u", None),  # {"v":2}
        # Built by hand with the right filter tag (it is not a secret): fields of the wrong type, or a moment
        # that exists only in its own time zone (year 1 at +01:00, year 9999 at -01:00 are out of range in UTC).
        (_forged(t=cursor.created_at.isoformat(), id=123), "u", None),
        (_forged(t=cursor.created_at.isoformat(), id=[str(cursor.export_id)]), "u", None),
        (_forged(t=1893456000, id=str(cursor.export_id)), "u", None),
        (_forged(t="0001-01-01T00:00:00+01:00", id=str(cursor.export_id)), "u", None),
        (_forged(t="9999-12-31T23:59:59-01:00", id=str(cursor.export_id)), "u", None),
        (_forged(t="2030-01-01T00:00:00", id=str(cursor.export_id)), "u", None),  # no time zone
    ]:
        with pytest.raises(errors.InvalidArgument) as refused:
            pagination.decode(bad, user_id=user, project_id=project)
        assert refused.value.field == "page_token"


def test_render_time_percentiles_are_within_one_percent() -> None:
    values = [0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 120.0]
    histogram: dict[int, int] = {}
    for value in values:
        bucket = stats.render_time_bucket(value)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    pairs = sorted(histogram.items())
    assert stats.percentile(pairs, 0.5) == pytest.approx(2.0, rel=0.01)  # nearest rank: 5th of 10
    assert stats.percentile(pairs, 0.95) == pytest.approx(120.0, rel=0.01)
    assert stats.percentile(pairs, 0.1) == pytest.approx(0.2, rel=0.01)
    assert stats.percentile([], 0.5) == 0.0
    for value in (0.0011, 0.37, 1.0, 59.9, 86_400.0):
        assert stats.bucket_value(stats.render_time_bucket(value)) == pytest.approx(value, rel=0.0101)


def test_the_stats_window_runs_oldest_first_and_ends_today() -> None:
    assert stats.window(date(2030, 3, 2), 3) == [date(2030, 2, 28), date(2030, 3, 1), date(2030, 3, 2)]


def test_named_sql_is_parsed_by_header_and_duplicates_are_refused() -> None:
    queries = Queries.parse("-- intro\n-- name: one\n-- why\nSELECT 1;\n\n-- name: two\nSELECT $1;\n")
    assert dict(queries) == {"one": "-- why\nSELECT 1;", "two": "SELECT $1;"}
    with pytest.raises(ValueError, match="defined twice"):
        Queries.parse("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")
    with pytest.raises(KeyError, match="no query named 'three'"):
        queries["three"]


def test_domain_errors_map_to_status_codes_with_details() -> None:
    quota = status_for(
        errors.QuotaExceeded(
            scope="user", subject_id="u", tier="free", limit=3, used=3,
            resets_at=datetime(2030, 1, 2, tzinfo=UTC), retry_after_seconds=90.5,
        )
    )
    assert quota.code == code_pb2.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert quota.details[1].Unpack(retry) and retry.retry_delay.ToTimedelta() == timedelta(seconds=90.5)
    cases = [
        (errors.InvalidArgument("user_id", "must not be empty"), code_pb2.INVALID_ARGUMENT),
        (errors.NotFound("export x not found"), code_pb2.NOT_FOUND),
        (errors.AlreadyExists("key reused"), code_pb2.ALREADY_EXISTS),
        (errors.FailedPrecondition("closed"), code_pb2.FAILED_PRECONDITION),
        (errors.DurationTooLong(user_id="u", tier="free", requested_seconds=31, max_seconds=30),
         code_pb2.FAILED_PRECONDITION),
        (errors.Unavailable("db down"), code_pb2.UNAVAILABLE),
    ]
    for error, code in cases:
        status = status_for(error)
        assert (status.code, status.message) == (code, error.message)
