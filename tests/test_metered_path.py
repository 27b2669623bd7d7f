"""No code path reaches a render backend without a metering reservation.

Three locks, each checked here: a `Reservation` can only be built with the seal, which only the metering
client uses; only the job runner turns a reservation into a `RenderAssignment` and calls a backend; and every
backend refuses anything that is not a `RenderAssignment`.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from exportapi.metering.v1 import metering_pb2
from renderer.domain import (
    AudioLayer,
    Clip,
    Composition,
    OutputFormat,
    RenderAssignment,
    RenderMode,
    RenderOutput,
    TextLayer,
)
from renderer.ffmpeg_graph import ffmpeg_exe
from renderer.jobs import Draining, JobRunner, JobState, RenderRequest
from renderer.lambda_backend import LambdaBackend, LambdaBackendConfig
from renderer.local_backend import LocalBackend
from renderer.metering_client import GrpcMeteringClient
from renderer.metering_port import MeteringRejected, MeteringUnavailable, ReserveRequest
from renderer.outbox import Outbox
from tests.support.metering import metering_stub, start_metering

RENDERER = Path(__file__).resolve().parent.parent / "renderer"


def _uses(name: str) -> dict[str, int]:
    """Modules of the renderer package that mention `name` as a name or attribute (outside domain.py)."""
    found: dict[str, int] = {}
    for path in sorted(RENDERER.glob("*.py")):
        if path.name == "domain.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Name) and node.id == name) or (
                isinstance(node, ast.Attribute) and node.attr == name
            ):
                found[path.name] = found.get(path.name, 0) + 1
    return found


def test_only_the_metering_client_can_seal_a_reservation() -> None:
    assert set(_uses("RESERVATION_SEAL")) == {"metering_client.py"}


def test_only_the_job_runner_builds_assignments() -> None:
    assert set(_uses("RenderAssignment")) - {"local_backend.py", "lambda_backend.py"} == {"jobs.py"}


def test_backends_are_called_only_by_the_job_runner() -> None:
    """`.render(` on anything called a backend appears in jobs.py and nowhere else in the package."""
    callers = set()
    for path in sorted(RENDERER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "render"
                and "backend" in ast.unparse(node.func.value).lower()
            ):
                callers.add(path.name)
    assert callers == {"jobs.py"}


@dataclasses.dataclass
class _Unreserved:
    composition: Composition
    format: OutputFormat
    export_id: str = "sneaky"


@pytest.mark.parametrize("make_backend", ["local", "lambda"])
async def test_every_backend_refuses_work_without_a_reservation(make_backend: str, tmp_path: Path) -> None:
    if make_backend == "local":
        backend = LocalBackend(tmp_path / "out")
    else:
        backend = LambdaBackend(LambdaBackendConfig(function_name="f", bucket="b", endpoint_url="http://127.0.0.1:1"))
    work = _Unreserved(Composition(width=160, height=120, fps=10, duration_seconds=1), OutputFormat.MP4)
    with pytest.raises(PermissionError):
        await backend.render(work, lambda progress: None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@contextlib.asynccontextmanager
async def local_runner(metering_target: str, root: Path) -> AsyncIterator[JobRunner]:
    """A job runner as the renderer wires it (metering client, outbox, local backend), closed afterwards."""
    client = GrpcMeteringClient(metering_target, timeout_seconds=5.0)
    outbox = Outbox(root / "state" / "outbox.sqlite3", client.complete)
    outbox.start()
    try:
        yield JobRunner(client, outbox, {RenderMode.LOCAL: LocalBackend(root / "renders")})
    finally:
        await outbox.close()
        await client.close()


def small_render(key: str, user: str) -> RenderRequest:
    composition = Composition(width=64, height=64, fps=5.0, duration_seconds=1.0, background="black")
    return RenderRequest(idempotency_key=key, user_id=user, project_id="p", composition=composition,
                         format=OutputFormat.MP4)


async def ledger_of(metering_target: str, user: str) -> list[tuple[str, int]]:
    async with metering_stub(metering_target) as stub:
        answer = await stub.ListExports(metering_pb2.ListExportsRequest(user_id=user))
    return [(export.idempotency_key, export.status) for export in answer.exports]


async def test_a_job_cancelled_before_its_task_first_runs_still_closes_its_export(
    metering_target: str, tmp_path: Path
) -> None:
    """CancelRender can reach a job whose task has not taken its first step (start() returns without
    yielding): the reservation must still be closed as CANCELLED, not left RESERVED until its lease ends."""
    async with local_runner(metering_target, tmp_path) as runner:
        job = await runner.start(small_render("early", "eve"))
        cancelled = await runner.cancel(job.job_id)
        await runner.shutdown(5)
    assert cancelled.state is JobState.CANCELLED
    assert await ledger_of(metering_target, "eve") == [("early", metering_pb2.EXPORT_STATUS_CANCELLED)]


async def test_a_shutdown_renders_and_closes_a_start_that_was_reserving_and_starts_nothing_new(
    metering_target: str, tmp_path: Path
) -> None:
    """A StartRender whose reservation is on its way when the drain begins has an export in the ledger: its
    render is drained like the others (not dropped with the export left RESERVED); a later one is refused."""
    async with local_runner(metering_target, tmp_path) as runner:
        starting = asyncio.create_task(runner.start(small_render("reserving", "ivy")))
        await asyncio.sleep(0)  # the start is now waiting for metering's answer
        assert not starting.done()
        await runner.shutdown(30)
        assert starting.done(), "the drain ended before the start it found under way"
        job = runner.get(starting.result().job_id)
        with pytest.raises(Draining):
            await runner.start(small_render("too-late", "ivy"))
    assert job.state is JobState.SUCCEEDED
    assert await ledger_of(metering_target, "ivy") == [("reserving", metering_pb2.EXPORT_STATUS_COMPLETED)]


async def test_the_same_key_with_another_composition_on_another_renderer_is_already_exists(
    metering_target: str, tmp_path: Path
) -> None:
    """Two renderers share only metering. The request digest makes it refuse the same key with another
    composition of the same length, size and format, while the first render is still RESERVED (before, the
    second renderer rendered it under the first one's export) and after it finished; nothing renders for it."""
    original = small_render("shared", "otto")
    other = dataclasses.replace(original, composition=dataclasses.replace(original.composition, background="white"))
    async with (
        local_runner(metering_target, tmp_path / "one") as one,
        local_runner(metering_target, tmp_path / "two") as two,
    ):
        job = await one.start(original)
        with pytest.raises(MeteringRejected) as while_reserved:
            await two.start(other)
        await one.shutdown(30)  # the first render ends and its completion is sent
        with pytest.raises(MeteringRejected) as after:
            await two.start(other)
        replayed = await two.start(original)
        await two.shutdown(5)
    for refusal in (while_reserved.value, after.value):
        assert refusal.code_name == "ALREADY_EXISTS" and refusal.permanent
        assert job.export_id in str(refusal)
    assert (replayed.state, replayed.export_id) == (JobState.SUCCEEDED, job.export_id)
    assert await ledger_of(metering_target, "otto") == [("shared", metering_pb2.EXPORT_STATUS_COMPLETED)]
    assert len(list((tmp_path / "one" / "renders").iterdir())) == 1
    assert not (tmp_path / "two" / "renders").exists() or not list((tmp_path / "two" / "renders").iterdir())


def test_the_request_digest_is_stable_and_follows_the_runners_own_idea_of_the_same_request() -> None:
    """Renderers of different versions and processes must agree on a request's digest, or their retries of one
    render would be refused: the value is pinned, and requests equal for the job runner digest alike."""
    def digest(composition: Composition, fmt: OutputFormat = OutputFormat.MP4) -> str:
        return ReserveRequest("k", "u", "p", RenderMode.LOCAL, fmt, composition).digest()

    base = Composition(
        width=64, height=64, fps=5.0, duration_seconds=1.0, clips=(Clip(source="testsrc:"),),
        texts=(TextLayer(text="hi", x=4),),
    )
    same = dataclasses.replace(base, fps=5, clips=(Clip(source="testsrc:", start=-0.0),))
    assert same == base and digest(same) == digest(base)
    assert digest(base) == "71a6592e1ec52d58af4ebb8690efaf014317b000776db3b2d41af3326c6308b5"
    for changed in (
        dataclasses.replace(base, texts=(TextLayer(text="ho", x=4),)),
        dataclasses.replace(base, background="white"),
        dataclasses.replace(base, audio=(AudioLayer(source="sine:440"),)),
    ):
        assert digest(changed) != digest(base)
    assert digest(base, OutputFormat.GIF) != digest(base)


async def test_a_start_whose_caller_gives_up_while_reserving_still_becomes_its_job(
    metering_target: str, tmp_path: Path
) -> None:
    """A caller's deadline or cancel can land while metering is reserving, after metering committed: the
    reservation must not be abandoned RESERVED until its lease runs out (before, the call to metering was
    cancelled half-way). It becomes a job, rendered and closed even if nobody asks again, and a retry with
    the same key gets that job."""
    async with local_runner(metering_target, tmp_path) as runner:
        caller = asyncio.create_task(runner.start(small_render("gave-up", "una")))
        await asyncio.sleep(0)  # the start is waiting for metering's answer
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await runner.shutdown(30)  # nobody retries: the drain finds the start, then its render
        retried = await runner.start(small_render("gave-up", "una"))  # a replay, answered while draining
    assert retried.state is JobState.SUCCEEDED
    assert await ledger_of(metering_target, "una") == [("gave-up", metering_pb2.EXPORT_STATUS_COMPLETED)]


async def test_a_source_gone_after_its_start_fails_the_render_naming_it_and_a_retry_still_gets_the_job(
    metering_target: str, tmp_path: Path
) -> None:
    """Sources are checked at start; one removed before the render reads it fails that render with the field
    named (the caller's error, not "internal error" with a crash logged), and the export is closed FAILED. A
    retry of the same start is a replay: it gets the job, not INVALID_ARGUMENT for the source now missing."""
    assets = tmp_path / "assets"
    assets.mkdir()
    picture = assets / "picture.png"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=32x32:d=0.1", "-frames:v", "1",
         str(picture)],
        check=True,
    )
    client = GrpcMeteringClient(metering_target, timeout_seconds=5.0)
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3", client.complete)
    outbox.start()
    backend = LocalBackend(tmp_path / "renders", asset_roots=[assets])
    runner = JobRunner(client, outbox, {RenderMode.LOCAL: backend}, concurrency=1)
    try:
        # One slot, taken by a longer render: the second waits for it, its source not read yet.
        busy = dataclasses.replace(small_render("busy", "vic"), composition=Composition(
            width=320, height=240, fps=25.0, duration_seconds=20.0, clips=(Clip("testsrc:", 0, 0, 20.0),)
        ))
        await runner.start(busy)
        request = dataclasses.replace(small_render("picture", "vic"), composition=Composition(
            width=64, height=64, fps=5.0, duration_seconds=1.0, clips=(Clip("picture.png", 0, 0, 1.0),)
        ))
        job = await runner.start(request)
        picture.unlink()
        await runner.shutdown(60)
        failed = runner.get(job.job_id)
        retried = await runner.start(request)
    finally:
        await outbox.close()
        await client.close()
    assert failed.state is JobState.FAILED
    assert failed.error.startswith("composition.clips[0].source:") and "internal error" not in failed.error
    assert retried.job_id == job.job_id
    ledger = dict(await ledger_of(metering_target, "vic"))
    assert ledger["picture"] == metering_pb2.EXPORT_STATUS_FAILED


class _SlowBackend:
    """Stands in for a render that takes `seconds` (no ffmpeg): the heartbeat's timing is what is tested."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def check(self, composition: Composition) -> None:
        pass

    async def render(self, assignment: RenderAssignment, on_progress: object) -> RenderOutput:
        await asyncio.sleep(self.seconds)
        return RenderOutput(uri="file:///nowhere.mp4", file_size_bytes=1, duration_seconds=1.0, frames=5)


class _ExtendFails:
    """The real metering client, with ExtendReservation failing as when metering cannot be reached."""

    def __init__(self, client: GrpcMeteringClient) -> None:
        self._client = client
        self.extend_calls = 0

    async def reserve(self, request: ReserveRequest) -> Any:
        return await self._client.reserve(request)

    async def extend(self, export_id: str) -> Any:
        self.extend_calls += 1
        raise MeteringUnavailable("metering at 127.0.0.1:1 is unreachable (injected)")

    async def complete(self, completion: Any) -> Any:
        return await self._client.complete(completion)


async def test_while_metering_cannot_be_reached_the_heartbeat_backs_off_and_warns_once(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a failed heartbeat was retried every 0.2 s with a warning each time: for every running or
    queued render, five lines a second for as long as metering was away."""
    async with start_metering(database_url, lease_seconds=1.0) as metering:
        client = GrpcMeteringClient(metering.target, timeout_seconds=5.0)
        away = _ExtendFails(client)
        outbox = Outbox(tmp_path / "outbox.sqlite3", client.complete)
        outbox.start()
        try:
            runner = JobRunner(away, outbox, {RenderMode.LOCAL: _SlowBackend(3.6)})  # type: ignore[arg-type]
            with caplog.at_level(logging.INFO, logger="renderer.jobs"):
                job = await runner.start(small_render("heartbeat", "wes"))
                await runner.shutdown(30)
        finally:
            await outbox.close()
            await client.close()
    warnings = [r for r in caplog.records if r.getMessage() == "heartbeat failed"]
    # At a third of the 1 s lease, then 1 s and 2 s later: three tries in 3.6 s (before: about sixteen).
    assert 2 <= away.extend_calls <= 4, away.extend_calls
    assert len(warnings) == 1
    assert runner.get(job.job_id).state is JobState.SUCCEEDED
