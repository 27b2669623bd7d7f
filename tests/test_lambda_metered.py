"""Lambda renders through the one metered path: the renderer's gRPC surface, real metering and PostgreSQL,
the real handler in lambda_local, S3 in moto."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from renderer.media import measure
from tests.support.lambda_env import LambdaEnv, lambda_environment
from tests.support.renderer import renderer_stub, start_renderer, tiny_composition, wait_terminal

Job = renderer_pb2.RenderJob
LAMBDA = metering_pb2.RENDER_MODE_LAMBDA
LOCAL = metering_pb2.RENDER_MODE_LOCAL

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[LambdaEnv]:
    async with lambda_environment(workers=2) as lambda_env:
        yield lambda_env


@pytest.fixture(autouse=True)
async def clean_switches(env: LambdaEnv) -> None:
    await env.configure(throttle_next=0, max_concurrency=None, timeouts={env.function_name: 900}, reset_stats=True)


@contextlib.asynccontextmanager
async def services(
    env: LambdaEnv, metering_target: str, state_root: Path
) -> AsyncIterator[tuple[renderer_pb2_grpc.RendererStub, metering_pb2_grpc.MeteringStub]]:
    async with (
        start_renderer(
            metering_target, state_root,
            LAMBDA_FUNCTION_NAME=env.function_name, RENDER_BUCKET=env.bucket,
            AWS_ENDPOINT_URL_LAMBDA=env.lambda_endpoint, AWS_ENDPOINT_URL_S3=env.s3_endpoint, AWS_REGION="us-east-1",
            RENDER_LAMBDA_CHUNK_SECONDS="1", RENDER_LAMBDA_MAX_CONCURRENCY="2",
        ) as running,
        renderer_stub(running.target) as renderer,
        grpc.aio.insecure_channel(metering_target) as channel,
    ):
        yield renderer, metering_pb2_grpc.MeteringStub(channel)


def request(key: str, user: str, mode: int = LAMBDA, *, seconds: float = 1.0, audio: bool = False,
            source: str = "testsrc:") -> renderer_pb2.StartRenderRequest:
    composition = tiny_composition(seconds)
    composition.clips[0].source = source
    if not audio:
        del composition.audio[:]
    return renderer_pb2.StartRenderRequest(
        idempotency_key=key, user_id=user, project_id="demo", composition=composition, format="mp4", mode=mode
    )


async def ledger(metering: metering_pb2_grpc.MeteringStub, user: str) -> list[metering_pb2.Export]:
    answer = await metering.ListExports(metering_pb2.ListExportsRequest(user_id=user, page_size=100))
    return list(answer.exports)


async def usage(metering: metering_pb2_grpc.MeteringStub, user: str) -> metering_pb2.Usage:
    return (await metering.GetUsage(metering_pb2.GetUsageRequest(user_id=user))).usage


async def test_a_fanned_out_lambda_render_is_recorded_as_lambda(
    env: LambdaEnv, metering_target: str, tmp_path: Path
) -> None:
    async with services(env, metering_target, tmp_path) as (renderer, metering):
        started = await renderer.StartRender(request("k1", "ann", seconds=3.0, audio=True))
        job = await wait_terminal(renderer, started.job_id)
        [export] = await ledger(metering, "ann")

    assert job.state == Job.SUCCEEDED, job.error
    assert job.mode == LAMBDA
    assert job.output_uri == f"s3://{env.bucket}/renders/{job.export_id}.mp4"
    assert (job.chunks_done, job.chunks_total) == (3, 3)
    assert export.export_id == job.export_id
    assert export.status == metering_pb2.EXPORT_STATUS_COMPLETED
    assert export.render_mode == LAMBDA
    assert export.output_uri == job.output_uri
    path = tmp_path / "out.mp4"
    env.s3_client().download_file(env.bucket, f"renders/{job.export_id}.mp4", str(path))
    assert export.file_size_bytes == job.file_size_bytes == path.stat().st_size
    info = measure(path)
    assert info.frames == 30 and info.has_audio
    assert export.duration_seconds == pytest.approx(3.0, abs=0.05)


async def test_local_and_lambda_renders_share_one_daily_quota(
    env: LambdaEnv, metering_target: str, tmp_path: Path
) -> None:
    async with services(env, metering_target, tmp_path) as (renderer, metering):
        for key, mode in (("a", LAMBDA), ("b", LOCAL), ("c", LAMBDA)):
            job = await wait_terminal(renderer, (await renderer.StartRender(request(key, "bo", mode))).job_id)
            assert job.state == Job.SUCCEEDED, job.error
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await renderer.StartRender(request("d", "bo", LAMBDA))
        exports = await ledger(metering, "bo")
        assert (await usage(metering, "bo")).used == 3

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(e.render_mode for e in exports) == sorted([LAMBDA, LOCAL, LAMBDA])
    assert (await env.state())["stats"]["invocations"] == {env.function_name: 2}  # the refused one never ran


async def test_a_throttled_render_is_rendered_and_counted_once(
    env: LambdaEnv, metering_target: str, tmp_path: Path
) -> None:
    await env.configure(throttle_next=3)
    async with services(env, metering_target, tmp_path) as (renderer, metering):
        job = await wait_terminal(renderer, (await renderer.StartRender(request("t", "cy", seconds=2.0))).job_id)
        exports = await ledger(metering, "cy")
        used = (await usage(metering, "cy")).used

    assert job.state == Job.SUCCEEDED, job.error
    assert [e.status for e in exports] == [metering_pb2.EXPORT_STATUS_COMPLETED]
    assert used == 1
    stats = (await env.state())["stats"]
    assert stats["throttled"] == 3
    assert stats["invocations"] == {env.function_name: 3}  # 2 chunks + join, each exactly once


@pytest.mark.parametrize("failure", ["function error", "timeout"])
async def test_a_failed_lambda_render_is_failed_in_the_ledger_and_frees_its_slot(
    env: LambdaEnv, metering_target: str, tmp_path: Path, failure: str
) -> None:
    if failure == "timeout":
        await env.configure(timeouts={env.function_name: 0.3})
        bad = request("f", "di")
        # Far too big to finish in 0.3 s (it is killed then, so it stays cheap).
        bad.composition.width, bad.composition.height, bad.composition.fps = 1920, 1080, 30
        expected = "Task timed out"
    else:
        bad = request("f", "di", source=f"s3://{env.bucket}/sources/missing.mp4")
        expected = "missing.mp4"
    async with services(env, metering_target, tmp_path) as (renderer, metering):
        job = await wait_terminal(renderer, (await renderer.StartRender(bad)).job_id)
        [export] = await ledger(metering, "di")
        after = await usage(metering, "di")

    assert job.state == Job.FAILED
    assert expected in job.error
    assert export.status == metering_pb2.EXPORT_STATUS_FAILED
    assert export.render_mode == LAMBDA
    assert expected in export.error
    assert (after.used, after.in_flight) == (0, 0)
