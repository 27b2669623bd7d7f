"""Measuring a rendered file without ffprobe (the imageio-ffmpeg wheel ships none).

`ffmpeg -i FILE -map 0:v:0? -map 0:a:0? -c copy -f framemd5 -` lists every packet with its pts and
duration, per stream, without decoding: the frame count is the number of video packets and the duration
runs from the first packet's pts to the end of the last. Works for mp4, webm and gif alike.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from renderer.domain import RenderError
from renderer.ffmpeg_graph import ffmpeg_exe

MEASURE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class StreamInfo:
    media_type: str  # "video" / "audio"
    codec: str
    packets: int
    duration_seconds: float
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class MediaInfo:
    video: StreamInfo | None
    audio: StreamInfo | None

    @property
    def duration_seconds(self) -> float:
        """The video's length when there is video (what the user composed), else the audio's."""
        stream = self.video or self.audio
        return stream.duration_seconds if stream else 0.0

    @property
    def frames(self) -> int:
        return self.video.packets if self.video else 0

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @property
    def has_video(self) -> bool:
        return self.video is not None


def _reading(path: Path | str) -> list[str]:
    """ffmpeg, quiet, reading `path` (as a file: never a protocol its name might spell)."""
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", "file:" + str(Path(path).resolve())]


def _measure_args(path: Path) -> list[str]:
    return [
        *_reading(path),
        "-map",
        "0:v:0?",
        "-map",
        "0:a:0?",
        "-c",
        "copy",
        "-f",
        "framemd5",
        "-",
    ]


def measure(path: Path | str) -> MediaInfo:
    """Duration and frame count of a media file (blocking; see `measure_async`)."""
    try:
        done = subprocess.run(
            _measure_args(Path(path)), capture_output=True, timeout=MEASURE_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"measuring {Path(path).name} timed out") from exc
    return _parse(done.returncode, done.stdout, done.stderr)


async def measure_async(path: Path | str) -> MediaInfo:
    process = await asyncio.create_subprocess_exec(
        *_measure_args(Path(path)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(MEASURE_TIMEOUT_SECONDS):
            stdout, stderr = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    assert process.returncode is not None
    return _parse(process.returncode, stdout, stderr)


def _parse(returncode: int, stdout: bytes, stderr: bytes) -> MediaInfo:
    if returncode != 0:
        message = stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RenderError("cannot read the rendered file: " + (" / ".join(message) or f"exit {returncode}"))
    headers: dict[tuple[str, int], str] = {}
    first: dict[int, int] = {}
    end: dict[int, int] = {}
    packets: dict[int, int] = {}
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("#"):
            # "#tb 0: 1/15360", "#media_type 0: video", "#codec_id 0: h264", "#dimensions 0: 160x120"
            name, _, rest = line[1:].partition(" ")
            index_text, _, value = rest.partition(":")
            if index_text.strip().isdigit():
                headers[name, int(index_text)] = value.strip()
            continue
        columns = [part.strip() for part in line.split(",")]
        if len(columns) < 5 or not columns[0].isdigit():
            continue
        index, pts, duration = int(columns[0]), int(columns[2]), int(columns[3])
        packets[index] = packets.get(index, 0) + 1
        first[index] = min(first.get(index, pts), pts)
        end[index] = max(end.get(index, pts + duration), pts + duration)
    streams: dict[str, StreamInfo] = {}
    for index in sorted({i for _, i in headers}):
        media_type = headers.get(("media_type", index), "")
        time_base = Fraction(headers.get(("tb", index), "1/1"))
        width, _, height = headers.get(("dimensions", index), "0x0").partition("x")
        count = packets.get(index, 0)
        streams.setdefault(
            media_type,
            StreamInfo(
                media_type=media_type,
                codec=headers.get(("codec_id", index), ""),
                packets=count,
                duration_seconds=float((end[index] - first[index]) * time_base) if count else 0.0,
                width=int(width) if width.isdigit() else 0,
                height=int(height) if height.isdigit() else 0,
            ),
        )
    return MediaInfo(video=streams.get("video"), audio=streams.get("audio"))


def decode_frame_rgb(path: Path | str, frame_index: int) -> tuple[int, int, bytes]:
    """Frame `frame_index` (0-based, in decode order of presentation) as (width, height, rgb24 bytes)."""
    info = measure(path)
    if info.video is None:
        raise RenderError(f"{Path(path).name} has no video")
    width, height = info.video.width, info.video.height
    args = [
        *_reading(path),
        "-map",
        "0:v:0",
        "-vf",
        f"select=eq(n\\,{int(frame_index)})",
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]
    done = subprocess.run(args, capture_output=True, timeout=MEASURE_TIMEOUT_SECONDS, check=False)
    expected = width * height * 3
    if done.returncode != 0 or len(done.stdout) != expected:
        raise RenderError(f"cannot decode frame {frame_index} of {Path(path).name}: {done.stderr[-300:]!r}")
    return width, height, done.stdout
