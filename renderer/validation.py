"""Checks of a composition before anything is reserved or rendered.

Everything a user sends is checked here against named limits, and every error names its field
(`composition.texts[2].text`) through `InvalidArgument`. The graph builder relies on these checks: it only
ever formats validated numbers and whitelisted colours into ffmpeg syntax, and user text never reaches a
filter string (it goes through a text file, see `ffmpeg_graph`).

The proto's zero values ("0 means 48", "empty means white", ...) are applied by `apply_proto_defaults`,
which the protobuf converter calls before `validate_composition`; the domain values themselves are strict.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import PurePosixPath

from renderer.domain import AudioLayer, Clip, Composition, OutputFormat, TextLayer
from renderer.errors import InvalidArgument

MIN_WIDTH, MAX_WIDTH = 16, 3840
MIN_HEIGHT, MAX_HEIGHT = 16, 2160
MIN_FPS, MAX_FPS = 1.0, 60.0
# Absolute ceiling, whatever the tier says; metering's tier limit is passed as `max_duration_seconds`.
MAX_DURATION_SECONDS = 3600.0
MAX_CLIPS = 64
MAX_TEXTS = 64
MAX_AUDIO = 16
MAX_TEXT_CHARS = 500
MAX_SOURCE_CHARS = 1024
MIN_FONT_SIZE, MAX_FONT_SIZE = 4, 512
MIN_VOLUME, MAX_VOLUME = 0.0, 4.0
MIN_SINE_HZ, MAX_SINE_HZ = 1.0, 20000.0
# How far a text's corner may sit outside the frame, and how far into a source a clip may seek.
MAX_POSITION = 16384
MAX_SOURCE_SECONDS = 86400.0

DEFAULT_FONT_SIZE = 48
DEFAULT_TEXT_COLOR = "white"
DEFAULT_BACKGROUND = "black"
DEFAULT_VOLUME = 1.0

# Named colours accepted anywhere a colour is; the graph only ever sees the hex value.
COLOR_NAMES: dict[str, str] = {
    "black": "000000",
    "white": "FFFFFF",
    "red": "FF0000",
    "green": "008000",
    "lime": "00FF00",
    "blue": "0000FF",
    "yellow": "FFFF00",
    "cyan": "00FFFF",
    "magenta": "FF00FF",
    "gray": "808080",
    "grey": "808080",
    "silver": "C0C0C0",
    "maroon": "800000",
    "olive": "808000",
    "navy": "000080",
    "purple": "800080",
    "teal": "008080",
    "orange": "FFA500",
    "pink": "FFC0CB",
    "brown": "A52A2A",
}
_HEX_COLOR = re.compile(r"#([0-9A-Fa-f]{6})")

# File types a source may have, with the demuxer forced for each: ffmpeg never guesses the format of a user
# file, so a playlist or concat script renamed to .mp4 cannot make it open other files or URLs.
IMAGE_DEMUXER = "image2"
FILE_DEMUXERS: dict[str, str] = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".m4a": "mp4",
    ".webm": "matroska",
    ".mkv": "matroska",
    ".gif": "gif",
    ".png": IMAGE_DEMUXER,
    ".jpg": IMAGE_DEMUXER,
    ".jpeg": IMAGE_DEMUXER,
    ".webp": IMAGE_DEMUXER,
    ".bmp": IMAGE_DEMUXER,
    ".mp3": "mp3",
    ".wav": "wav",
    ".ogg": "ogg",
    ".opus": "ogg",
    ".flac": "flac",
    ".aac": "aac",
}
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".gif"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
AUDIO_EXTENSIONS = frozenset({".m4a", ".mp3", ".wav", ".ogg", ".opus", ".flac", ".aac"}) | (
    VIDEO_EXTENSIONS - {".gif"}
)
CLIP_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_SINE_HZ = re.compile(r"[0-9]+(\.[0-9]+)?")


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class FileSource:
    """A path as the user wrote it; `sources.SourceResolver` decides whether it is inside the asset roots."""

    path: str
    extension: str


@dataclass(frozen=True, slots=True)
class S3Source:
    bucket: str
    key: str
    extension: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class ColorSource:
    hex_rgb: str  # "RRGGBB"


@dataclass(frozen=True, slots=True)
class TestPatternSource:
    """ffmpeg's testsrc2 pattern (moving, with a frame counter)."""

    __test__ = False  # not a pytest test class, whatever its name says


@dataclass(frozen=True, slots=True)
class SineSource:
    frequency_hz: float


SourceSpec = FileSource | S3Source | ColorSource | TestPatternSource | SineSource


def parse_color(value: str, field: str) -> str:
    """A whitelisted colour name or #RRGGBB -> "RRGGBB" (upper case)."""
    if not isinstance(value, str):
        raise InvalidArgument(field, "must be a colour name or #RRGGBB")
    name = value.strip().lower()
    if name in COLOR_NAMES:
        return COLOR_NAMES[name]
    match = _HEX_COLOR.fullmatch(value.strip())
    if match:
        return match.group(1).upper()
    raise InvalidArgument(
        field, f"unknown colour {value[:40]!r}: use #RRGGBB or one of {', '.join(sorted(COLOR_NAMES))}"
    )


def parse_source(source: str, field: str, *, audio: bool) -> SourceSpec:
    """Syntax of a clip (`audio=False`) or audio (`audio=True`) source; touches no file system or network."""
    if not isinstance(source, str) or not source:
        raise InvalidArgument(field, "must not be empty")
    if len(source) > MAX_SOURCE_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_SOURCE_CHARS} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in source):
        raise InvalidArgument(field, "must not contain control characters")
    kinds = "a file under the asset roots, s3://bucket/key or " + ("sine:<hz>" if audio else "color:<name>, testsrc:")
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://") :].partition("/")
        if not _S3_BUCKET.fullmatch(bucket) or not key:
            raise InvalidArgument(field, "must look like s3://bucket/key")
        return S3Source(bucket, key, _extension(key, field, audio=audio))
    scheme, colon, rest = source.partition(":")
    if colon and scheme in ("color", "testsrc", "sine"):
        if scheme == "sine":
            if not audio:
                raise InvalidArgument(field, "sine: is an audio source; a clip takes " + kinds)
            if not _SINE_HZ.fullmatch(rest):
                raise InvalidArgument(field, "must be sine:<hz> with a number of hertz")
            hz = float(rest)
            if not MIN_SINE_HZ <= hz <= MAX_SINE_HZ:
                raise InvalidArgument(field, f"sine frequency must be {MIN_SINE_HZ:g}..{MAX_SINE_HZ:g} Hz")
            return SineSource(hz)
        if audio:
            raise InvalidArgument(field, f"{scheme}: is a video source; audio takes " + kinds)
        if scheme == "color":
            return ColorSource(parse_color(rest, field))
        if rest:
            raise InvalidArgument(field, "testsrc: takes no parameters")
        return TestPatternSource()
    if "://" in source or (colon and "/" not in scheme and len(scheme) > 1):
        # A URL or an ffmpeg protocol ("concat:", "http:", "subfile:"...): never handed to ffmpeg.
        raise InvalidArgument(field, f"unsupported source {source[:40]!r}: use " + kinds)
    return FileSource(source, _extension(source, field, audio=audio))


def _extension(path: str, field: str, *, audio: bool) -> str:
    extension = PurePosixPath(path).suffix.lower()
    allowed = AUDIO_EXTENSIONS if audio else CLIP_EXTENSIONS
    if extension not in allowed:
        raise InvalidArgument(
            field, f"unsupported file type {extension or '(none)'!r}: use one of " + ", ".join(sorted(allowed))
        )
    return extension


# ---------------------------------------------------------------------------------------------- formats


def parse_format(value: str) -> OutputFormat:
    """"mp4", "webm" or "gif" (case-insensitive) -> OutputFormat; anything else names the field "format"."""
    try:
        return OutputFormat(str(value).strip().lower())
    except ValueError:
        raise InvalidArgument(
            "format", f"unknown format {str(value)[:20]!r}: use one of {', '.join(f.value for f in OutputFormat)}"
        ) from None


# ---------------------------------------------------------------------------------------------- composition


def apply_proto_defaults(c: Composition) -> Composition:
    """The proto's zero values mean defaults: font_size 0 -> 48, colour "" -> white, background "" -> black,
    volume 0 -> 1. Call this on a composition converted from protobuf, before `validate_composition`."""
    return dataclasses.replace(
        c,
        background=c.background or DEFAULT_BACKGROUND,
        texts=tuple(
            dataclasses.replace(
                t, font_size=t.font_size or DEFAULT_FONT_SIZE, color=t.color or DEFAULT_TEXT_COLOR
            )
            for t in c.texts
        ),
        audio=tuple(dataclasses.replace(a, volume=a.volume or DEFAULT_VOLUME) for a in c.audio),
    )


def validate_composition(c: Composition, *, max_duration_seconds: float | None) -> None:
    """Raise InvalidArgument naming the first bad field; return None when the composition can be rendered.

    `max_duration_seconds` is the caller's limit (e.g. the tier's); `MAX_DURATION_SECONDS` applies always.
    Width and height must be even: h264 and vp9 in yuv420p need it, and a composition may be rendered to any
    format, so gif is held to the same rule rather than rounding silently.
    """
    p = "composition"
    _int_in(c.width, f"{p}.width", MIN_WIDTH, MAX_WIDTH)
    _int_in(c.height, f"{p}.height", MIN_HEIGHT, MAX_HEIGHT)
    for name, value in (("width", c.width), ("height", c.height)):
        if value % 2:
            raise InvalidArgument(f"{p}.{name}", f"must be even (h264/vp9 need even dimensions), got {value}")
    _number_in(c.fps, f"{p}.fps", MIN_FPS, MAX_FPS)
    limit = MAX_DURATION_SECONDS if max_duration_seconds is None else min(max_duration_seconds, MAX_DURATION_SECONDS)
    _number(c.duration_seconds, f"{p}.duration_seconds")
    if c.duration_seconds <= 0:
        raise InvalidArgument(f"{p}.duration_seconds", "must be greater than 0")
    if c.duration_seconds > limit:
        raise InvalidArgument(f"{p}.duration_seconds", f"must be at most {limit:g} seconds")
    if c.frames_total < 1:
        raise InvalidArgument(f"{p}.duration_seconds", f"is shorter than one frame at {c.fps:g} fps")
    parse_color(c.background, f"{p}.background")

    check_layer_counts(c.clips, c.texts, c.audio, p)
    for i, clip in enumerate(c.clips):
        _validate_clip(clip, f"{p}.clips[{i}]", c.duration_seconds)
    for i, text in enumerate(c.texts):
        _validate_text(text, f"{p}.texts[{i}]", c.duration_seconds)
    for i, layer in enumerate(c.audio):
        _validate_audio(layer, f"{p}.audio[{i}]", c.duration_seconds)


def _validate_clip(clip: Clip, p: str, duration: float) -> None:
    if not isinstance(clip, Clip):
        raise InvalidArgument(p, "must be a Clip")
    parse_source(clip.source, f"{p}.source", audio=False)
    _start(clip.start, f"{p}.start", duration)
    _number_in(clip.trim_start, f"{p}.trim_start", 0.0, MAX_SOURCE_SECONDS)
    _number_in(clip.duration, f"{p}.duration", 0.0, MAX_SOURCE_SECONDS)


def _validate_text(text: TextLayer, p: str, duration: float) -> None:
    if not isinstance(text, TextLayer):
        raise InvalidArgument(p, "must be a TextLayer")
    if not isinstance(text.text, str):
        raise InvalidArgument(f"{p}.text", "must be a string")
    if len(text.text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{p}.text", f"must be at most {MAX_TEXT_CHARS} characters")
    if any((ord(ch) < 32 and ch not in "\n\t") or ord(ch) == 127 for ch in text.text):
        raise InvalidArgument(f"{p}.text", "must not contain control characters other than newline and tab")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text.text):
        raise InvalidArgument(f"{p}.text", "must be valid Unicode")
    _start(text.start, f"{p}.start", duration)
    _number_in(text.end, f"{p}.end", 0.0, MAX_DURATION_SECONDS)
    if text.end and text.end <= text.start:
        raise InvalidArgument(f"{p}.end", "must be after start (or 0 for the end of the composition)")
    _int_in(text.x, f"{p}.x", -MAX_POSITION, MAX_POSITION)
    _int_in(text.y, f"{p}.y", -MAX_POSITION, MAX_POSITION)
    _int_in(text.font_size, f"{p}.font_size", MIN_FONT_SIZE, MAX_FONT_SIZE)
    parse_color(text.color, f"{p}.color")


def _validate_audio(layer: AudioLayer, p: str, duration: float) -> None:
    if not isinstance(layer, AudioLayer):
        raise InvalidArgument(p, "must be an AudioLayer")
    parse_source(layer.source, f"{p}.source", audio=True)
    _start(layer.start, f"{p}.start", duration)
    _number_in(layer.volume, f"{p}.volume", MIN_VOLUME, MAX_VOLUME)


def _start(value: float, field: str, duration: float) -> None:
    _number(value, field)
    if not 0 <= value < duration:
        raise InvalidArgument(field, f"must be in 0..{duration:g} (before the end of the composition)")


def check_layer_counts(clips: Sized, texts: Sized, audio: Sized, prefix: str = "composition") -> None:
    """The layers' numbers, checked on the request itself before anything is built from its layers: an empty
    layer is 2 bytes on the wire, and converting a message's two million of them held the renderer's event
    loop for 14 s."""
    for items, name, limit in ((clips, "clips", MAX_CLIPS), (texts, "texts", MAX_TEXTS), (audio, "audio", MAX_AUDIO)):
        if len(items) > limit:
            raise InvalidArgument(f"{prefix}.{name}", f"at most {limit} allowed, got {len(items)}")


def _number(value: float, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field, "must be a number")
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number")


def _number_in(value: float, field: str, low: float, high: float) -> None:
    _number(value, field)
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in {low:g}..{high:g}, got {value:g}")


def _int_in(value: int, field: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, "must be an integer")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in {low}..{high}, got {value}")
