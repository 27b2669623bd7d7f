"""Running ffmpeg: an argument list as an asyncio subprocess (no shell), with progress and clean stopping.

`run_ffmpeg` is the primitive: it adds `-progress pipe:1 -nostats`, turns ffmpeg's key=value progress blocks
into callbacks, keeps the last lines of stderr for the error message, and on cancellation asks ffmpeg to
stop ('q' on stdin), then SIGTERM, then SIGKILL, before re-raising.

The render functions below are what backends call (the local backend, the Lambda handler):
resolve sources into a private work directory -> build the command -> run it -> remove the work directory,
and remove the (partial) output when anything fails or the task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from renderer.domain import Composition, OutputFormat, Progress, ProgressCallback, RenderError
from renderer.ffmpeg_graph import (
    DEFAULT_SETTINGS,
    EncoderSettings,
    FfmpegCommand,
    build_audio,
    build_join,
    build_render,
    build_video_chunk,
    fps_fraction,
)
from renderer.sources import LocalFile, ResolvedSource, SourceResolver

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
MAX_ERROR_CHARS = 2000
STOP_GRACE_SECONDS = 5.0  # after 'q': ffmpeg finishes the current frame and closes its files
TERMINATE_GRACE_SECONDS = 5.0  # after SIGTERM, before SIGKILL
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class FfmpegProgress:
    """One `-progress` block: output frames so far, output time so far, whether ffmpeg is done."""

    frame: int
    out_time_seconds: float
    done: bool


FfmpegProgressCallback = Callable[[FfmpegProgress], Awaitable[None] | None]


async def run_ffmpeg(
    args: Sequence[str],
    *,
    on_progress: FfmpegProgressCallback | None = None,
    stop_grace_seconds: float = STOP_GRACE_SECONDS,
    terminate_grace_seconds: float = TERMINATE_GRACE_SECONDS,
) -> None:
    """Run `args` (binary first). Raises RenderError with ffmpeg's trimmed error output on a non-zero exit.

    If the calling task is cancelled (or `on_progress` raises), ffmpeg is stopped and the exception
    re-raised; a second cancellation during the stop kills ffmpeg at once."""
    argv = [args[0], "-nostats", "-progress", "pipe:1", "-loglevel", "error", *args[1:]]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: a Ctrl-C in the terminal reaches the server, which stops ffmpeg itself.
            start_new_session=True,
        )
    except OSError as exc:
        raise RenderError(f"cannot start ffmpeg: {exc}") from exc
    assert process.stdout is not None and process.stderr is not None
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    stderr_task = asyncio.create_task(_collect_lines(process.stderr, stderr_tail))
    try:
        await _read_progress(process.stdout, on_progress)
        returncode = await process.wait()
        await stderr_task
    except BaseException:
        stopper = asyncio.create_task(_stop(process, stop_grace_seconds, terminate_grace_seconds))
        try:
            await asyncio.shield(stopper)
        except asyncio.CancelledError:
            _signal(process, signal.SIGKILL)
            raise
        finally:
            stderr_task.cancel()
        raise
    if returncode != 0:
        raise RenderError(_error_message(returncode, stderr_tail))


async def _read_progress(stream: asyncio.StreamReader, on_progress: FfmpegProgressCallback | None) -> None:
    block: dict[str, str] = {}
    async for line in _lines(stream):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        block[key.strip()] = value.strip()
        if key.strip() != "progress":
            continue
        if on_progress is not None:
            update = FfmpegProgress(
                frame=_int(block.get("frame")),
                out_time_seconds=max(0, _int(block.get("out_time_us") or block.get("out_time_ms"))) / 1e6,
                done=block["progress"] == "end",
            )
            result = on_progress(update)
            if inspect.isawaitable(result):
                await result
        block = {}


async def _collect_lines(stream: asyncio.StreamReader, sink: deque[str]) -> None:
    async for line in _lines(stream):
        if line.strip():
            sink.append(line.rstrip())


async def _lines(stream: asyncio.StreamReader):  # -> AsyncIterator[str]
    """Lines of any length (StreamReader.readline gives up past 64 KiB); \\r counts as a line end."""
    pending = b""
    while chunk := await stream.read(_READ_CHUNK):
        pending += chunk.replace(b"\r", b"\n")
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace")
        if len(pending) > 1 << 20:  # a runaway line: keep its end, which holds the message
            pending = pending[-4096:]
    if pending:
        yield pending.decode("utf-8", "replace")


async def _stop(process: asyncio.subprocess.Process, grace: float, terminate_grace: float) -> None:
    if process.returncode is not None:
        return
    if process.stdin is not None:
        with contextlib.suppress(OSError, RuntimeError):
            process.stdin.write(b"q")
            await asyncio.wait_for(process.stdin.drain(), timeout=1.0)
    if await _exited(process, grace):
        return
    log.warning("ffmpeg pid %s ignored 'q'; sending SIGTERM", process.pid)
    _signal(process, signal.SIGTERM)
    if await _exited(process, terminate_grace):
        return
    log.warning("ffmpeg pid %s ignored SIGTERM; sending SIGKILL", process.pid)
    _signal(process, signal.SIGKILL)
    await process.wait()


async def _exited(process: asyncio.subprocess.Process, seconds: float) -> bool:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


def _error_message(returncode: int, tail: deque[str]) -> str:
    text = "\n".join(tail).strip() or "no error output"
    if len(text) > MAX_ERROR_CHARS:
        text = "..." + text[-MAX_ERROR_CHARS:]
    return f"ffmpeg failed (exit {returncode}): {text}"


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:  # "N/A" before the first frame
        return 0


# ------------------------------------------------------------------------------------------ renders


async def render_composition(
    c: Composition,
    fmt: OutputFormat,
    output: Path,
    *,
    resolver: SourceResolver,
    on_progress: ProgressCallback | None = None,
    settings: EncoderSettings = DEFAULT_SETTINGS,
    work_root: Path | None = None,
) -> FfmpegCommand:
    """The whole composition into `output`. Returns the command that ran (for its expected frames and
    duration). The output is removed if the render fails or is cancelled."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_render(c, fmt, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(command.args, on_progress=_frames_progress(command.frames_total, on_progress))
        return command


async def render_video_chunk(
    c: Composition,
    first_frame: int,
    frame_count: int,
    output: Path,
    *,
    resolver: SourceResolver,
    on_progress: ProgressCallback | None = None,
    settings: EncoderSettings = DEFAULT_SETTINGS,
    work_root: Path | None = None,
) -> FfmpegCommand:
    """Frames [first_frame, first_frame + frame_count) as h264 video-only mp4 (see `build_video_chunk`)."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_video_chunk(c, first_frame, frame_count, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(command.args, on_progress=_frames_progress(frame_count, on_progress))
        return command


async def render_audio_track(
    c: Composition,
    output: Path,
    *,
    resolver: SourceResolver,
    on_progress: ProgressCallback | None = None,
    settings: EncoderSettings = DEFAULT_SETTINGS,
    work_root: Path | None = None,
) -> FfmpegCommand:
    """The composition's whole audio track as AAC in .m4a. Raises ValueError without audio layers.
    Progress is reported in composition frames (audio time x fps)."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_audio(c, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(command.args, on_progress=_time_progress(c, on_progress))
        return command


async def join_chunks(
    c: Composition,
    chunk_paths: Sequence[Path],
    audio_path: Path | None,
    output: Path,
    *,
    work_root: Path | None = None,
) -> FfmpegCommand:
    """Concatenate chunk files (in order, no re-encode) and mux the audio track into a fast-start mp4."""
    rate = fps_fraction(c.fps)
    async with _work_dir(work_root, output) as workdir:
        command = build_join(
            chunk_paths,
            audio_path,
            output,
            workdir=workdir,
            frames_total=c.frames_total,
            duration_seconds=float(c.frames_total / rate),
        )
        with _user_facing_errors({}, workdir, output):
            await run_ffmpeg(command.args)
        return command


@contextlib.contextmanager
def _user_facing_errors(sources: Mapping[str, ResolvedSource], workdir: Path, output: Path):  # -> Iterator[None]
    """ffmpeg's error names files by the renderer's paths; the user sees the sources as they wrote them, and
    nothing of the server's directory layout."""
    try:
        yield
    except RenderError as exc:
        replacements = [
            (str(resolved.path), source) for source, resolved in sources.items() if isinstance(resolved, LocalFile)
        ]
        replacements += [(str(output.resolve()), "<output>"), (str(output), "<output>"), (str(workdir), "<work>")]
        message = str(exc)
        for path, shown in sorted(replacements, key=lambda pair: -len(pair[0])):
            message = message.replace("file:" + path, shown).replace(path, shown)
        raise RenderError(message) from exc


@contextlib.asynccontextmanager
async def _work_dir(work_root: Path | None, output: Path):  # -> AsyncIterator[Path]
    """A private directory for text files and downloads; on any failure the output is removed too."""
    with tempfile.TemporaryDirectory(prefix="render-", dir=work_root) as name:
        try:
            yield Path(name)
        except BaseException:
            remove_quietly(output)
            raise


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _frames_progress(total: int, on_progress: ProgressCallback | None) -> FfmpegProgressCallback | None:
    if on_progress is None:
        return None
    callback = on_progress

    def convert(update: FfmpegProgress) -> Awaitable[None] | None:
        return callback(Progress(min(update.frame, total), total))

    return convert


def _time_progress(c: Composition, on_progress: ProgressCallback | None) -> FfmpegProgressCallback | None:
    if on_progress is None:
        return None
    callback = on_progress
    rate = fps_fraction(c.fps)
    total = c.frames_total

    def convert(update: FfmpegProgress) -> Awaitable[None] | None:
        frames = total if update.done else min(total, int(Fraction(update.out_time_seconds) * rate))
        return callback(Progress(frames, total))

    return convert
