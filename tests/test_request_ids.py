"""One render can be followed through both services' logs by its request id."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exportapi.renderer.v1 import renderer_pb2
from metering.logs import install_request_ids
from tests.support.renderer import renderer_stub, start_renderer, tiny_composition, wait_terminal


async def test_the_callers_request_id_reaches_metering_and_every_log_line_of_the_render(
    metering_target: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_request_ids()
    caplog.set_level(logging.INFO)
    async with start_renderer(metering_target, tmp_path) as running, renderer_stub(running.target) as stub:
        request = renderer_pb2.StartRenderRequest(
            idempotency_key="traced", user_id="tracy", project_id="p", composition=tiny_composition(), format="gif"
        )
        job = await stub.StartRender(request, metadata=(("x-request-id", "trace-42"),))
        finished = await wait_terminal(stub, job.job_id)

    traced = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-42"]
    messages = {(r.name.split(".")[0], r.getMessage()) for r in traced}
    assert ("renderer", "render queued") in messages
    assert ("renderer", "render finished") in messages
    # Metering's one line per call names the export: the reservation, and the completion sent after the render.
    calls = {
        (r.rpc, r.code, getattr(r, "export_id", None), getattr(r, "user_id", None))  # type: ignore[attr-defined]
        for r in traced
        if r.name.startswith("metering") and r.getMessage() == "rpc"
    }
    assert ("CheckAndReserve", "OK", finished.export_id, "tracy") in calls
    assert ("Complete", "OK", finished.export_id, "tracy") in calls


async def test_calls_without_a_request_id_get_one_of_their_own(
    metering_target: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_request_ids()
    caplog.set_level(logging.INFO)
    async with start_renderer(metering_target, tmp_path) as running, renderer_stub(running.target) as stub:
        request = renderer_pb2.StartRenderRequest(
            idempotency_key="untraced", user_id="u", project_id="p", composition=tiny_composition(), format="gif"
        )
        job = await stub.StartRender(request)
        await wait_terminal(stub, job.job_id)
    (queued,) = [r for r in caplog.records if r.getMessage() == "render queued"]
    reserved = [r for r in caplog.records if r.getMessage() == "rpc" and r.rpc == "CheckAndReserve"]  # type: ignore[attr-defined]
    assert len(queued.request_id) == 32
    assert [r.request_id for r in reserved] == [queued.request_id]
