"""Faults around a render, with real subprocesses: the renderer killed mid-render, metering killed while
a render runs and the renderer restarted before metering returns. Each test ends with the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from tests.support.faults import (
    NOT_SERVING,
    SERVING,
    MeteringReplica,
    ProcessRegistry,
    RendererProcess,
    free_port,
    set_tiers,
    until,
)
from tests.support.metering import http_health, metering_stub, start_metering, wait_health
from tests.support.renderer import renderer_stub, tiny_composition, wait_terminal

Job = renderer_pb2.RenderJob
LEASE_SECONDS = 1.5
REAPER_SECONDS = LEASE_SECONDS / 4  # metering's default: a quarter of the lease


@pytest.fixture
def processes() -> Iterator[ProcessRegistry]:
    registry = ProcessRegistry()
    try:
        yield registry
    finally:
        registry.close()


def render_request(key: str, user: str, seconds: float) -> renderer_pb2.StartRenderRequest:
    return renderer_pb2.StartRenderRequest(
        idempotency_key=key, user_id=user, project_id="faults", composition=tiny_composition(seconds), format="mp4"
    )


async def export_row(database_url: str, export_id: str) -> asyncpg.Record:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchrow("SELECT * FROM exports WHERE export_id = $1", export_id)
    finally:
        await connection.close()


async def wait_rendering(stub, job_id: str) -> Job:
    """Follows the job until ffmpeg has reported some frames, not all: the render is under way."""
    async for job in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job_id), timeout=60):
        if job.state == Job.RENDERING and 0 < job.frames_rendered < job.frames_total:
            return job
        assert job.state in (Job.QUEUED, Job.RENDERING), f"the render ended before the fault: {job}"
        assert job.frames_rendered < job.frames_total, f"every frame was rendered before the fault: {job}"
    raise AssertionError("the watch ended before the render started")


async def test_a_renderer_killed_mid_render_gives_the_slot_back_when_the_lease_runs_out(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    async with start_metering(database_url, lease_seconds=LEASE_SECONDS) as metering:
        renderer = RendererProcess(processes, metering.target, tmp_path)
        await renderer.start()
        async with renderer_stub(renderer.target) as stub, metering_stub(metering.target) as ledger:
            # Two minutes of video (a pro user's limit): seconds of work even at 160x120, 10 fps, and
            # ffmpeg reports progress twice a second, so the kill lands mid-render.
            await set_tiers(metering.target, {"kim": "pro"})
            job = await stub.StartRender(render_request("killed", "kim", seconds=120))
            await wait_rendering(stub, job.job_id)
            in_flight = (await ledger.GetUsage(metering_pb2.GetUsageRequest(user_id="kim"))).usage
            ffmpeg = renderer.children()
            processes.adopt(ffmpeg)
            renderer.kill()

            # No heartbeat any more: the lease runs out and the reaper expires the reservation.
            async def expired() -> bool:
                row = await export_row(database_url, job.export_id)
                return row["status"] == "EXPIRED"

            await until(expired, timeout=30, what="the reservation of the killed render to expire")
            row = await export_row(database_url, job.export_id)
            usage = (await ledger.GetUsage(metering_pb2.GetUsageRequest(user_id="kim"))).usage
            # ffmpeg runs in its own session; it must not outlive the renderer for long (its progress
            # pipe is gone), or a crashed renderer would leave renders burning CPU.
            await until(
                lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ffmpeg),
                timeout=15,
                what="ffmpeg to exit after its renderer was killed",
            )

    assert in_flight.used == 1 and in_flight.in_flight == 1
    assert ffmpeg, "a render was running when the renderer was killed"
    assert row["status"] == "EXPIRED" and row["completed_at"] is None
    # Reaped within its lease plus a reaper round (and scheduling slack on a shared machine), not later.
    assert row["expired_at"] - row["lease_expires_at"] < timedelta(seconds=REAPER_SECONDS + 3)
    assert row["lease_expires_at"] - row["created_at"] >= timedelta(seconds=LEASE_SECONDS)  # it was heartbeating
    assert usage.used == 0 and usage.in_flight == 0  # the slot is back


async def test_a_completion_survives_metering_killed_mid_render_and_a_renderer_restart(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    metering = MeteringReplica(processes, database_url, log_dir=tmp_path / "logs", lease_seconds=60)
    await metering.start()
    renderer = RendererProcess(processes, metering.target, tmp_path)
    await renderer.start()
    await set_tiers(metering.target, {"otto": "pro"})  # a minute of video: the render outlives metering
    async with renderer_stub(renderer.target) as stub:
        job = await stub.StartRender(render_request("outage", "otto", seconds=60))
        await wait_rendering(stub, job.job_id)
        metering.kill()
        await wait_health(renderer.target, NOT_SERVING, timeout=15)  # nothing new renders without metering
        finished = await wait_terminal(stub, job.job_id)
    pending_before_stop = renderer.pending_completions()
    assert await renderer.terminate() == 0
    pending_after_stop = renderer.pending_completions()

    await metering.start()  # same port, same database
    await renderer.start()  # same state directory: the outbox is delivered

    await until(lambda: not renderer.pending_completions(), timeout=60, what="the outbox to drain")
    row = await export_row(database_url, job.export_id)
    output = Path(finished.output_uri.removeprefix("file://"))

    assert finished.state == Job.SUCCEEDED and finished.file_size_bytes > 0
    assert [export_id for export_id, _ in pending_before_stop] == [job.export_id]
    assert [export_id for export_id, _ in pending_after_stop] == [job.export_id]  # SIGTERM kept it
    assert json.loads(pending_after_stop[0][1])["outcome"] == "completed"
    assert row["status"] == "COMPLETED"
    assert row["file_size_bytes"] == finished.file_size_bytes == output.stat().st_size
    assert row["output_uri"] == finished.output_uri
    assert abs(row["duration_seconds"] - 60) < 0.5
    await wait_health(renderer.target, SERVING)


@dataclass
class MidRender:
    renderer: RendererProcess
    metrics_port: int
    health_before: tuple[int, str]  # /healthz just before SIGTERM
    stub: renderer_pb2_grpc.RendererStub
    ledger: metering_pb2_grpc.MeteringStub
    request: renderer_pb2.StartRenderRequest
    job: Job
    watched: asyncio.Task[Job]  # a caller following the render to its end


@contextlib.asynccontextmanager
async def sigterm_mid_render(
    database_url: str, root: Path, processes: ProcessRegistry, *, user: str, key: str, grace_seconds: float
) -> AsyncIterator[MidRender]:
    """A pro user's two-minute render at 20 fps under way (seconds of work), then SIGTERM to its renderer."""
    request = render_request(key, user, seconds=120)
    request.composition.fps = 20
    metrics_port = free_port()
    async with start_metering(database_url) as metering:
        env = {
            "RENDER_SHUTDOWN_GRACE_SECONDS": str(grace_seconds),
            "RENDERER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        renderer = RendererProcess(processes, metering.target, root, env=env)
        await renderer.start()
        await set_tiers(metering.target, {user: "pro"})
        async with renderer_stub(renderer.target) as stub, metering_stub(metering.target) as ledger:
            job = await stub.StartRender(request)
            await wait_rendering(stub, job.job_id)
            watched = asyncio.create_task(wait_terminal(stub, job.job_id))
            health_before = http_health(metrics_port)
            renderer.process.send_signal(signal.SIGTERM)
            try:
                yield MidRender(renderer, metrics_port, health_before, stub, ledger, request, job, watched)
            finally:
                watched.cancel()  # ended already, unless the test failed before it awaited the watch


async def test_a_renderer_sent_sigterm_finishes_its_render_while_its_caller_can_still_follow_it(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    async with sigterm_mid_render(
        database_url, tmp_path, processes, user="dana", key="before-sigterm", grace_seconds=60
    ) as drain:
        await wait_health(drain.renderer.target, NOT_SERVING, timeout=5)  # load balancers stop sending work here
        health_during = http_health(drain.metrics_port)  # and so do Kubernetes probes (plaintext HTTP)
        # Draining: nothing new starts (and nothing is reserved for it), the render under way stays readable,
        # and a caller retrying the start of its own render gets its job back.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await drain.stub.StartRender(render_request("during-drain", "dana", seconds=1))
        during = await drain.stub.GetRender(renderer_pb2.GetRenderRequest(job_id=drain.job.job_id))
        replayed = await drain.stub.StartRender(drain.request)
        finished = await drain.watched
        exit_code = await drain.renderer.wait_exit(timeout=30)
        exports = (await drain.ledger.ListExports(metering_pb2.ListExportsRequest(user_id="dana"))).exports

    assert drain.health_before == (200, "SERVING") and health_during == (503, "NOT_SERVING")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in refused.value.details() and "nothing was reserved" in refused.value.details()
    assert during.state == Job.RENDERING and during.frames_rendered < during.frames_total
    assert replayed.job_id == drain.job.job_id
    assert finished.state == Job.SUCCEEDED and finished.frames_rendered == finished.frames_total
    assert exit_code == 0
    assert [(e.idempotency_key, e.status) for e in exports] == [
        ("before-sigterm", metering_pb2.EXPORT_STATUS_COMPLETED)
    ]
    assert exports[0].file_size_bytes == finished.file_size_bytes > 0


async def test_a_render_longer_than_the_shutdown_grace_is_cancelled_and_recorded_so_and_its_caller_sees_it(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    async with sigterm_mid_render(
        database_url, tmp_path, processes, user="lee", key="outlives-grace", grace_seconds=0.5
    ) as drain:
        finished = await drain.watched
        exit_code = await drain.renderer.wait_exit(timeout=30)
        exports = (await drain.ledger.ListExports(metering_pb2.ListExportsRequest(user_id="lee"))).exports
        usage = (await drain.ledger.GetUsage(metering_pb2.GetUsageRequest(user_id="lee"))).usage

    assert finished.state == Job.CANCELLED and finished.frames_rendered < finished.frames_total
    assert exit_code == 0
    assert [(e.idempotency_key, e.status) for e in exports] == [
        ("outlives-grace", metering_pb2.EXPORT_STATUS_CANCELLED)
    ]
    assert usage.used == 0 and usage.in_flight == 0  # the slot is back at once, not when the lease runs out
    assert not any(drain.renderer.output_dir.iterdir())  # no partial file left behind
