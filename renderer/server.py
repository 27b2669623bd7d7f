"""Wires the renderer together and serves it: gRPC, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from metering.auth import RENDERER_ACCESS, AuthInterceptor
from metering.decoding import RefuseUndecodable
from renderer import metrics, retention
from renderer.config import (
    FINAL_ANSWERS_SECONDS,
    ConfigError,
    RendererConfig,
    ensure_writable_directory,
    is_loopback,
    require_auth_beyond_loopback,
)
from renderer.domain import RenderBackend, RenderMode
from renderer.jobs import Job, JobRunner, JobState
from renderer.local_backend import LocalBackend
from renderer.metering_client import GrpcMeteringClient
from renderer.outbox import Outbox

log = logging.getLogger(__name__)

SERVICE = renderer_pb2.DESCRIPTOR.services_by_name["Renderer"]
SERVICE_NAME = SERVICE.full_name
HEALTH_PROBE_SECONDS = 2.0


class Health:
    """The renderer's health as gRPC health answers it and as /healthz reads it (from the metrics thread)."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = False

    async def report(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)

    async def shut_down(self) -> None:
        """NOT_SERVING for good: load balancers send new work elsewhere."""
        self.serving = False
        await self.servicer.enter_graceful_shutdown()


@dataclass
class RunningRenderer:
    server: grpc.aio.Server
    port: int
    runner: JobRunner
    outbox: Outbox
    metering: GrpcMeteringClient
    health: Health
    health_task: asyncio.Task[None]
    stop_metrics: Callable[[], None] | None = None
    retention_task: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_seconds: float) -> None:
        """Drain: NOT_SERVING and no new render at once (StartRender: UNAVAILABLE); the renders under way finish
        within the grace period while their callers can still watch, read and cancel them; then gRPC stops,
        leaving the last answers `FINAL_ANSWERS_SECONDS` to go out, and the completions are flushed."""
        self.health_task.cancel()
        if self.retention_task is not None:
            self.retention_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.health_task
        await self.health.shut_down()
        await self.runner.shutdown(grace_seconds)
        await self.server.stop(FINAL_ANSWERS_SECONDS)
        if self.retention_task is not None:
            await asyncio.gather(self.retention_task, return_exceptions=True)
        if self.stop_metrics is not None:
            self.stop_metrics()
            metrics.set_outbox(0, 0)  # the gauges read the outbox at scrape time; it closes next
        await self.outbox.close()
        await self.metering.close()


def build_backends(config: RendererConfig) -> dict[RenderMode, RenderBackend]:
    s3_fetcher = None
    if config.source_buckets:
        from renderer.s3 import Boto3Fetcher, s3_client

        s3_fetcher = Boto3Fetcher(s3_client())
    backends: dict[RenderMode, RenderBackend] = {
        RenderMode.LOCAL: LocalBackend(
            config.output_dir,
            asset_roots=config.asset_roots,
            s3_fetcher=s3_fetcher,
            s3_buckets=config.source_buckets,
            stall_seconds=config.stall_seconds,
        ),
    }
    if config.lambda_settings is not None:
        from renderer.lambda_backend import LambdaBackend

        backends[RenderMode.LAMBDA] = LambdaBackend.from_settings(config.lambda_settings)
    return backends


async def start(config: RendererConfig, *, outbox_max_backoff_seconds: float = 30.0) -> RunningRenderer:
    require_auth_beyond_loopback(config.listen, config.auth)
    ensure_writable_directory(config.output_dir, "RENDER_OUTPUT_DIR")
    ensure_writable_directory(config.state_dir, "RENDER_STATE_DIR")
    removed = retention.remove_partials(config.output_dir, untouched_seconds=2 * config.stall_seconds)
    if removed:
        log.info("partial renders of an earlier process removed", extra={"count": removed})
    metering = GrpcMeteringClient(
        config.metering_target,
        timeout_seconds=config.metering_timeout_seconds,
        token=config.metering_token,
        tls=config.metering_tls,
    )
    outbox = Outbox(
        config.state_dir / "outbox.sqlite3", metering.complete, max_backoff_seconds=outbox_max_backoff_seconds
    )
    outbox.start()
    runner = JobRunner(
        metering,
        outbox,
        build_backends(config),
        default_mode=config.default_mode,
        concurrency=config.concurrency,
        max_waiting=config.max_waiting,
        on_transition=_record_transition,
    )
    # Metrics outermost, so it records the codes of refused calls too.
    interceptors: list[grpc.aio.ServerInterceptor] = [metrics.MetricsInterceptor([SERVICE])]
    if config.auth is not None:
        interceptors.append(AuthInterceptor(config.auth, RENDERER_ACCESS))
    interceptors.append(RefuseUndecodable())
    server = grpc.aio.server(interceptors=interceptors)
    renderer_pb2_grpc.add_RendererServicer_to_server(_servicer(runner), server)
    renderer_health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(renderer_health.servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls is not None:
        port = server.add_secure_port(config.listen, config.tls.credentials())
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise ConfigError(f"cannot listen on {config.listen}")
    if config.auth is not None and config.tls is None and not is_loopback(config.listen):
        log.warning(
            "bearer tokens travel in clear text: set RENDERER_TLS_CERT_FILE and RENDERER_TLS_KEY_FILE "
            "unless the network below encrypts (e.g. a service mesh)",
            extra={"listen": config.listen},
        )
    await server.start()
    health_task = asyncio.create_task(_follow_metering_health(metering, renderer_health))
    retention_task = None
    if config.output_retention_hours > 0:
        retention_task = asyncio.create_task(
            retention.sweep_forever(config.output_dir, config.output_retention_hours * 3600), name="render-retention"
        )
    stop_metrics = None
    if config.metrics_listen:
        metrics.track_outbox(outbox.depth, lambda: len(outbox.dead_letters()))
        metrics_port, stop_metrics = metrics.start_metrics_server(
            config.metrics_listen, serving=lambda: renderer_health.serving
        )
        log.info("metrics serving", extra={"listen": config.metrics_listen, "port": metrics_port})
    log.info(
        "renderer serving",
        extra={
            "listen": config.listen,
            "port": port,
            "metering": config.metering_target,
            "auth_roles": sorted(config.auth.roles) if config.auth else None,
            "tls": ("mutual" if config.tls.mutual else "server") if config.tls else None,
            "metering_tls": config.metering_tls is not None,
        },
    )
    return RunningRenderer(
        server, port, runner, outbox, metering, renderer_health, health_task, stop_metrics, retention_task
    )


def _record_transition(job: Job, previous: JobState | None) -> None:
    metrics.record_job_state(job.mode, job.format, job.state)
    if job.state is JobState.RENDERING:
        metrics.JOBS_IN_PROGRESS.labels(job.mode.value).inc()
    elif previous is JobState.RENDERING:
        metrics.JOBS_IN_PROGRESS.labels(job.mode.value).dec()
    if job.state.terminal:
        metrics.observe_render(job.mode, job.format, job.state, job.render_seconds)


def _servicer(runner: JobRunner) -> renderer_pb2_grpc.RendererServicer:
    from renderer.servicer import RendererServicer

    return RendererServicer(runner)


async def _follow_metering_health(metering: GrpcMeteringClient, renderer_health: Health) -> None:
    """SERVING only while metering answers and takes this renderer's token: without metering, nothing renders.
    Each change is logged once, with the reason."""
    last_reason: str | None = ""  # neither None (serving) nor a reason: the first round always logs a problem
    while True:
        reason = await metering.unhealthy_because()
        if reason != last_reason:
            if reason is not None:
                log.warning("metering unusable: NOT_SERVING", extra={"reason": reason})
            elif last_reason:
                log.info("metering answers again: SERVING")
            last_reason = reason
        metrics.set_metering_usable(reason is None)
        await renderer_health.report(reason is None)
        await asyncio.sleep(HEALTH_PROBE_SECONDS)


async def serve_forever(config: RendererConfig) -> None:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"renderer listening on {config.listen.rpartition(':')[0]}:{running.port}", flush=True)
    await stop.wait()
    log.info(
        "renderer stopping: draining in-flight renders",
        extra={"grace_seconds": config.shutdown_grace_seconds},
    )
    await running.stop(config.shutdown_grace_seconds)
