"""The local backend: renders a reserved export with ffmpeg on this machine into RENDER_OUTPUT_DIR.

The file appears at `<output_dir>/<export_id>.<ext>` only when complete: ffmpeg writes a hidden temporary
name in the same directory, which is renamed on success and removed on failure or cancellation.
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from renderer.domain import (
    Composition,
    Progress,
    ProgressCallback,
    RenderAssignment,
    RenderError,
    RenderMode,
    RenderOutput,
)
from renderer.ffmpeg_graph import DEFAULT_SETTINGS, EncoderSettings, extension_of
from renderer.ffmpeg_run import STALL_SECONDS, remove_quietly, render_composition
from renderer.media import measure_async
from renderer.sources import S3Fetcher, SourceResolver
from renderer.validation import validate_composition

# Export ids come from metering, but they still name a file: nothing that could climb out of output_dir.
_SAFE_EXPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LocalBackend:
    mode = RenderMode.LOCAL

    def __init__(
        self,
        output_dir: Path | str,
        *,
        asset_roots: Iterable[Path | str] = (),
        resolver: SourceResolver | None = None,
        s3_fetcher: S3Fetcher | None = None,
        s3_buckets: Iterable[str] = (),
        settings: EncoderSettings = DEFAULT_SETTINGS,
        work_root: Path | None = None,
        stall_seconds: float | None = STALL_SECONDS,
    ) -> None:
        """`resolver` wins over `asset_roots`/`s3_fetcher`/`s3_buckets`; without a fetcher, s3:// sources
        are refused. `work_root` holds per-render scratch directories (default: the system temp dir).
        ffmpeg is stopped and the render fails after `stall_seconds` without a sign of life."""
        self.output_dir = Path(output_dir)
        self.resolver = resolver or SourceResolver(asset_roots, s3_fetcher=s3_fetcher, s3_buckets=s3_buckets)
        self.settings = settings
        self.work_root = work_root
        self.stall_seconds = stall_seconds

    def check(self, composition: Composition) -> None:
        """Raise InvalidArgument for sources this backend cannot read (missing files, paths outside the
        asset roots, refused buckets). Cheap and synchronous: call it before reserving an export."""
        self.resolver.check_composition(composition)

    async def render(self, assignment: RenderAssignment, on_progress: ProgressCallback) -> RenderOutput:
        if not isinstance(assignment, RenderAssignment):
            raise PermissionError("LocalBackend renders only a RenderAssignment (a metering reservation)")
        export_id = assignment.export_id
        if not _SAFE_EXPORT_ID.fullmatch(export_id) or export_id.endswith(".partial"):
            raise RenderError(f"export id {export_id[:40]!r} cannot name a file")
        composition = assignment.composition
        validate_composition(composition, max_duration_seconds=None)
        extension = extension_of(assignment.format)
        final, partial = self._prepare_paths(export_id, extension)
        try:
            await render_composition(
                composition,
                assignment.format,
                partial,
                resolver=self.resolver,
                on_progress=on_progress,
                settings=self.settings,
                work_root=self.work_root,
                stall_seconds=self.stall_seconds,
            )
            info = await measure_async(partial)
            await _emit(on_progress, Progress(info.frames, composition.frames_total))
            size = self._publish(partial, final)
        except BaseException:
            remove_quietly(partial)
            raise
        return RenderOutput(
            uri=final.resolve().as_uri(),
            file_size_bytes=size,
            duration_seconds=info.duration_seconds,
            frames=info.frames,
        )

    def _prepare_paths(self, export_id: str, extension: str) -> tuple[Path, Path]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        final = self.output_dir / f"{export_id}.{extension}"
        partial = self.output_dir / f".{export_id}.{secrets.token_hex(4)}.partial.{extension}"
        return final, partial

    @staticmethod
    def _publish(partial: Path, final: Path) -> int:
        size = partial.stat().st_size
        os.replace(partial, final)  # atomic within one directory: readers see all of it or nothing
        return size


async def _emit(on_progress: ProgressCallback, progress: Progress) -> None:
    result = on_progress(progress)
    if inspect.isawaitable(result):
        await result
