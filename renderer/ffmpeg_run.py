"""Running ffmpeg: an argument list as an asyncio subprocess (no shell), with progress and clean stopping.

`run_ffmpeg` is the primitive: it adds `-progress pipe:1 -nostats`, turns ffmpeg's key=value progress blocks
into callbacks, keeps the last lines of stderr for the error message, and on cancellation asks ffmpeg to
stop ('q' on stdin), then SIGTERM, then SIGKILL, before re-raising.

A stall watchdog stops ffmpeg the same way and raises RenderError when it shows no sign of life for
`stall_seconds`: no new progress values, no stderr output, no CPU use. A deadlocked ffmpeg keeps printing
progress blocks (the same values every period), so a block alone is not a sign of life; a busy one that
has nothing to output yet (a generator skipping to a far offset) burns CPU, which is.

The render functions below are what backends call (the local backend, the Lambda handler):
resolve sources into a private work directory -> build the command -> run it -> remove the work directory,
and remove the (partial) output when anything fails or the task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
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
STALL_SECONDS = 60.0  # no sign of life for this long: ffmpeg is stuck (None: never give up)
# CPU time, as a share of `stall_seconds`, that counts as a sign of life. A deadlocked ffmpeg (every thread
# in a futex wait) uses next to none; a working one uses a whole core.
STALL_CPU_SHARE = 0.05
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
    stall_seconds: float | None = STALL_SECONDS,
) -> None:
    """Run `args` (binary first). Raises RenderError with ffmpeg's trimmed error output on a non-zero exit,
    and RenderError("ffmpeg stalled ...") after stopping it when it shows no sign of life for
    `stall_seconds` (see the module's docstring).

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
    stdout = process.stdout
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    liveness = _Liveness(process.pid, stall_seconds or 0.0)
    stderr_task = asyncio.create_task(_collect_lines(process.stderr, stderr_tail, liveness))

    async def to_the_end() -> int:
        await _read_progress(stdout, on_progress, liveness)
        returncode = await process.wait()
        await stderr_task
        return returncode

    try:
        if stall_seconds is None:
            returncode = await to_the_end()
        else:
            returncode = await _unless_stalled(to_the_end(), liveness, stderr_tail)
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


async def _read_progress(
    stream: asyncio.StreamReader, on_progress: FfmpegProgressCallback | None, liveness: _Liveness
) -> None:
    block: dict[str, str] = {}
    async for line in _lines(stream):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        block[key.strip()] = value.strip()
        if key.strip() != "progress":
            continue
        liveness.progress(block)
        if on_progress is not None:
            update = FfmpegProgress(
                frame=_int(block.get("frame")),
                out_time_seconds=max(0, _int(block.get("out_time_us") or block.get("out_time_ms"))) / 1e6,
                done=block["progress"] == "end",
            )
            with liveness.our_turn():
                result = on_progress(update)
                if inspect.isawaitable(result):
                    await result
        block = {}


async def _collect_lines(stream: asyncio.StreamReader, sink: deque[str], liveness: _Liveness) -> None:
    async for line in _lines(stream):
        liveness.alive()
        if line.strip():
            sink.append(line.rstrip())


class _Liveness:
    """When ffmpeg last showed a sign of life: progress values that changed, stderr output, CPU use."""

    # What moves while ffmpeg works; `speed`, `fps` and `bitrate` change with the wall clock alone.
    _PROGRESS_KEYS = ("frame", "out_time_us", "out_time_ms", "total_size", "progress")

    def __init__(self, pid: int, stall_seconds: float) -> None:
        self.pid = pid
        self.stall_seconds = stall_seconds
        self.last_progress: tuple[str | None, ...] = ()
        self.in_callback = False
        self.alive()

    def alive(self) -> None:
        self.since = time.monotonic()
        self.cpu_since = _cpu_seconds(self.pid)
        self.ours = 0.0  # seconds since then spent in our own progress callback

    def progress(self, block: Mapping[str, str]) -> None:
        values = tuple(block.get(key) for key in self._PROGRESS_KEYS)
        if values != self.last_progress:
            self.last_progress = values
            self.alive()

    @contextlib.contextmanager
    def our_turn(self):  # -> Iterator[None]
        """While our progress callback runs, ffmpeg may wait for us (its stdout unread): not its idle time."""
        started = time.monotonic()
        self.in_callback = True
        try:
            yield
        finally:
            self.in_callback = False
            self.ours += time.monotonic() - max(started, self.since)

    def idle_seconds(self) -> float:
        """Seconds since the last sign of life, CPU use included (checked now)."""
        if self.in_callback:
            return 0.0
        cpu = _cpu_seconds(self.pid)
        busy = STALL_CPU_SHARE * self.stall_seconds
        if cpu is not None and self.cpu_since is not None and cpu - self.cpu_since >= busy:
            self.alive()
        return time.monotonic() - self.since - self.ours


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # the name in parentheses may hold spaces
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


async def _unless_stalled(work: Coroutine[object, object, int], liveness: _Liveness, tail: deque[str]) -> int:
    """`work`'s result, or RenderError once ffmpeg has been idle for the stall period (`work` cancelled)."""
    stall_seconds = liveness.stall_seconds
    task = asyncio.create_task(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(1.0, stall_seconds / 4))
            if done:
                return task.result()
            if liveness.idle_seconds() >= stall_seconds:
                log.warning("ffmpeg pid %s stalled for %g s; stopping it", liveness.pid, stall_seconds)
                last = f": {tail[-1]}" if tail else ""
                raise RenderError(f"ffmpeg stalled: no progress for {stall_seconds:g} s, stopped{last}")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


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
    stall_seconds: float | None = STALL_SECONDS,
) -> FfmpegCommand:
    """The whole composition into `output`. Returns the command that ran (for its expected frames and
    duration). The output is removed if the render fails or is cancelled."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_render(c, fmt, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(
                command.args,
                on_progress=_frames_progress(command.frames_total, on_progress),
                stall_seconds=stall_seconds,
            )
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
    stall_seconds: float | None = STALL_SECONDS,
) -> FfmpegCommand:
    """Frames [first_frame, first_frame + frame_count) as h264 video-only mp4 (see `build_video_chunk`)."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_video_chunk(c, first_frame, frame_count, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(
                command.args, on_progress=_frames_progress(frame_count, on_progress), stall_seconds=stall_seconds
            )
        return command


async def render_audio_track(
    c: Composition,
    output: Path,
    *,
    resolver: SourceResolver,
    on_progress: ProgressCallback | None = None,
    settings: EncoderSettings = DEFAULT_SETTINGS,
    work_root: Path | None = None,
    stall_seconds: float | None = STALL_SECONDS,
) -> FfmpegCommand:
    """The composition's whole audio track as AAC in .m4a. Raises ValueError without audio layers.
    Progress is reported in composition frames (audio time x fps)."""
    async with _work_dir(work_root, output) as workdir:
        sources = await resolver.resolve_composition(c, workdir)
        command = build_audio(c, output, sources, workdir=workdir, settings=settings)
        with _user_facing_errors(sources, workdir, output):
            await run_ffmpeg(command.args, on_progress=_time_progress(c, on_progress), stall_seconds=stall_seconds)
        return command


async def join_chunks(
    c: Composition,
    chunk_paths: Sequence[Path],
    audio_path: Path | None,
    output: Path,
    *,
    work_root: Path | None = None,
    stall_seconds: float | None = STALL_SECONDS,
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
            await run_ffmpeg(command.args, stall_seconds=stall_seconds)
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
