"""Test helpers: an in-process renderer server wired to a real metering target."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from renderer.config import RendererConfig
from renderer.server import RunningRenderer, start


def renderer_config(metering_target: str, state_root: Path, **env: str) -> RendererConfig:
    values = {
        "RENDERER_LISTEN": "127.0.0.1:0",
        "METERING_TARGET": metering_target,
        "RENDER_OUTPUT_DIR": str(state_root / "renders"),
        "RENDER_STATE_DIR": str(state_root / "state"),
        "RENDER_CONCURRENCY": "2",
        "RENDER_ASSET_ROOTS": str(state_root / "assets"),
        "METERING_TIMEOUT_SECONDS": "3",
    }
    values.update(env)
    (state_root / "assets").mkdir(parents=True, exist_ok=True)
    return RendererConfig.from_env(values)


@contextlib.asynccontextmanager
async def start_renderer(
    metering_target: str, state_root: Path, *, outbox_max_backoff_seconds: float = 0.5, **env: str
) -> AsyncIterator[RunningRenderer]:
    running = await start(
        renderer_config(metering_target, state_root, **env), outbox_max_backoff_seconds=outbox_max_backoff_seconds
    )
    try:
        yield running
    finally:
        await running.stop(grace_seconds=5)


@contextlib.asynccontextmanager
async def renderer_stub(target: str) -> AsyncIterator[renderer_pb2_grpc.RendererStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield renderer_pb2_grpc.RendererStub(channel)


def tiny_composition(seconds: float = 1.0, **fields: object) -> renderer_pb2.Composition:
    """Small and short, so a render takes well under a second on a shared 2-core machine."""
    composition = renderer_pb2.Composition(
        width=160, height=120, fps=10, duration_seconds=seconds, background="navy"
    )
    composition.clips.add(source="testsrc:", start=0, duration=seconds)
    composition.texts.add(text="hello", start=0, end=seconds, x=8, y=8, font_size=16, color="white")
    composition.audio.add(source="sine:440", start=0, volume=0.5)
    for name, value in fields.items():
        setattr(composition, name, value)
    return composition


async def wait_terminal(stub: renderer_pb2_grpc.RendererStub, job_id: str) -> renderer_pb2.RenderJob:
    last = None
    async for job in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job_id), timeout=120):
        last = job
    assert last is not None
    return last
