"""Prometheus metrics of the metering service: the metric objects, helpers to record them, the `/metrics`
endpoint and a grpc.aio server interceptor that counts and times every RPC.

Everything lives in this module's own `REGISTRY` (never prometheus_client's global default), so the metering
and renderer servers can run in one process without "Duplicated timeseries" errors. The metric objects are
created once, at import; several metering servers in one process therefore share one set of counters, and
tests compare values before and after (`sample_value`) instead of expecting absolute numbers.

Wiring (metering's one interceptor records each call with the status code its error mapping produced)::

    service = metering_pb2.DESCRIPTOR.services_by_name["Metering"]
    interceptor = MeteringInterceptor(tokens, metrics=metrics.MetricsInterceptor([service]))
    server = grpc.aio.server(interceptors=[interceptor])
    metrics.initialize_tiers(tiers)  # denial series start at 0, so rate() sees the first one
    if config.metrics_listen:
        metrics_port, stop_metrics = metrics.start_metrics_server(config.metrics_listen)
    ...
    stop_metrics()

The RPC counter, histogram, interceptor and HTTP endpoint come from `metering.grpc_metrics`, shared by both
services; `tests/test_metrics.py` runs the same checks against both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge

from metering import grpc_metrics

REGISTRY = CollectorRegistry(auto_describe=True)

GRPC_HANDLED, GRPC_HANDLING_SECONDS = grpc_metrics.rpc_metrics(REGISTRY)

# --- metering's own ------------------------------------------------------------------------------------------

DENIAL_REASONS = ("daily_limit", "duration", "project_daily_limit")
EXPORT_STATUSES = ("reserved", "completed", "failed", "cancelled", "expired")
RENDER_MODES = ("local", "lambda")
FORMATS = ("mp4", "webm", "gif")

# Ledger-wide: set it from a count in the database (e.g. in the health-probe loop), not from this process's
# own calls; every replica then reports the same value and the dashboard takes max().
RESERVATIONS_IN_FLIGHT = Gauge(
    "metering_reservations_in_flight",
    "Exports currently RESERVED (a render holds a slot and has not completed).",
    registry=REGISTRY,
)
DENIALS = Counter(
    "metering_denials_total",
    "CheckAndReserve calls refused by a tier rule.",
    ("tier", "reason"),
    registry=REGISTRY,
)
EXPORTS = Counter(
    "metering_exports_total",
    "Exports entering a status (reserved, completed, failed, cancelled, expired).",
    ("status", "mode", "format"),
    registry=REGISTRY,
)
RESERVATIONS_EXPIRED = Counter(
    "metering_reservations_expired_total",
    "Reservations the reaper expired because their lease ran out without a heartbeat.",
    registry=REGISTRY,
)
USERS_NEAR_LIMIT = Gauge(
    "metering_users_near_limit",
    "Users with at most max(1, 20% of their tier's daily limit) exports left today, by tier (ledger-wide).",
    ("tier",),
    registry=REGISTRY,
)
_near_limit_tiers: set[str] = set()  # the tier series of USERS_NEAR_LIMIT created so far
DATABASE_UP = Gauge(
    "metering_database_up",
    "1 while the last database check succeeded, else 0.",
    registry=REGISTRY,
)

for _status in EXPORT_STATUSES:
    for _mode in RENDER_MODES:
        for _format in FORMATS:
            EXPORTS.labels(_status, _mode, _format)


def _label(value: object) -> str:
    """Enum members (StrEnum or not) and plain strings alike become lower-case label values."""
    if isinstance(value, enum.Enum):
        value = value.value
    return str(value).lower()


def _checked(name: str, value: object, allowed: tuple[str, ...]) -> str:
    text = _label(value)
    if text not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return text


def initialize_tiers(tiers: Iterable[str]) -> None:
    """Create every tier x reason denial series at 0, so alerts on rate() see the very first denial, and a
    users-near-limit series per tier (0 until the health probe counts)."""
    for tier in tiers:
        for reason in DENIAL_REASONS:
            DENIALS.labels(_label(tier), reason)
        USERS_NEAR_LIMIT.labels(_label(tier))
        _near_limit_tiers.add(_label(tier))


def record_denial(tier: str, reason: str) -> None:
    """A reservation refused; reason is one of DENIAL_REASONS."""
    DENIALS.labels(_label(tier), _checked("reason", reason, DENIAL_REASONS)).inc()


_export_series: dict[tuple[object, object, object], Counter] = {}  # checked once per distinct argument triple


def record_export_transition(status: object, mode: object, format: object) -> None:
    """An export entered `status` (call once per transition, after the transaction committed)."""
    key = (status, mode, format)
    series = _export_series.get(key)
    if series is None:
        series = EXPORTS.labels(
            _checked("status", status, EXPORT_STATUSES),
            _checked("mode", mode, RENDER_MODES),
            _checked("format", format, FORMATS),
        )
        _export_series[key] = series
    series.inc()


def record_reservations_expired(count: int) -> None:
    """The reaper expired `count` reservations (also count each in record_export_transition('expired', ...))."""
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    RESERVATIONS_EXPIRED.inc(count)


def set_reservations_in_flight(count: int) -> None:
    RESERVATIONS_IN_FLIGHT.set(count)


def set_users_near_limit(counts: Mapping[str, int]) -> None:
    """Users near their daily limit today, by tier (ledger-wide, like the in-flight gauge). A tier reported
    before and missing from `counts` drops back to 0."""
    if any(count < 0 for count in counts.values()):
        raise ValueError(f"counts must not be negative, not {dict(counts)}")
    wanted = dict.fromkeys(_near_limit_tiers, 0) | {_label(tier): count for tier, count in counts.items()}
    for tier, count in wanted.items():
        USERS_NEAR_LIMIT.labels(tier).set(count)
        _near_limit_tiers.add(tier)


def set_database_up(up: bool) -> None:
    DATABASE_UP.set(1 if up else 0)


def sample_value(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (0.0 when absent): for tests and debugging."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# --- the /metrics endpoint ------------------------------------------------------------------------------------


def start_metrics_server(
    listen: str, *, serving: Callable[[], bool] | None = None
) -> tuple[int, Callable[[], None]]:
    """Serve this module's registry at http://listen/metrics (any path, in fact) from a daemon thread, and
    http://listen/healthz from `serving` (200 SERVING, else 503 NOT_SERVING).

    `listen` is host:port ("[::1]:9090" for IPv6); port 0 picks a free port. Returns the bound port and a
    function that stops the server and waits for its thread.
    """
    return grpc_metrics.start_http(listen, REGISTRY, serving=serving)


class MetricsInterceptor(grpc_metrics.MetricsInterceptor):
    """Counts and times every RPC into this module's registry; MeteringInterceptor takes it (metering/server.py)."""

    def __init__(self, services: Iterable[ServiceDescriptor] = ()) -> None:
        super().__init__(services, handled=GRPC_HANDLED, seconds=GRPC_HANDLING_SECONDS)
