"""LambdaBackend end to end: the real handler in lambda_local's workers, renders landing in moto S3.

Renders are tiny (160x120, 10 fps) and short; a "long" video is 3 s with 1 s chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from renderer.domain import (
    RESERVATION_SEAL,
    AudioLayer,
    Clip,
    Composition,
    OutputFormat,
    Progress,
    RenderAssignment,
    RenderError,
    Reservation,
    TextLayer,
)
from renderer.errors import InvalidArgument, SourceRefused
from renderer.lambda_backend import LambdaBackend, LambdaBackendConfig, LambdaFunctionError, plan_chunks
from renderer.lambda_handler import composition_to_json, parse_event
from renderer.media import decode_frame_rgb, measure
from tests.support.lambda_env import LambdaEnv, lambda_environment

pytestmark = pytest.mark.timeout(180)

CHUNK_SECONDS = 1.0


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[LambdaEnv]:
    async with lambda_environment(workers=2) as lambda_env:
        yield lambda_env


@pytest.fixture(autouse=True)
async def clean_switches(env: LambdaEnv) -> None:
    await env.configure(throttle_next=0, max_concurrency=None, timeouts={env.function_name: 900}, reset_stats=True)


def backend_for(env: LambdaEnv, **overrides: Any) -> LambdaBackend:
    settings: dict[str, Any] = {
        "chunk_seconds": CHUNK_SECONDS,
        "max_concurrency": 2,
        "throttle_base_delay_seconds": 0.05,
        "throttle_max_delay_seconds": 0.5,
    }
    settings.update(overrides)
    return LambdaBackend(LambdaBackendConfig(
        function_name=env.function_name, bucket=env.bucket,
        endpoint_url=env.lambda_endpoint, s3_endpoint_url=env.s3_endpoint, **settings,
    ))


def assignment(composition: Composition, fmt: OutputFormat = OutputFormat.MP4) -> RenderAssignment:
    # Stands in for the job runner's reservation; the metered path is covered in test_lambda_metered.
    reservation = Reservation(f"exp-{uuid.uuid4().hex[:12]}", datetime.now(UTC), RESERVATION_SEAL)
    return RenderAssignment(reservation, composition, fmt)


def tiny(seconds: float, *, audio: bool = True, clips: tuple[Clip, ...] | None = None) -> Composition:
    return Composition(
        width=160, height=120, fps=10, duration_seconds=seconds, background="navy",
        clips=clips if clips is not None else (Clip("testsrc:", 0, 0, seconds),),
        texts=(TextLayer("50% off: {x}", 0, seconds, 8, 8, 16, "white"),),
        audio=(AudioLayer("sine:440", 0, 0.5),) if audio else (),
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[Progress] = []

    async def __call__(self, progress: Progress) -> None:
        self.events.append(progress)


def fetch(env: LambdaEnv, uri: str, directory: Path) -> Path:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    assert bucket == env.bucket
    path = directory / key.rsplit("/", 1)[1]
    env.s3_client().download_file(bucket, key, str(path))
    return path


def keys_under(env: LambdaEnv, prefix: str) -> list[str]:
    listed = env.s3_client().list_objects_v2(Bucket=env.bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


async def test_a_short_mp4_is_one_invocation_and_lands_in_s3(env: LambdaEnv, tmp_path: Path) -> None:
    job = assignment(tiny(1.0))
    progress = Recorder()
    output = await backend_for(env).render(job, progress)

    assert output.uri == f"s3://{env.bucket}/renders/{job.export_id}.mp4"
    path = fetch(env, output.uri, tmp_path)
    assert path.stat().st_size == output.file_size_bytes > 0
    info = measure(path)
    assert info.frames == output.frames == 10
    assert info.duration_seconds == pytest.approx(1.0, abs=0.05)
    assert output.duration_seconds == pytest.approx(1.0, abs=0.05)
    assert info.has_audio
    assert progress.events[-1].fraction == 1.0
    assert (await env.state())["stats"]["invocations"] == {env.function_name: 1}
    # Moved from its attempt's parts (where a render abandoned meanwhile would have left it to expire), typed.
    head = env.s3_client().head_object(Bucket=env.bucket, Key=f"renders/{job.export_id}.mp4")
    assert head["ContentType"] == "video/mp4" and set(head["Metadata"]) == {"render-attempt"}
    assert keys_under(env, f"renders/_parts/{job.export_id}/") == []


@pytest.mark.parametrize("fmt", [OutputFormat.WEBM, OutputFormat.GIF])
async def test_webm_and_gif_render_in_one_invocation_however_long(
    env: LambdaEnv, tmp_path: Path, fmt: OutputFormat
) -> None:
    job = assignment(tiny(2.0, audio=fmt is OutputFormat.WEBM), fmt)
    output = await backend_for(env).render(job, Recorder())
    assert output.uri.endswith(f"/renders/{job.export_id}.{fmt.value}")
    info = measure(fetch(env, output.uri, tmp_path))
    assert info.duration_seconds == pytest.approx(2.0, abs=0.11)
    assert (await env.state())["stats"]["invocations"] == {env.function_name: 1}


async def test_a_long_mp4_fans_out_and_comes_back_whole(env: LambdaEnv, tmp_path: Path) -> None:
    # Red until 1.5 s, then blue: the switch falls inside the second chunk, so a chunk rendered at the
    # wrong place in the timeline shows the wrong colour.
    seconds = 3.0
    clips = (Clip("color:red", 0, 0, 1.5), Clip("color:blue", 1.5, 0, 1.5))
    job = assignment(tiny(seconds, clips=clips))
    progress = Recorder()
    output = await backend_for(env, max_concurrency=2).render(job, progress)

    path = fetch(env, output.uri, tmp_path)
    info = measure(path)
    assert info.frames == output.frames == 30
    assert info.duration_seconds == pytest.approx(seconds, abs=0.05)
    assert info.audio is not None and info.audio.duration_seconds == pytest.approx(seconds, abs=0.05)
    for frame, colour in ((0, "red"), (14, "red"), (15, "blue"), (29, "blue")):
        assert dominant(path, frame) == colour, f"frame {frame}"

    state = await env.state()
    # 3 chunks + the audio track + the join, never more than RENDER_LAMBDA_MAX_CONCURRENCY at once.
    assert state["stats"]["invocations"] == {env.function_name: 5}
    assert state["stats"]["peak_running"] <= 2
    chunk_steps = [(p.chunks_done, p.chunks_total) for p in progress.events]
    assert chunk_steps[0] == (0, 3) and chunk_steps[-1] == (3, 3)
    assert [done for done, _ in chunk_steps] == sorted(done for done, _ in chunk_steps)
    assert keys_under(env, f"renders/_parts/{job.export_id}/") == []  # the join removed its parts


async def test_an_audio_layer_that_starts_in_the_last_part_of_a_frame_is_silent_in_chunks_too(
    env: LambdaEnv, tmp_path: Path
) -> None:
    # 3.04 s at 10 fps is 30 whole frames, 3.0 s: a layer starting at 3.02 never sounds. A render in one piece
    # leaves it out; in chunks, its audio invocation had nothing to mix and failed the whole render.
    composition = dataclasses.replace(tiny(3.04), audio=(AudioLayer("sine:440", 3.02, 0.5),))
    assert composition.sounding_audio == ()
    output = await backend_for(env, max_concurrency=2).render(assignment(composition), Recorder())

    info = measure(fetch(env, output.uri, tmp_path))
    assert info.frames == output.frames == 30 and info.audio is None
    state = await env.state()
    assert state["stats"]["invocations"] == {env.function_name: 4}  # 3 chunks and the join: no audio track


def dominant(path: Path, frame: int) -> str:
    _, _, rgb = decode_frame_rgb(path, frame)
    # Sample the middle row, away from the text in the corner.
    width = 160
    row = rgb[60 * width * 3 : 61 * width * 3]
    red, blue = sum(row[0::3]) / width, sum(row[2::3]) / width
    return "red" if red > 150 and blue < 80 else "blue" if blue > 150 and red < 80 else f"r{red:.0f} b{blue:.0f}"


async def test_throttled_chunks_are_retried_and_each_renders_once(env: LambdaEnv, tmp_path: Path) -> None:
    await env.configure(throttle_next=3)
    job = assignment(tiny(2.0, audio=False))
    output = await backend_for(env).render(job, Recorder())
    assert measure(fetch(env, output.uri, tmp_path)).frames == 20
    stats = (await env.state())["stats"]
    assert stats["throttled"] == 3
    assert stats["invocations"] == {env.function_name: 3}  # 2 chunks + join, each once


async def test_a_function_error_fails_the_render_with_its_message(env: LambdaEnv) -> None:
    missing = f"s3://{env.bucket}/sources/missing.mp4"
    job = assignment(tiny(1.0, clips=(Clip(missing, 0, 0, 1.0),)))
    with pytest.raises(LambdaFunctionError, match=r"missing\.mp4") as caught:
        await backend_for(env).render(job, Recorder())
    assert isinstance(caught.value, RenderError)
    assert_nothing_left(env, job)


async def test_a_timed_out_chunk_fails_the_whole_render(env: LambdaEnv) -> None:
    await env.configure(timeouts={env.function_name: 0.3})
    # Big enough that no chunk finishes in 0.3 s; each is killed at 0.3 s, so it stays cheap.
    heavy = Composition(width=1920, height=1080, fps=30, duration_seconds=2.0, clips=(Clip("testsrc:", 0, 0, 2.0),))
    job = assignment(heavy)
    with pytest.raises(RenderError, match=r"timed out.*Task timed out after 0\.30 seconds"):
        await backend_for(env).render(job, Recorder())
    await wait_idle(env)
    assert_nothing_left(env, job)
    assert (await env.state())["stats"]["timed_out"] >= 1


async def test_cancelling_leaves_no_output_behind(env: LambdaEnv) -> None:
    job = assignment(tiny(3.0))
    started = asyncio.Event()

    async def on_progress(progress: Progress) -> None:
        started.set()

    task = asyncio.create_task(backend_for(env).render(job, on_progress))
    await started.wait()
    await asyncio.sleep(0.3)  # invocations are running in the workers
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The invocations run to their end (Lambda cannot be stopped); none may upload after the marker.
    await wait_idle(env)
    assert_nothing_left(env, job)


async def test_an_s3_source_is_fetched_by_the_function(env: LambdaEnv, tmp_path: Path) -> None:
    # A red clip rendered by the function becomes the source of the next render.
    red = await backend_for(env).render(
        assignment(tiny(1.0, audio=False, clips=(Clip("color:red", 0, 0, 1.0),))), Recorder()
    )
    first_key = red.uri.split("/", 3)[3]
    env.s3_client().copy_object(
        Bucket=env.bucket, Key="sources/red.mp4", CopySource={"Bucket": env.bucket, "Key": first_key}
    )
    job = assignment(tiny(1.0, audio=False, clips=(Clip(f"s3://{env.bucket}/sources/red.mp4", 0, 0, 1.0),)))
    output = await backend_for(env).render(job, Recorder())
    path = fetch(env, output.uri, tmp_path)
    assert measure(path).frames == 10
    assert dominant(path, 5) == "red"


def test_check_refuses_sources_lambda_cannot_read() -> None:
    backend = LambdaBackend(LambdaBackendConfig("f", "b", source_buckets=frozenset({"media"})))
    backend.check(tiny(1.0, clips=(Clip("s3://media/a.mp4", 0, 0, 1.0),)))
    with pytest.raises(SourceRefused, match=r"composition\.clips\[0\]\.source"):
        backend.check(tiny(1.0, clips=(Clip("clips/a.mp4", 0, 0, 1.0),)))
    with pytest.raises(SourceRefused, match="not allowed"):
        backend.check(tiny(1.0, clips=(Clip("s3://elsewhere/a.mp4", 0, 0, 1.0),)))


def assert_nothing_left(env: LambdaEnv, job: RenderAssignment) -> None:
    """No output, and of the work parts only the marker that tells late handlers not to upload."""
    assert keys_under(env, f"renders/{job.export_id}.") == []
    [marker] = keys_under(env, f"renders/_parts/{job.export_id}/")  # under this render's own attempt
    assert re.fullmatch(rf"renders/_parts/{job.export_id}/[a-z0-9]+/ABANDONED", marker)


async def test_a_render_abandoned_while_another_renders_the_same_export_leaves_the_others_output(
    env: LambdaEnv, tmp_path: Path
) -> None:
    # A start retried on a second renderer is replayed there by metering: the same export renders twice at
    # once. Before, the first one's clean-up deleted the second's finished video (the ledger then pointed at
    # nothing), and its marker failed every later render of the export for a day.
    slow, quick = assignment(tiny(5.0)), assignment(tiny(1.0, audio=False))
    quick = dataclasses.replace(quick, reservation=slow.reservation)  # the same export
    started = asyncio.Event()

    async def on_progress(progress: Progress) -> None:
        started.set()

    first = asyncio.create_task(backend_for(env).render(slow, on_progress))
    await started.wait()
    second = await backend_for(env).render(quick, Recorder())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await wait_idle(env)

    final = f"renders/{slow.export_id}.mp4"
    assert second.uri == f"s3://{env.bucket}/{final}" and keys_under(env, final) == [final]
    assert measure(fetch(env, second.uri, tmp_path)).frames == 10  # the second render's, whole
    third = await backend_for(env).render(quick, Recorder())  # not blocked by the first one's marker
    assert third.uri == second.uri


async def wait_idle(env: LambdaEnv) -> None:
    for _ in range(200):
        if (await env.state())["stats"]["running"] == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("lambda_local still running invocations")


def test_chunks_cover_every_frame_once() -> None:
    assert [(c.first_frame, c.frame_count) for c in plan_chunks(25, 10, 1.0)] == [(0, 10), (10, 10), (20, 5)]
    chunks = plan_chunks(899, 29.97, 10.0)
    assert sum(c.frame_count for c in chunks) == 899
    assert all(b.first_frame == a.first_frame + a.frame_count for a, b in itertools.pairwise(chunks))
    assert [c.index for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"action": "explode"}, "event.action"),
        ({"export_id": "../../etc"}, "event.export_id"),
        ({"attempt": "../other"}, "event.attempt"),
        ({"format": "avi"}, "event.format"),
        ({"composition": {"width": 160}}, "event.composition"),
        ({"composition": {**composition_to_json(tiny(1.0)), "fps": 0}}, "composition.fps"),
        ({"action": "chunk", "index": 0, "first_frame": 5, "frame_count": 10}, "event.frame_count"),
        ({"action": "join", "chunk_count": 0}, "event.chunk_count"),
    ],
)
def test_a_malformed_event_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    event = {"action": "render", "export_id": "e1", "bucket": "b", "format": "mp4",
             "composition": composition_to_json(tiny(1.0))}
    event.update(change)
    with pytest.raises(InvalidArgument) as caught:
        parse_event(event, environ={})
    assert caught.value.field == field


async def test_a_render_under_another_key_prefix_lands_there(env: LambdaEnv) -> None:
    # RENDER_KEY_PREFIX follows the stack's RendersPrefix: the function's role may write nowhere else.
    answer = await backend_for(env, key_prefix="exports/v2/").render(assignment(tiny(1.0)), Recorder())
    key = answer.uri.removeprefix(f"s3://{env.bucket}/")
    assert key.startswith("exports/v2/") and keys_under(env, "exports/v2/") == [key]


def test_a_function_refuses_a_key_prefix_other_than_its_own_naming_the_setting() -> None:
    event = {"action": "render", "export_id": "e1", "bucket": "b", "format": "mp4", "key_prefix": "renders/",
             "composition": composition_to_json(tiny(1.0))}
    with pytest.raises(InvalidArgument) as caught:
        parse_event(event, environ={"RENDER_KEY_PREFIX": "exports/"})
    assert caught.value.field == "event.key_prefix" and "RENDER_KEY_PREFIX" in str(caught.value)
    assert parse_event(event, environ={"RENDER_KEY_PREFIX": "renders/"}).keys.final == "renders/e1.mp4"


async def test_aws_settings_botocore_refuses_fail_the_render_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: NoRegionError escaped the backend, and the job failed as "internal error" with a traceback.
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    backend = LambdaBackend(LambdaBackendConfig(function_name="f", bucket="b", endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(RenderError, match="AWS: You must specify a region"):
        await backend.render(assignment(tiny(1.0)), Recorder())
