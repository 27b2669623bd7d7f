"""The AWS Lambda render function (handler: renderer.lambda_handler.handler).

Event protocol (JSON), sent by renderer.lambda_backend:
  common: {"action", "export_id", "bucket", "key_prefix", "format", "composition"}
  render: the whole output in one invocation                 -> {"bucket", "key", "size", "duration", "frames"}
  chunk:  + {"index", "first_frame", "frame_count"}: h264 video-only frames [first, first+count)
                                                             -> {"bucket", "key", "size", "frames"}
  audio:  the composition's audio track alone                -> {"bucket", "key", "size"}
  join:   + {"chunk_keys", "audio_key"}: concat (no re-encode) + mux -> like render

Objects: the output is s3://bucket/<prefix><export id>.<format>; work parts live under
<prefix>_parts/<export id>/ (a lifecycle rule expires them). Before each upload the handler checks the parts
prefix for the ABANDONED marker the backend writes when a render fails or is cancelled.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from renderer.domain import AudioLayer, Clip, Composition, TextLayer

ACTION_RENDER = "render"
ACTION_CHUNK = "chunk"
ACTION_AUDIO = "audio"
ACTION_JOIN = "join"

_SAFE_EXPORT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class RenderKeys:
    """Where the objects of one export live."""

    prefix: str
    export_id: str
    extension: str

    def __post_init__(self) -> None:
        if not _SAFE_EXPORT_ID.match(self.export_id):
            raise ValueError(f"export id {self.export_id!r} cannot name an S3 object")

    @property
    def final(self) -> str:
        return f"{self.prefix}{self.export_id}.{self.extension}"

    @property
    def parts_prefix(self) -> str:
        return f"{self.prefix}_parts/{self.export_id}/"

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


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    raise NotImplementedError("the render handler lands with the ffmpeg core")
