"""Where a clip or audio source comes from: a file under the asset roots, an s3:// object, or a generated one.

`SourceResolver.check` answers synchronously whether a source could be read (call it before reserving, so a
bad path is INVALID_ARGUMENT and costs no export); `resolve_composition` then produces a `ResolvedSource`
for each distinct source, downloading s3 objects into the render's work directory. The graph builder turns
`ResolvedSource`s into ffmpeg inputs and never sees the user's string.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from renderer.domain import Composition, RenderError
from renderer.errors import SourceNotFound, SourceRefused
from renderer.validation import (
    FILE_DEMUXERS,
    IMAGE_EXTENSIONS,
    ColorSource,
    FileSource,
    S3Source,
    SineSource,
    SourceSpec,
    TestPatternSource,
    parse_source,
)

ASSET_ROOTS_ENV = "RENDER_ASSET_ROOTS"
SOURCE_BUCKETS_ENV = "RENDER_SOURCE_BUCKETS"


class S3Fetcher(Protocol):
    """Downloads one object to a local file. Raise FileNotFoundError when the object does not exist; any
    other exception is reported as a render failure."""

    async def fetch(self, bucket: str, key: str, destination: Path) -> None: ...


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A readable regular file with every symlink resolved, and the demuxer forced for its type."""

    path: Path
    demuxer: str
    is_image: bool


@dataclass(frozen=True, slots=True)
class GeneratedColor:
    hex_rgb: str


@dataclass(frozen=True, slots=True)
class GeneratedTestPattern:
    __test__ = False


@dataclass(frozen=True, slots=True)
class GeneratedSine:
    frequency_hz: float


ResolvedSource = LocalFile | GeneratedColor | GeneratedTestPattern | GeneratedSine
# source string as written in the composition -> what it resolved to
ResolvedSources = Mapping[str, ResolvedSource]


def parse_asset_roots(value: str | None) -> tuple[Path, ...]:
    """RENDER_ASSET_ROOTS: colon-separated directories; empty parts are ignored."""
    return tuple(Path(part).expanduser() for part in (value or "").split(":") if part.strip())


def parse_buckets(value: str | None) -> frozenset[str]:
    """RENDER_SOURCE_BUCKETS: comma-separated bucket names s3:// sources may come from."""
    return frozenset(part.strip() for part in (value or "").split(",") if part.strip())


class SourceResolver:
    """Resolves sources against asset roots and an s3 bucket allow-list.

    Without a fetcher, s3:// sources are refused (the local backend needs none); with one, only buckets in
    `s3_buckets` are read.
    """

    def __init__(
        self,
        asset_roots: Iterable[Path | str] = (),
        *,
        s3_fetcher: S3Fetcher | None = None,
        s3_buckets: Iterable[str] = (),
    ) -> None:
        # Roots are resolved once: a symlinked root is fine, what matters is where files really are.
        self.asset_roots = tuple(Path(root).resolve() for root in asset_roots)
        self.s3_fetcher = s3_fetcher
        self.s3_buckets = frozenset(s3_buckets)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, s3_fetcher: S3Fetcher | None = None
    ) -> SourceResolver:
        env = os.environ if environ is None else environ
        return cls(
            parse_asset_roots(env.get(ASSET_ROOTS_ENV)),
            s3_fetcher=s3_fetcher,
            s3_buckets=parse_buckets(env.get(SOURCE_BUCKETS_ENV)),
        )

    # ------------------------------------------------------------------------------------------ checks

    def check(self, source: str, field: str, *, audio: bool) -> SourceSpec:
        """Everything that can be known without downloading: syntax, asset-root containment and existence
        of files, the bucket allow-list. Raises InvalidArgument (SourceRefused / SourceNotFound)."""
        spec = parse_source(source, field, audio=audio)
        if isinstance(spec, FileSource):
            self.resolve_file(spec, field)
        elif isinstance(spec, S3Source):
            self._check_bucket(spec, field)
        return spec

    def check_composition(self, c: Composition) -> None:
        """`check` for every clip and audio source, with field names like composition.clips[1].source."""
        for i, clip in enumerate(c.clips):
            self.check(clip.source, f"composition.clips[{i}].source", audio=False)
        for i, layer in enumerate(c.audio):
            self.check(layer.source, f"composition.audio[{i}].source", audio=True)

    def resolve_file_source(self, source: str, field: str, *, audio: bool = False) -> LocalFile:
        """A file source string -> the real file under the asset roots (InvalidArgument otherwise)."""
        spec = parse_source(source, field, audio=audio)
        if not isinstance(spec, FileSource):
            raise SourceRefused(field, "is not a file source")
        return self.resolve_file(spec, field)

    def resolve_file(self, spec: FileSource, field: str) -> LocalFile:
        if not self.asset_roots:
            raise SourceRefused(field, "file sources are not enabled on this renderer (no asset roots)")
        raw = Path(spec.path)
        if ".." in raw.parts:
            raise SourceRefused(field, "must not contain '..'")
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.asset_roots]
        outside = False
        for candidate in candidates:
            try:
                # strict: every symlink is followed, so a link pointing outside the roots is caught below
                real = candidate.resolve(strict=True)
            except FileNotFoundError:
                continue
            except (OSError, RuntimeError):  # symlink loop, permission denied, name too long
                raise SourceRefused(field, "cannot be read") from None
            if not any(real.is_relative_to(root) for root in self.asset_roots):
                outside = True
                continue
            if not real.is_file():
                raise SourceRefused(field, "is not a regular file")
            if not os.access(real, os.R_OK):
                raise SourceRefused(field, "cannot be read")
            return LocalFile(real, FILE_DEMUXERS[spec.extension], spec.extension in IMAGE_EXTENSIONS)
        if outside:
            raise SourceRefused(field, "is outside the renderer's asset roots")
        if raw.is_absolute() and not any(
            Path(os.path.normpath(raw)).is_relative_to(root) for root in self.asset_roots
        ):
            raise SourceRefused(field, "is outside the renderer's asset roots")
        raise SourceNotFound(field, "no such file under the asset roots")

    def _check_bucket(self, spec: S3Source, field: str) -> None:
        if self.s3_fetcher is None:
            raise SourceRefused(field, "s3:// sources are not enabled on this renderer")
        if spec.bucket not in self.s3_buckets:
            raise SourceRefused(field, f"bucket {spec.bucket!r} is not allowed")

    # ------------------------------------------------------------------------------------------ resolve

    async def resolve(self, source: str, field: str, *, audio: bool, workdir: Path) -> ResolvedSource:
        """One source, ready for ffmpeg. s3 objects are downloaded into `workdir` (the caller removes it)."""
        spec = self.check(source, field, audio=audio)
        match spec:
            case FileSource():
                return self.resolve_file(spec, field)
            case S3Source():
                return await self._download(spec, field, workdir)
            case ColorSource(hex_rgb):
                return GeneratedColor(hex_rgb)
            case TestPatternSource():
                return GeneratedTestPattern()
            case SineSource(frequency_hz):
                return GeneratedSine(frequency_hz)
        raise AssertionError(f"unhandled source {spec!r}")  # pragma: no cover

    async def resolve_composition(self, c: Composition, workdir: Path) -> dict[str, ResolvedSource]:
        """Every distinct clip and audio source of `c`, each fetched once."""
        resolved: dict[str, ResolvedSource] = {}
        layers = [(clip.source, f"composition.clips[{i}].source", False) for i, clip in enumerate(c.clips)]
        layers += [(a.source, f"composition.audio[{i}].source", True) for i, a in enumerate(c.audio)]
        for source, field, audio in layers:
            self.check(source, field, audio=audio)  # each use, so a video-only source is refused as audio
        for source, field, audio in layers:
            if source not in resolved:
                resolved[source] = await self.resolve(source, field, audio=audio, workdir=workdir)
        return resolved

    async def _download(self, spec: S3Source, field: str, workdir: Path) -> LocalFile:
        assert self.s3_fetcher is not None  # _check_bucket refused it otherwise
        downloads = workdir / "sources"
        downloads.mkdir(parents=True, exist_ok=True)
        # Our own name, never the key: a key is not a safe path.
        destination = downloads / f"{len(list(downloads.iterdir())):03d}{spec.extension}"
        try:
            await self.s3_fetcher.fetch(spec.bucket, spec.key, destination)
        except FileNotFoundError:
            raise SourceNotFound(field, f"no such object {spec.uri}") from None
        except PermissionError:
            raise SourceNotFound(field, f"no such object {spec.uri}, or not one this renderer may read") from None
        except Exception as exc:
            raise RenderError(f"could not fetch {spec.uri}: {exc}") from exc
        if not destination.is_file():
            raise SourceNotFound(field, f"no such object {spec.uri}")
        return LocalFile(destination, FILE_DEMUXERS[spec.extension], spec.extension in IMAGE_EXTENSIONS)
