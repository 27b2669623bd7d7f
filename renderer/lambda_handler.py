"""The AWS Lambda render function (handler: renderer.lambda_handler.handler).

Event protocol (JSON), sent by renderer.lambda_backend:
  common: {"action", "export_id", "bucket", "key_prefix", "format", "composition"}
  render: the whole output in one invocation                 -> {"bucket", "key", "size", "duration", "frames"}
  chunk:  + {"index", "first_frame", "frame_count"}: h264 video-only frames [first, first+count)
                                                             -> {"bucket", "key", "size", "frames"}
  audio:  the composition's audio track alone                -> {"bucket", "key", "size"}
  join:   + {"chunk_count", "with_audio"}: concat the chunks (no re-encode), mux the audio, check the
          frame count, upload, delete the parts           -> like render

Objects: the output is s3://bucket/<prefix><export id>.<format>; work parts live under
<prefix>_parts/<export id>/ (a lifecycle rule expires them). Keys are derived here from the export id, never
taken from the event. Before each upload the handler checks the parts prefix for the ABANDONED marker the
backend writes when a render fails or is cancelled. `bucket` and `key_prefix` default to the function's
RENDER_BUCKET and RENDER_KEY_PREFIX; s3:// sources are read from the buckets in RENDER_SOURCE_BUCKETS when
set (the function's role decides in the end); RENDER_WORK_DIR overrides the temp dir's parent (/tmp). ffmpeg
is the imageio-ffmpeg wheel's, packed with the code.

Failures raise: `RenderError` (ffmpeg's message, a frame count that does not add up) or `InvalidArgument`
(a malformed event or source); Lambda reports them as the invocation's function error.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from renderer.domain import AudioLayer, Clip, Composition, OutputFormat, RenderError, TextLayer
from renderer.errors import InvalidArgument

ACTION_RENDER = "render"
ACTION_CHUNK = "chunk"
ACTION_AUDIO = "audio"
ACTION_JOIN = "join"
ACTIONS = (ACTION_RENDER, ACTION_CHUNK, ACTION_AUDIO, ACTION_JOIN)
DEFAULT_KEY_PREFIX = "renders/"
MAX_CHUNKS = 10_000

_SAFE_EXPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SAFE_KEY_PREFIX = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*/)*\Z")  # also RENDER_KEY_PREFIX's check at start
_SAFE_ATTEMPT = re.compile(r"^[a-z0-9]{1,32}\Z")
ATTEMPT_METADATA = "render-attempt"  # on an export's final object: the attempt whose renderer moved it there


@dataclass(frozen=True, slots=True)
class RenderKeys:
    """Where the objects of one export live."""

    prefix: str
    export_id: str
    extension: str
    # One render of the export (a renderer's try): two renderers may render the same export at once (a
    # retried start replayed by metering elsewhere), and one's clean-up must not touch the other's objects.
    # Empty: the layout of renderers from before attempts.
    attempt: str = ""

    def __post_init__(self) -> None:
        if not _SAFE_EXPORT_ID.match(self.export_id):
            raise ValueError(f"export id {self.export_id!r} cannot name an S3 object")
        if not SAFE_KEY_PREFIX.match(self.prefix):
            raise ValueError(f"key prefix {self.prefix!r} must be empty or end in '/'")
        if self.attempt and not _SAFE_ATTEMPT.match(self.attempt):
            raise ValueError(f"attempt {self.attempt!r} must be 1-32 of a-z and 0-9")

    @property
    def final(self) -> str:
        return f"{self.prefix}{self.export_id}.{self.extension}"

    @property
    def output(self) -> str:
        """Where the function puts the finished render. With an attempt: in its parts, and the renderer moves it
        to `final` once it takes the answer, so a render abandoned meanwhile leaves nothing outside the parts
        (which expire). Without one (a renderer from before attempts): `final` itself."""
        return f"{self.parts_prefix}output.{self.extension}" if self.attempt else self.final

    @property
    def parts_prefix(self) -> str:
        return f"{self.prefix}_parts/{self.export_id}/" + (f"{self.attempt}/" if self.attempt else "")

    def chunk(self, index: int) -> str:
        return f"{self.parts_prefix}chunk-{index:05d}.mp4"

    @property
    def audio(self) -> str:
        return f"{self.parts_prefix}audio.m4a"

    @property
    def abandoned_marker(self) -> str:
        return f"{self.parts_prefix}ABANDONED"


def composition_to_json(composition: Composition) -> dict[str, Any]:
    return asdict(composition)


def composition_from_json(data: dict[str, Any]) -> Composition:
    return Composition(
        width=int(data["width"]),
        height=int(data["height"]),
        fps=float(data["fps"]),
        duration_seconds=float(data["duration_seconds"]),
        background=str(data.get("background", "black")),
        clips=tuple(Clip(**clip) for clip in data.get("clips", ())),
        texts=tuple(TextLayer(**text) for text in data.get("texts", ())),
        audio=tuple(AudioLayer(**audio) for audio in data.get("audio", ())),
    )


@dataclass(frozen=True, slots=True)
class HandlerRequest:
    action: str
    bucket: str
    keys: RenderKeys
    format: OutputFormat
    composition: Composition
    index: int = 0
    first_frame: int = 0
    frame_count: int = 0
    chunk_count: int = 0
    with_audio: bool = False


def parse_event(event: Any, environ: dict[str, str] | os._Environ[str] = os.environ) -> HandlerRequest:
    """The event, checked; anything malformed is InvalidArgument naming the event field."""
    from renderer.validation import validate_composition

    if not isinstance(event, dict):
        raise InvalidArgument("event", "must be a JSON object")
    action = event.get("action")
    if action not in ACTIONS:
        raise InvalidArgument("event.action", f"must be one of {', '.join(ACTIONS)}")
    bucket = str(event.get("bucket") or environ.get("RENDER_BUCKET") or "")
    if not bucket:
        raise InvalidArgument("event.bucket", "no bucket in the event and RENDER_BUCKET is unset")
    try:
        output_format = OutputFormat(event.get("format"))
    except ValueError:
        raise InvalidArgument("event.format", "must be mp4, webm or gif") from None
    own_prefix = environ.get("RENDER_KEY_PREFIX")
    prefix = event.get("key_prefix")
    if prefix is not None and own_prefix is not None and prefix != own_prefix:
        # The function's role may write only under its own prefix: say so, rather than fail on AccessDenied.
        raise InvalidArgument(
            "event.key_prefix",
            f"{prefix!r} is not this function's RENDER_KEY_PREFIX {own_prefix!r}: set the renderer's "
            "RENDER_KEY_PREFIX to the stack's RendersPrefix",
        )
    prefix = str(prefix if prefix is not None else own_prefix if own_prefix is not None else DEFAULT_KEY_PREFIX)
    attempt = event.get("attempt", "")
    if not isinstance(attempt, str) or (attempt and not _SAFE_ATTEMPT.match(attempt)):
        raise InvalidArgument("event.attempt", "must be 1-32 of a-z and 0-9")
    try:
        keys = RenderKeys(prefix, str(event.get("export_id") or ""), output_format.value, attempt)
    except ValueError as exc:
        raise InvalidArgument("event.export_id", str(exc)) from None
    try:
        composition = composition_from_json(event["composition"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument("event.composition", f"malformed: {exc}") from None
    validate_composition(composition, max_duration_seconds=None)
    fields: dict[str, Any] = {}
    if action == ACTION_CHUNK:
        fields = {name: _int_field(event, name) for name in ("index", "first_frame", "frame_count")}
        if fields["frame_count"] < 1 or fields["first_frame"] + fields["frame_count"] > composition.frames_total:
            raise InvalidArgument("event.frame_count", "the chunk must lie within the composition's frames")
        if output_format is not OutputFormat.MP4:
            raise InvalidArgument("event.format", "only mp4 renders in chunks")
    elif action == ACTION_JOIN:
        fields = {"chunk_count": _int_field(event, "chunk_count"), "with_audio": bool(event.get("with_audio"))}
        if not 1 <= fields["chunk_count"] <= MAX_CHUNKS:
            raise InvalidArgument("event.chunk_count", f"must be 1..{MAX_CHUNKS}")
        if fields["with_audio"] and not composition.sounding_audio:
            raise InvalidArgument("event.with_audio", "the composition has no audio layers that sound")
    elif action == ACTION_AUDIO and not composition.sounding_audio:
        raise InvalidArgument("event.action", "the composition has no audio layers that sound")
    return HandlerRequest(action, bucket, keys, output_format, composition, **fields)


def _int_field(event: dict[str, Any], name: str) -> int:
    value = event.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"event.{name}", "must be a non-negative integer")
    return value


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point."""
    request = parse_event(event)
    return asyncio.run(handle(request))


async def handle(request: HandlerRequest, client: Any = None) -> dict[str, Any]:
    from renderer.s3 import s3_client

    client = client or s3_client()
    work_root = os.environ.get("RENDER_WORK_DIR") or None  # /tmp on Lambda
    with tempfile.TemporaryDirectory(prefix=f"lambda-{request.keys.export_id}-", dir=work_root) as name:
        work = Path(name)
        if request.action == ACTION_RENDER:
            return await _render_whole(request, client, work)
        if request.action == ACTION_CHUNK:
            return await _render_chunk(request, client, work)
        if request.action == ACTION_AUDIO:
            return await _render_audio(request, client, work)
        return await _join(request, client, work)


def _resolver(request: HandlerRequest, client: Any) -> Any:
    from renderer.s3 import Boto3Fetcher
    from renderer.sources import SOURCE_BUCKETS_ENV, SourceResolver, parse_buckets
    from renderer.validation import S3Source, parse_source

    allowed = parse_buckets(os.environ.get(SOURCE_BUCKETS_ENV))
    if not allowed:
        # No allow-list configured: the buckets the composition names; the function's role has the last word.
        c = request.composition
        layers = [(clip.source, False) for clip in c.clips] + [(layer.source, True) for layer in c.audio]
        specs = [parse_source(source, "source", audio=audio) for source, audio in layers]
        allowed = frozenset(spec.bucket for spec in specs if isinstance(spec, S3Source))
    return SourceResolver((), s3_fetcher=Boto3Fetcher(client), s3_buckets=allowed)


async def _upload(request: HandlerRequest, client: Any, path: Path, key: str) -> int:
    from renderer import s3

    if await s3.exists(client, request.bucket, request.keys.abandoned_marker):
        raise RenderError(f"export {request.keys.export_id} was abandoned; not uploading {key}")
    return await s3.upload(client, path, request.bucket, key)


async def _checked(path: Path, frames_expected: int | None, what: str) -> Any:
    from renderer.media import measure_async

    info = await measure_async(path)
    if frames_expected is not None and info.frames != frames_expected:
        raise RenderError(f"{what} has {info.frames} frames, not {frames_expected}")
    return info


def _answer(request: HandlerRequest, key: str, size: int, info: Any) -> dict[str, Any]:
    return {
        "bucket": request.bucket,
        "key": key,
        "size": size,
        "duration": info.duration_seconds,
        "frames": info.frames,
    }


async def _render_whole(request: HandlerRequest, client: Any, work: Path) -> dict[str, Any]:
    from renderer.ffmpeg_run import render_composition

    output = work / f"output.{request.format.value}"
    command = await render_composition(
        request.composition, request.format, output, resolver=_resolver(request, client), work_root=work
    )
    # A gif's muxer may merge identical frames; mp4 and webm must hold every frame.
    expected = None if request.format is OutputFormat.GIF else command.frames_total
    info = await _checked(output, expected, "the render")
    size = await _upload(request, client, output, request.keys.output)
    return _answer(request, request.keys.output, size, info)


async def _render_chunk(request: HandlerRequest, client: Any, work: Path) -> dict[str, Any]:
    from renderer.ffmpeg_run import render_video_chunk

    output = work / "chunk.mp4"
    await render_video_chunk(
        request.composition, request.first_frame, request.frame_count, output,
        resolver=_resolver(request, client), work_root=work,
    )
    info = await _checked(output, request.frame_count, f"chunk {request.index}")
    key = request.keys.chunk(request.index)
    size = await _upload(request, client, output, key)
    return _answer(request, key, size, info)


async def _render_audio(request: HandlerRequest, client: Any, work: Path) -> dict[str, Any]:
    from renderer.ffmpeg_graph import AUDIO_EXTENSION
    from renderer.ffmpeg_run import render_audio_track

    output = work / f"audio.{AUDIO_EXTENSION}"
    await render_audio_track(request.composition, output, resolver=_resolver(request, client), work_root=work)
    info = await _checked(output, None, "the audio track")
    size = await _upload(request, client, output, request.keys.audio)
    return _answer(request, request.keys.audio, size, info)


async def _join(request: HandlerRequest, client: Any, work: Path) -> dict[str, Any]:
    from renderer import s3
    from renderer.ffmpeg_run import join_chunks

    keys = request.keys
    parts = [keys.chunk(index) for index in range(request.chunk_count)]
    if request.with_audio:
        parts.append(keys.audio)
    paths = [work / key.rsplit("/", 1)[1] for key in parts]

    async def fetch(key: str, path: Path) -> None:
        try:
            await s3.download(client, request.bucket, key, path)
        except FileNotFoundError:
            raise RenderError(f"part s3://{request.bucket}/{key} is missing") from None

    await asyncio.gather(*(fetch(key, path) for key, path in zip(parts, paths, strict=True)))
    chunk_paths = paths[: request.chunk_count]
    audio_path = paths[-1] if request.with_audio else None
    output = work / f"output.{request.format.value}"
    await join_chunks(request.composition, chunk_paths, audio_path, output, work_root=work)
    info = await _checked(output, request.composition.frames_total, "the joined render")
    size = await _upload(request, client, output, keys.output)
    await s3.delete(client, request.bucket, parts)
    return _answer(request, keys.output, size, info)
