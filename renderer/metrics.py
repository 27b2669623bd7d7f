"""Prometheus metrics of the renderer: the metric objects, helpers to record them, the `/metrics` endpoint and a
grpc.aio server interceptor that counts and times every RPC.

Everything lives in this module's own `REGISTRY` (never prometheus_client's global default), so the renderer
and metering servers can run in one process without "Duplicated timeseries" errors. The metric objects are
created once, at import; several renderers in one process therefore share one set of counters, and tests
compare values before and after (`sample_value`) instead of expecting absolute numbers.

Wiring (the interceptor goes FIRST, outermost, so it sees the status code the error mapping produced)::

    service = renderer_pb2.DESCRIPTOR.services_by_name["Renderer"]
    server = grpc.aio.server(interceptors=[metrics.MetricsInterceptor([service]), *others])
    metrics.track_outbox(outbox.depth, lambda: len(outbox.dead_letters()))
    if config.metrics_listen:
        metrics_port, stop_metrics = metrics.start_metrics_server(config.metrics_listen)
    ...
    stop_metrics()

The RPC counter, histogram, interceptor and HTTP endpoint come from `metering.grpc_metrics`, shared by both
services; `tests/test_metrics.py` runs the same checks against both.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator

from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from metering import grpc_metrics

REGISTRY = CollectorRegistry(auto_describe=True)

GRPC_HANDLED, GRPC_HANDLING_SECONDS = grpc_metrics.rpc_metrics(REGISTRY)

# --- the renderer's own ---------------------------------------------------------------------------------------

RENDER_MODES = ("local", "lambda")
FORMATS = ("mp4", "webm", "gif")
JOB_STATES = ("queued", "rendering", "succeeded", "failed", "cancelled")
RENDER_OUTCOMES = ("succeeded", "failed", "cancelled")
LAMBDA_OUTCOMES = ("ok", "error", "timeout")

# 0.1 s .. 15 min: a tiny GIF takes a fraction of a second; Lambda's hard limit is 15 minutes.
RENDER_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0)

RENDER_SECONDS = Histogram(
    "renderer_render_seconds",
    "Wall time of one render from start to its terminal state.",
    ("mode", "format", "outcome"),
    buckets=RENDER_SECONDS_BUCKETS,
    registry=REGISTRY,
)
JOBS_IN_PROGRESS = Gauge(
    "renderer_jobs_in_progress",
    "Renders running now.",
    ("mode",),
    registry=REGISTRY,
)
JOBS = Counter(
    "renderer_jobs_total",
    "Render jobs entering a state (queued, rendering, succeeded, failed, cancelled).",
    ("mode", "format", "state"),
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "renderer_outbox_depth",
    "Completions written locally but not yet acknowledged by metering.",
    registry=REGISTRY,
)
OUTBOX_DEAD_LETTERS = Gauge(
    "renderer_outbox_dead_letters",
    "Completions metering refused for good; each needs an operator.",
    registry=REGISTRY,
)
LAMBDA_INVOCATIONS = Counter(
    "renderer_lambda_invocations_total",
    "Lambda render invocations by outcome (ok, error, timeout).",
    ("outcome",),
    registry=REGISTRY,
)
LAMBDA_THROTTLES = Counter(
    "renderer_lambda_throttles_total",
    "Lambda invocations refused with TooManyRequestsException (throttled).",
    registry=REGISTRY,
)
STARTS_REFUSED = Counter(
    "renderer_starts_refused_total",
    "StartRender refused before anything was reserved: busy (every slot and the waiting line full) or draining.",
    ("reason",),
    registry=REGISTRY,
)
START_REFUSAL_REASONS = ("busy", "draining")
METERING_UNAVAILABLE = Counter(
    "renderer_metering_unavailable_total",
    "StartRender calls refused because metering could not be reached (nothing was reserved or rendered).",
    registry=REGISTRY,
)
# What the health loop last found, whether or not anyone calls: a renderer without metering is NOT_SERVING,
# so load balancers stop sending it the starts that would count in the counter above.
METERING_USABLE = Gauge(
    "renderer_metering_usable",
    "1 while metering answers and takes this renderer's token (renders can be metered), else 0.",
    registry=REGISTRY,
)

for _mode in RENDER_MODES:
    JOBS_IN_PROGRESS.labels(_mode)
    for _format in FORMATS:
        for _state in JOB_STATES:
            JOBS.labels(_mode, _format, _state)
for _outcome in LAMBDA_OUTCOMES:
    LAMBDA_INVOCATIONS.labels(_outcome)
for _reason in START_REFUSAL_REASONS:
    STARTS_REFUSED.labels(_reason)


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


def record_job_state(mode: object, format: object, state: object) -> None:
    """A job entered `state` (one of JOB_STATES)."""
    JOBS.labels(
        _checked("mode", mode, RENDER_MODES),
        _checked("format", format, FORMATS),
        _checked("state", state, JOB_STATES),
    ).inc()


def observe_render(mode: object, format: object, outcome: object, seconds: float) -> None:
    """A render ended after `seconds`; outcome is one of RENDER_OUTCOMES."""
    RENDER_SECONDS.labels(
        _checked("mode", mode, RENDER_MODES),
        _checked("format", format, FORMATS),
        _checked("outcome", outcome, RENDER_OUTCOMES),
    ).observe(seconds)


@contextlib.contextmanager
def job_in_progress(mode: object) -> Iterator[None]:
    """`with job_in_progress(mode): await backend.render(...)` keeps renderer_jobs_in_progress right,
    also when the render raises or is cancelled."""
    gauge = JOBS_IN_PROGRESS.labels(_checked("mode", mode, RENDER_MODES))
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def record_lambda_invocation(outcome: str) -> None:
    """One Lambda invocation ended: ok, error (the function failed) or timeout."""
    LAMBDA_INVOCATIONS.labels(_checked("outcome", outcome, LAMBDA_OUTCOMES)).inc()


def record_lambda_throttle() -> None:
    LAMBDA_THROTTLES.inc()


def record_start_refused(reason: str) -> None:
    STARTS_REFUSED.labels(_checked("reason", reason, START_REFUSAL_REASONS)).inc()


def record_metering_unavailable() -> None:
    METERING_UNAVAILABLE.inc()


def set_metering_usable(usable: bool) -> None:
    METERING_USABLE.set(1 if usable else 0)


def track_outbox(depth: Callable[[], float], dead_letters: Callable[[], float]) -> None:
    """Read both outbox gauges at scrape time (the callables run on the /metrics HTTP thread, so they must be
    thread-safe and quick), e.g. `track_outbox(outbox.depth, lambda: len(outbox.dead_letters()))`."""
    OUTBOX_DEPTH.set_function(depth)
    OUTBOX_DEAD_LETTERS.set_function(dead_letters)


def set_outbox(depth: int, dead_letters: int) -> None:
    """Push fixed values instead (a gauge with a function ignores .set(), so this replaces the function)."""
    track_outbox(lambda: depth, lambda: dead_letters)


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
    """Counts and times every RPC into this module's registry; put it FIRST in `interceptors=[...]`."""

    def __init__(self, services: Iterable[ServiceDescriptor] = ()) -> None:
        super().__init__(services, handled=GRPC_HANDLED, seconds=GRPC_HANDLING_SECONDS)
