"""Plain values of the render domain, shared by the job runner and both backends.

Nothing here knows gRPC, ffmpeg or AWS. A backend renders a `RenderAssignment`, and the only way to get one
is from the job runner after metering has reserved the export (see `Reservation`).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Protocol


class OutputFormat(enum.StrEnum):
    MP4 = "mp4"
    WEBM = "webm"
    GIF = "gif"


class RenderMode(enum.StrEnum):
    LOCAL = "local"
    LAMBDA = "lambda"


@dataclass(frozen=True, slots=True)
class Clip:
    source: str
    start: float = 0.0
    trim_start: float = 0.0
    duration: float = 0.0  # 0: until the end of the composition


@dataclass(frozen=True, slots=True)
class TextLayer:
    text: str
    start: float = 0.0
    end: float = 0.0  # 0: until the end of the composition
    x: int = 0
    y: int = 0
    font_size: int = 48
    color: str = "white"


def fps_fraction(fps: float) -> Fraction:
    """A composition's rate as an exact fraction (29.97 -> 2997/100), how ffmpeg is told it."""
    return Fraction(str(fps)).limit_denominator(1001)


@dataclass(frozen=True, slots=True)
class AudioLayer:
    source: str
    start: float = 0.0
    volume: float = 1.0


@dataclass(frozen=True, slots=True)
class Composition:
    width: int
    height: int
    fps: float
    duration_seconds: float
    background: str = "black"
    clips: tuple[Clip, ...] = ()
    texts: tuple[TextLayer, ...] = ()
    audio: tuple[AudioLayer, ...] = ()

    @property
    def frames_total(self) -> int:
        return round(self.duration_seconds * self.fps)

    @property
    def sounding_audio(self) -> tuple[AudioLayer, ...]:
        """The audio layers that start before the end (its length in whole frames). One that starts later is
        silent: every render leaves it out, whole or in chunks (and with none left there is no audio track)."""
        end = Fraction(self.frames_total) / fps_fraction(self.fps)
        return tuple(layer for layer in self.audio if layer.start < end)

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}"


class _ReservationSeal:
    """Only the job runner's metering client holds this; see `Reservation.__post_init__`."""


RESERVATION_SEAL = _ReservationSeal()


@dataclass(frozen=True, slots=True)
class Reservation:
    """Proof that metering recorded the export as RESERVED. Built only from a CheckAndReserve answer."""

    export_id: str
    lease_expires_at: datetime
    seal: _ReservationSeal = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seal is not RESERVATION_SEAL or not self.export_id:
            raise PermissionError("a Reservation comes only from metering's CheckAndReserve")


@dataclass(frozen=True, slots=True)
class RenderAssignment:
    """What a backend renders: one reserved export."""

    reservation: Reservation
    composition: Composition
    format: OutputFormat

    def __post_init__(self) -> None:
        if not isinstance(self.reservation, Reservation):
            raise PermissionError("a render needs a metering reservation")

    @property
    def export_id(self) -> str:
        return self.reservation.export_id


@dataclass(frozen=True, slots=True)
class Progress:
    frames_rendered: int
    frames_total: int
    chunks_done: int = 0
    chunks_total: int = 0

    @property
    def fraction(self) -> float:
        if self.chunks_total:
            return min(1.0, self.chunks_done / self.chunks_total)
        if self.frames_total <= 0:
            return 0.0
        return min(1.0, self.frames_rendered / self.frames_total)


ProgressCallback = Callable[[Progress], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class RenderOutput:
    uri: str  # file:///... or s3://bucket/key
    file_size_bytes: int
    duration_seconds: float
    frames: int = 0


class RenderError(Exception):
    """A render that failed for a reason worth showing the user (ffmpeg's error, a Lambda function error)."""


class RenderBackend(Protocol):
    mode: RenderMode

    def check(self, composition: Composition) -> None:
        """Raise InvalidArgument for sources this backend cannot read. Cheap; runs before reserving."""
        ...

    async def render(self, assignment: RenderAssignment, on_progress: ProgressCallback) -> RenderOutput:
        """Render one reserved export. Cancellation (asyncio.CancelledError) stops the work and removes
        partial output before re-raising."""
        ...
