"""The metering gRPC server: Metering + grpc.health.v1.Health + reflection, a lease reaper, an archiver
(retention), a health probe and the ledger gauges' refresh, graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Callable
from datetime import timedelta

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from metering import db, errors, metrics, migrate
from metering.config import Config, is_loopback
from metering.core import MeteringCore
from metering.domain import Export, ExportStatus
from metering.interceptors import METERING_SERVICE, MeteringInterceptor
from metering.quota import Clock, QuotaPolicy, system_clock
from metering.servicer import MeteringServicer

log = logging.getLogger("metering.server")

_SERVICE = metering_pb2.DESCRIPTOR.services_by_name["Metering"]
SUMMARY_COMPACT_SECONDS = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class MeteringServer:
    """One metering replica. `start()` connects, migrates and serves; `stop(grace)` drains and closes."""

    def __init__(self, config: Config, *, database_url: str, clock: Clock = system_clock) -> None:
        self.config = config
        self._database_url = database_url
        self._clock = clock
        self._pool = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: bool | None = None
        self._stopping = False
        self.port = 0
        self.metrics_port = 0
        self._stop_metrics: Callable[[], None] | None = None
        self.core: MeteringCore | None = None

    @property
    def target(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        self._pool = await db.connect_with_retry(
            self._database_url,
            size=config.db_pool_size,
            connect_timeout=config.db_connect_timeout_seconds,
            command_timeout=config.db_command_timeout_seconds,
            deadline_seconds=config.db_startup_timeout_seconds,
        )
        try:
            async with self._pool.acquire() as connection:
                await migrate.migrate(connection)
            self.core = MeteringCore(
                db.Database(self._pool),
                tiers=config.tiers,
                lease_seconds=config.lease_seconds,
                policy=QuotaPolicy(self._clock, config.day_zone),
                events=_MetricEvents(),
            )
            metrics.initialize_tiers(config.tiers)
            if config.metrics_listen:
                self.metrics_port, self._stop_metrics = metrics.start_metrics_server(
                    config.metrics_listen, serving=lambda: self._serving is True and not self._stopping
                )
            await self._start_grpc()
        except BaseException:
            await self._close_pool()
            raise
        await self._probe_once()
        self._tasks = [
            asyncio.create_task(self._probe_forever(), name="metering-health-probe"),
            asyncio.create_task(self._refresh_gauges_forever(), name="metering-gauges"),
            asyncio.create_task(self._reap_forever(), name="metering-reaper"),
            asyncio.create_task(self._compact_forever(), name="metering-summaries"),
        ]
        if config.retention_days > 0:
            self._tasks.append(asyncio.create_task(self._archive_forever(), name="metering-archiver"))
        log.info(
            "serving",
            extra={
                "target": self.target,
                "lease_seconds": config.lease_seconds,
                "tiers": sorted(config.tiers),
                "auth_roles": sorted(config.auth.roles) if config.auth else None,
                "tls": ("mutual" if config.tls.mutual else "server") if config.tls else None,
            },
        )
        if config.auth is not None and config.tls is None and not is_loopback(config.listen_host):
            log.warning(
                "bearer tokens travel in clear text: set METERING_TLS_CERT_FILE and METERING_TLS_KEY_FILE "
                "unless the network below encrypts (e.g. a service mesh)",
                extra={"target": self.target},
            )

    async def _start_grpc(self) -> None:
        # SO_REUSEPORT off: a second server on a taken port must fail, not share it silently.
        # One interceptor: metrics (recording the codes the error mapping produced), auth, undecodable refusal,
        # status mapping and the log line, in one wrapper per Metering method (metering/interceptors.py).
        server = grpc.aio.server(
            interceptors=[MeteringInterceptor(self.config.auth, metrics=metrics.MetricsInterceptor([_SERVICE]))],
            options=[("grpc.so_reuseport", 0)],
        )
        assert self.core is not None
        metering_pb2_grpc.add_MeteringServicer_to_server(MeteringServicer(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for service in ("", METERING_SERVICE):
            await self._health.set(service, _NOT_SERVING)
        reflection.enable_server_reflection(
            (
                _SERVICE.full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            if self.config.tls is not None:
                self.port = server.add_secure_port(self.config.listen_address, self.config.tls.credentials())
            else:
                self.port = server.add_insecure_port(self.config.listen_address)
        except RuntimeError as error:
            raise errors.Unavailable(f"cannot listen on {self.config.listen_address}: {error}") from error
        if self.port == 0:
            raise errors.Unavailable(f"cannot listen on {self.config.listen_address}")
        await server.start()
        self._server = server

    async def _probe_once(self) -> None:
        assert self.core is not None
        timeout = max(0.5, min(self.config.health_probe_seconds, 5.0))
        try:
            await self.core.ping(timeout)
            serving = True
        except (errors.Unavailable, TimeoutError, OSError) as error:
            serving = False
            if self._serving is not False:
                log.warning("database not answering: NOT_SERVING", extra={"error": str(error)})
        if serving and self._serving is False:
            log.info("database answering again: SERVING")
        metrics.set_database_up(serving)
        if serving != self._serving:
            self._serving = serving
            for service in ("", METERING_SERVICE):
                await self._health.set(service, _SERVING if serving else _NOT_SERVING)

    async def _refresh_gauges(self) -> None:
        # Apart from the health check: a count that fails or is slow must not turn the service NOT_SERVING.
        assert self.core is not None
        if not self._serving:
            return
        try:
            metrics.set_reservations_in_flight(await self.core.count_in_flight())
            metrics.set_users_near_limit(await self.core.count_near_limit())
        except Exception as error:
            log.warning("could not refresh the ledger gauges", extra={"error": repr(error)})

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_probe_seconds)
            try:
                await self._probe_once()
            except Exception:
                log.exception("health probe failed")

    async def _refresh_gauges_forever(self) -> None:
        # In a task from the start: at many users a day the first count must not hold up the reaper's start.
        while True:
            await self._refresh_gauges()
            await asyncio.sleep(self.config.gauge_refresh_seconds)

    async def _reap_forever(self) -> None:
        assert self.core is not None
        batch = 100
        while True:
            reaped = 0
            try:
                reaped = await self.core.reap_expired(batch)
            except errors.Unavailable:
                pass  # the health probe reports it; try again next round
            except Exception:
                log.exception("reaper failed")
            if reaped:
                log.info("reservations expired", extra={"count": reaped})
            if reaped < batch:
                await asyncio.sleep(self.config.reaper_interval_seconds)

    async def _compact_forever(self) -> None:
        """Folds the system summaries' deltas every second, so system-wide GetStats reads few of them."""
        assert self.core is not None
        while True:
            try:
                await self.core.compact_summaries()
            except errors.Unavailable:
                pass  # the health probe reports it; try again next round
            except Exception:
                log.exception("summary compaction failed")
            await asyncio.sleep(SUMMARY_COMPACT_SECONDS)

    async def _archive_forever(self) -> None:
        """Moves old closed exports to the archive every archive interval. Replicas started together begin at
        random points of the first interval; running at the same moment would be safe, only wasteful."""
        assert self.core is not None
        interval = self.config.archive_interval_seconds
        older_than = timedelta(days=self.config.retention_days)
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                report = await self.core.archive_closed(older_than)
                if report.moved:
                    extra = {"count": report.moved, "cutoff": report.cutoff.isoformat()}
                    log.info("archive run", extra={**extra, "partitions": report.by_partition})
            except errors.Unavailable:
                pass  # the health probe reports it; try again next round
            except Exception:
                log.exception("archiver failed")
            await asyncio.sleep(interval)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight calls finish for up to `grace` seconds, then closes."""
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._close_pool()
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None

    async def _close_pool(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except (TimeoutError, OSError):
            pool.terminate()


class _MetricEvents:
    def export_moved(self, status: ExportStatus, export: Export) -> None:
        metrics.record_export_transition(status.value.lower(), export.render_mode.value, export.format.value)
        if status is ExportStatus.EXPIRED:
            metrics.record_reservations_expired(1)

    def denied(self, tier: str, reason: str) -> None:
        metrics.record_denial(tier, reason)


async def serve(config: Config, database_url: str) -> int:
    """Runs one server until SIGTERM or SIGINT, then drains for the grace period. Returns an exit code."""
    server = MeteringServer(config, database_url=database_url)
    try:
        await server.start()
    except errors.Unavailable as error:
        log.error("cannot start", extra={"error": error.message})
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("draining", extra={"grace_seconds": config.shutdown_grace_seconds})
    await server.stop(config.shutdown_grace_seconds)
    log.info("stopped")
    return 0
