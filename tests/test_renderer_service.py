"""The renderer through its gRPC surface, with real metering, PostgreSQL and ffmpeg."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2
from renderer import metrics as renderer_metrics
from renderer.media import measure
from tests.support.metering import start_metering
from tests.support.renderer import renderer_stub, start_renderer, tiny_composition, wait_terminal

Job = renderer_pb2.RenderJob


@contextlib.asynccontextmanager
async def metering_stub(target: str) -> AsyncIterator[metering_pb2_grpc.MeteringStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield metering_pb2_grpc.MeteringStub(channel)


def start_request(key: str, user: str = "alice", fmt: str = "mp4", **composition_fields: object):
    return renderer_pb2.StartRenderRequest(
        idempotency_key=key,
        user_id=user,
        project_id="demo",
        composition=tiny_composition(**composition_fields),
        format=fmt,
    )


async def exports_of(metering: metering_pb2_grpc.MeteringStub, user: str) -> list[metering_pb2.Export]:
    answer = await metering.ListExports(metering_pb2.ListExportsRequest(user_id=user, page_size=100))
    return list(answer.exports)


async def test_each_format_renders_to_the_right_length_and_lands_in_the_ledger(
    metering_target: str, tmp_path: Path
) -> None:
    async with (
        start_renderer(metering_target, tmp_path) as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        jobs = {}
        for fmt in ("mp4", "webm", "gif"):
            job = await stub.StartRender(start_request(f"key-{fmt}", fmt=fmt, duration_seconds=1.5))
            jobs[fmt] = await wait_terminal(stub, job.job_id)
        ledger = {e.export_id: e for e in await exports_of(metering, "alice")}

    for fmt, job in jobs.items():
        assert job.state == Job.SUCCEEDED, job.error
        path = Path(urlparse(job.output_uri).path)
        assert path.name == f"{job.export_id}.{fmt}"
        assert path.stat().st_size == job.file_size_bytes > 0
        measured = measure(path)
        assert measured.duration_seconds == pytest.approx(1.5, abs=0.11)
        assert job.duration_seconds == pytest.approx(1.5, abs=0.11)
        assert job.frames_rendered == job.frames_total == 15
        export = ledger[job.export_id]
        assert export.status == metering_pb2.EXPORT_STATUS_COMPLETED
        assert export.render_mode == metering_pb2.RENDER_MODE_LOCAL
        assert export.format == fmt
        assert export.file_size_bytes == job.file_size_bytes
        assert export.output_uri == job.output_uri
        assert export.render_seconds > 0


async def test_a_free_users_fourth_render_is_refused_with_meterings_own_error(
    metering_target: str, tmp_path: Path
) -> None:
    async with (
        start_renderer(metering_target, tmp_path) as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        for n in range(3):
            job = await stub.StartRender(start_request(f"k{n}", user="frank"))
            assert (await wait_terminal(stub, job.job_id)).state == Job.SUCCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartRender(start_request("k4", user="frank"))
        exports = await exports_of(metering, "frank")

    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "Daily export limit reached (3 for free tier)"
    status = rpc_status.from_call(error)
    assert status is not None
    kinds = {detail.TypeName() for detail in status.details}
    expected = {error_details_pb2.QuotaFailure.DESCRIPTOR.full_name, error_details_pb2.RetryInfo.DESCRIPTOR.full_name}
    assert expected <= kinds
    assert len(exports) == 3
    assert len(list((tmp_path / "renders").iterdir())) == 3


async def test_a_failed_render_is_recorded_with_its_error_and_uses_no_quota(
    metering_target: str, tmp_path: Path
) -> None:
    async with (
        start_renderer(metering_target, tmp_path) as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        (tmp_path / "assets" / "broken.mp4").write_bytes(b"this is not a video" * 100)
        request = start_request("broken", user="bob")
        request.composition.clips[0].source = "broken.mp4"
        job = await wait_terminal(stub, (await stub.StartRender(request)).job_id)
        usage = (await metering.GetUsage(metering_pb2.GetUsageRequest(user_id="bob"))).usage
        (export,) = await exports_of(metering, "bob")

    assert job.state == Job.FAILED
    assert "broken.mp4" in job.error or "Invalid data" in job.error
    assert export.status == metering_pb2.EXPORT_STATUS_FAILED
    assert export.error == job.error
    assert usage.used == 0
    assert not list((tmp_path / "renders").glob("*"))


async def test_cancel_mid_render_stops_ffmpeg_removes_output_and_records_cancelled(
    metering_target: str, tmp_path: Path
) -> None:
    async with (
        start_renderer(metering_target, tmp_path) as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        request = start_request("long", user="carol", width=640, height=480, fps=30, duration_seconds=25)
        request.composition.clips[0].duration = 25
        job = await stub.StartRender(request)
        async for update in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job.job_id)):
            if update.frames_rendered > 0:
                break
        cancelled = await stub.CancelRender(renderer_pb2.CancelRenderRequest(job_id=job.job_id))
        (export,) = await exports_of(metering, "carol")
        usage = (await metering.GetUsage(metering_pb2.GetUsageRequest(user_id="carol"))).usage

    assert cancelled.state == Job.CANCELLED
    assert 0 < cancelled.frames_rendered < cancelled.frames_total
    assert export.status == metering_pb2.EXPORT_STATUS_CANCELLED
    assert usage.used == 0
    assert not list((tmp_path / "renders").glob("*"))


async def test_a_full_renderer_refuses_a_start_before_reserving_while_retries_of_its_jobs_still_answer(
    metering_target: str, tmp_path: Path
) -> None:
    def long_request(key: str) -> renderer_pb2.StartRenderRequest:
        request = start_request(key, user="fay", width=640, height=480, fps=30, duration_seconds=25)
        request.composition.clips[0].duration = 25
        return request

    refused_before = renderer_metrics.sample_value("renderer_starts_refused_total", {"reason": "busy"})
    async with (
        start_renderer(metering_target, tmp_path, RENDER_CONCURRENCY="1", RENDER_MAX_WAITING="1") as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        rendering = await stub.StartRender(long_request("first"))
        waiting = await stub.StartRender(long_request("second"))
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.StartRender(long_request("third"))
        retried = await stub.StartRender(long_request("second"))  # a retry is an answer, not a new render
        states = [(await stub.GetRender(renderer_pb2.GetRenderRequest(job_id=j.job_id))).state
                  for j in (rendering, waiting)]
        for job in (waiting, rendering):
            await stub.CancelRender(renderer_pb2.CancelRenderRequest(job_id=job.job_id))
        exports = await exports_of(metering, "fay")
    refused = renderer_metrics.sample_value("renderer_starts_refused_total", {"reason": "busy"}) - refused_before

    assert full.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "full" in full.value.details() and "nothing was reserved" in full.value.details()
    assert retried.job_id == waiting.job_id
    assert states == [Job.RENDERING, Job.QUEUED]
    assert sorted(e.idempotency_key for e in exports) == ["first", "second"]  # the refused one used no quota
    assert refused == 1


async def test_watch_streams_progress_and_ends_in_a_terminal_state(metering_target: str, tmp_path: Path) -> None:
    async with start_renderer(metering_target, tmp_path) as running, renderer_stub(running.target) as stub:
        job = await stub.StartRender(start_request("watched", duration_seconds=3, fps=25))
        updates = [u async for u in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job.job_id))]
        fetched = await stub.GetRender(renderer_pb2.GetRenderRequest(job_id=job.job_id))

    assert len(updates) >= 2
    progress = [u.progress for u in updates]
    assert progress == sorted(progress)
    assert updates[-1].state == Job.SUCCEEDED and updates[-1].progress == 1.0
    assert all(u.state != Job.SUCCEEDED for u in updates[:-1])
    assert fetched == updates[-1]


async def test_the_same_idempotency_key_returns_the_same_job_and_one_export(
    metering_target: str, tmp_path: Path
) -> None:
    async with (
        start_renderer(metering_target, tmp_path) as running,
        renderer_stub(running.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        first, second = await asyncio.gather(
            stub.StartRender(start_request("same", user="dave")), stub.StartRender(start_request("same", user="dave"))
        )
        await wait_terminal(stub, first.job_id)
        third = await stub.StartRender(start_request("same", user="dave"))
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.StartRender(start_request("same", user="dave", fmt="gif"))
        exports = await exports_of(metering, "dave")

    assert first.job_id == second.job_id == third.job_id
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(exports) == 1


async def test_a_retry_after_a_renderer_restart_reports_the_finished_render_without_rendering_again(
    metering_target: str, tmp_path: Path
) -> None:
    async with start_renderer(metering_target, tmp_path) as first, renderer_stub(first.target) as stub:
        finished = await wait_terminal(stub, (await stub.StartRender(start_request("retry", user="gus"))).job_id)
    output = Path(urlparse(finished.output_uri).path)
    written_at = output.stat().st_mtime_ns
    async with (
        start_renderer(metering_target, tmp_path) as second,
        renderer_stub(second.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        again = await stub.StartRender(start_request("retry", user="gus"))
        exports = await exports_of(metering, "gus")

    assert again.state == Job.SUCCEEDED
    assert (again.export_id, again.output_uri, again.file_size_bytes) == (
        finished.export_id, finished.output_uri, finished.file_size_bytes
    )
    assert output.stat().st_mtime_ns == written_at  # not rendered a second time
    assert len(exports) == 1


async def test_the_same_key_with_another_composition_after_a_restart_is_already_exists(
    metering_target: str, tmp_path: Path
) -> None:
    """The restarted renderer has forgotten the first request; metering has not, through the request digest:
    another composition of the same length, size and format under the same key is ALREADY_EXISTS (not the
    first render's result), nothing is rendered, and the first request itself still replays."""
    async with start_renderer(metering_target, tmp_path) as first, renderer_stub(first.target) as stub:
        finished = await wait_terminal(stub, (await stub.StartRender(start_request("reused", user="hal"))).job_id)
    other = start_request("reused", user="hal", background="white")
    async with (
        start_renderer(metering_target, tmp_path) as second,
        renderer_stub(second.target) as stub,
        metering_stub(metering_target) as metering,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await stub.StartRender(other)
        again = await stub.StartRender(start_request("reused", user="hal"))
        exports = await exports_of(metering, "hal")

    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idempotency_key 'reused'" in conflict.value.details()
    assert "different request" in conflict.value.details()
    assert (again.state, again.export_id, again.output_uri) == (Job.SUCCEEDED, finished.export_id, finished.output_uri)
    assert len(exports) == 1
    assert [path.name for path in (tmp_path / "renders").iterdir()] == [Path(urlparse(finished.output_uri).path).name]


async def test_metering_unreachable_means_unavailable_and_nothing_rendered(tmp_path: Path) -> None:
    async with start_renderer("127.0.0.1:1", tmp_path) as running, renderer_stub(running.target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartRender(start_request("nometering"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not (tmp_path / "renders").exists() or not list((tmp_path / "renders").iterdir())


async def test_a_completion_made_while_metering_is_down_arrives_after_it_returns(
    database_url: str, tmp_path: Path
) -> None:
    async with start_metering(database_url) as metering_server:
        target = metering_server.target
        listen = target
        async with start_renderer(target, tmp_path) as running, renderer_stub(running.target) as stub:
            job = await stub.StartRender(start_request("outage", user="erin", duration_seconds=2))
            await metering_server.stop()
            finished = await wait_terminal(stub, job.job_id)
            assert finished.state == Job.SUCCEEDED
            assert running.outbox.depth() == 1
            async with start_metering(database_url, listen=listen), metering_stub(target) as metering:
                await _until(lambda: running.outbox.depth() == 0)
                (export,) = await exports_of(metering, "erin")
    assert export.status == metering_pb2.EXPORT_STATUS_COMPLETED
    assert export.file_size_bytes == finished.file_size_bytes


async def test_a_pending_completion_survives_a_renderer_restart(database_url: str, tmp_path: Path) -> None:
    async with start_metering(database_url) as metering_server:
        target = metering_server.target
        async with start_renderer(target, tmp_path) as running, renderer_stub(running.target) as stub:
            job = await stub.StartRender(start_request("restart", user="fay", duration_seconds=2))
            await metering_server.stop()
            finished = await wait_terminal(stub, job.job_id)
            assert running.outbox.depth() == 1
        # The first renderer is gone, its completion waiting out a long backoff; a new one on the same state
        # directory delivers it at once.
        with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as outbox:
            outbox.execute("UPDATE pending_completions SET next_attempt_at = ?", (time.time() + 3600,))
        async with start_metering(database_url, listen=target), start_renderer(target, tmp_path) as second:
            await _until(lambda: second.outbox.depth() == 0, timeout=10)
            async with metering_stub(target) as metering:
                (export,) = await exports_of(metering, "fay")
    assert export.status == metering_pb2.EXPORT_STATUS_COMPLETED
    assert export.output_uri == finished.output_uri


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: setattr(r, "user_id", ""), "user_id"),
        (lambda r: setattr(r, "project_id", "p" * 500), "project_id"),
        (lambda r: setattr(r, "idempotency_key", ""), "idempotency_key"),
        (lambda r: setattr(r, "format", "avi"), "format"),
        (lambda r: r.ClearField("composition"), "composition"),
        (lambda r: setattr(r.composition, "width", 0), "composition.width"),
        (lambda r: setattr(r.composition, "fps", 500), "composition.fps"),
        (lambda r: setattr(r.composition, "duration_seconds", float("nan")), "composition.duration_seconds"),
        (lambda r: setattr(r.composition.texts[0], "text", "x" * 10_000), "composition.texts[0].text"),
        (lambda r: setattr(r.composition.clips[0], "source", "../../etc/passwd"), "composition.clips[0].source"),
        (lambda r: setattr(r.composition.clips[0], "source", "s3://not-allowed/a.mp4"), "composition.clips[0].source"),
        (lambda r: setattr(r.composition, "background", "red'; rm -rf /"), "composition.background"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    metering_target: str, tmp_path: Path, change, field: str
) -> None:
    request = start_request("bad")
    change(request)
    async with start_renderer(metering_target, tmp_path) as running, renderer_stub(running.target) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartRender(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in refused.value.details()


async def test_unknown_job_is_not_found_and_empty_job_id_invalid(metering_target: str, tmp_path: Path) -> None:
    async with start_renderer(metering_target, tmp_path) as running, renderer_stub(running.target) as stub:
        for call in (stub.GetRender, stub.CancelRender):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await call(renderer_pb2.GetRenderRequest(job_id="nope") if call is stub.GetRender
                           else renderer_pb2.CancelRenderRequest(job_id="nope"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            async for _ in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id="")):
                pass
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "job_id" in empty.value.details()


async def _until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
