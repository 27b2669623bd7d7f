"""Protobuf <-> domain values for the renderer's gRPC surface. Defaults of zero-valued fields live here."""

from __future__ import annotations

from exportapi.metering.v1 import metering_pb2
from exportapi.renderer.v1 import renderer_pb2
from renderer.domain import AudioLayer, Clip, Composition, OutputFormat, RenderMode, TextLayer
from renderer.errors import InvalidArgument
from renderer.jobs import Job, JobState, RenderRequest
from renderer.validation import apply_proto_defaults, check_layer_counts

MAX_ID_CHARS = 128

_MODES_IN = {
    metering_pb2.RENDER_MODE_UNSPECIFIED: None,
    metering_pb2.RENDER_MODE_LOCAL: RenderMode.LOCAL,
    metering_pb2.RENDER_MODE_LAMBDA: RenderMode.LAMBDA,
}
_MODES_OUT = {RenderMode.LOCAL: metering_pb2.RENDER_MODE_LOCAL, RenderMode.LAMBDA: metering_pb2.RENDER_MODE_LAMBDA}
_STATES_OUT = {
    JobState.QUEUED: renderer_pb2.RenderJob.QUEUED,
    JobState.RENDERING: renderer_pb2.RenderJob.RENDERING,
    JobState.SUCCEEDED: renderer_pb2.RenderJob.SUCCEEDED,
    JobState.FAILED: renderer_pb2.RenderJob.FAILED,
    JobState.CANCELLED: renderer_pb2.RenderJob.CANCELLED,
}


def identifier(value: str, field: str) -> str:
    if not value or not value.strip():
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"is longer than {MAX_ID_CHARS} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "contains control characters")
    return value


def render_request(message: renderer_pb2.StartRenderRequest) -> RenderRequest:
    if message.mode not in _MODES_IN:
        raise InvalidArgument("mode", f"unknown render mode {message.mode}")
    if not message.HasField("composition"):
        raise InvalidArgument("composition", "is required")
    try:
        output_format = OutputFormat(message.format.strip().lower())
    except ValueError:
        raise InvalidArgument("format", f"must be one of mp4, webm, gif, not {message.format[:32]!r}") from None
    return RenderRequest(
        idempotency_key=identifier(message.idempotency_key, "idempotency_key"),
        user_id=identifier(message.user_id, "user_id"),
        project_id=identifier(message.project_id, "project_id"),
        composition=composition(message.composition),
        format=output_format,
        mode=_MODES_IN[message.mode],
    )


def composition(message: renderer_pb2.Composition) -> Composition:
    """The proto's zero values ("0 means 48", "empty means white", ...) become defaults in one place."""
    check_layer_counts(message.clips, message.texts, message.audio)
    return apply_proto_defaults(
        Composition(
            width=message.width,
            height=message.height,
            fps=message.fps,
            duration_seconds=message.duration_seconds,
            background=message.background,
            clips=tuple(
                Clip(source=c.source, start=c.start, trim_start=c.trim_start, duration=c.duration)
                for c in message.clips
            ),
            texts=tuple(
                TextLayer(text=t.text, start=t.start, end=t.end, x=t.x, y=t.y, font_size=t.font_size, color=t.color)
                for t in message.texts
            ),
            audio=tuple(AudioLayer(source=a.source, start=a.start, volume=a.volume) for a in message.audio),
        )
    )


def job_id(value: str) -> str:
    return identifier(value, "job_id")


def render_job(job: Job) -> renderer_pb2.RenderJob:
    message = renderer_pb2.RenderJob(
        job_id=job.job_id,
        export_id=job.export_id,
        state=_STATES_OUT[job.state],
        progress=job.progress,
        frames_rendered=job.frames_rendered,
        frames_total=job.frames_total,
        output_uri=job.output_uri,
        file_size_bytes=job.file_size_bytes,
        duration_seconds=job.duration_seconds,
        error=job.error,
        mode=_MODES_OUT[job.mode],
        user_id=job.user_id,
        project_id=job.project_id,
        format=job.format.value,
        chunks_done=job.chunks_done,
        chunks_total=job.chunks_total,
    )
    message.created_at.FromDatetime(job.created_at)
    message.updated_at.FromDatetime(job.updated_at)
    return message
