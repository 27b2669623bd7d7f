"""Both services' /metrics endpoints report what their callers just did."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exportapi.renderer.v1 import renderer_pb2
from tests.support.faults import until
from tests.support.metering import metering_stub, reserve_request, start_metering
from tests.support.renderer import renderer_stub, start_renderer, tiny_composition, wait_terminal


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metering_metrics_count_reservations_denials_and_rpc_codes(database_url: str) -> None:
    port = free_port()
    async with start_metering(database_url, env={"METERING_METRICS_LISTEN": f"127.0.0.1:{port}"}) as server:
        before = scrape(port)
        async with metering_stub(server.target) as stub:
            for n in range(4):
                with pytest.raises(grpc.aio.AioRpcError) if n == 3 else contextlib.nullcontext():
                    await stub.CheckAndReserve(reserve_request(f"m{n}", user="metrics-user"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.CheckAndReserve(reserve_request("long", user="other", seconds=999))
        after = scrape(port)

    assert delta(before, after, "metering_exports_total", status="reserved", mode="local", format="mp4") == 3
    assert delta(before, after, "metering_denials_total", tier="free", reason="daily_limit") == 1
    assert delta(before, after, "metering_denials_total", tier="free", reason="duration") == 1
    call = dict(grpc_service="exportapi.metering.v1.Metering", grpc_method="CheckAndReserve")
    assert delta(before, after, "grpc_server_handled_total", **call, grpc_code="RESOURCE_EXHAUSTED") == 1
    assert value(after, "metering_database_up") == 1


async def test_renderer_metrics_count_jobs_and_render_time(metering_target: str, tmp_path: Path) -> None:
    port = free_port()
    async with (
        start_renderer(metering_target, tmp_path, RENDERER_METRICS_LISTEN=f"127.0.0.1:{port}") as running,
        renderer_stub(running.target) as stub,
    ):
        before = scrape(port)
        job = await stub.StartRender(
            renderer_pb2.StartRenderRequest(
                idempotency_key="metrics", user_id="u", project_id="p", composition=tiny_composition(), format="gif"
            )
        )
        assert (await wait_terminal(stub, job.job_id)).state == renderer_pb2.RenderJob.SUCCEEDED
        after = scrape(port)

    assert delta(before, after, "renderer_jobs_total", mode="local", format="gif", state="succeeded") == 1
    timed = dict(mode="local", format="gif", outcome="succeeded")
    assert delta(before, after, "renderer_render_seconds_count", **timed) == 1
    assert value(after, "renderer_jobs_in_progress", mode="local") == 0
    assert value(after, "renderer_outbox_depth") == 0


async def test_renderer_metrics_show_whether_metering_is_usable_with_no_caller(
    metering_target: str, tmp_path: Path
) -> None:
    # Without metering a renderer is NOT_SERVING, so no starts reach it to count as refused: the alert reads
    # the health loop's verdict instead, and it must be there without a single call.
    port = free_port()
    async with start_renderer(metering_target, tmp_path / "up", RENDERER_METRICS_LISTEN=f"127.0.0.1:{port}"):
        await until(lambda: value(scrape(port), "renderer_metering_usable") == 1, timeout=10, what="usable")
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    async with start_renderer(gone, tmp_path / "down", RENDERER_METRICS_LISTEN=f"127.0.0.1:{port}"):
        before = scrape(port)
        await until(lambda: value(scrape(port), "renderer_metering_usable") == 0, timeout=10, what="unusable")
        after = scrape(port)

    # No caller: the counter (shared by every renderer of this test process) alone would never fire the alert.
    assert delta(before, after, "renderer_metering_unavailable_total") == 0
