"""Composition validation and source resolution: what is refused, and under which field name. No ffmpeg."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
from google.protobuf import json_format

from exportapi.renderer.v1 import renderer_pb2
from renderer.converters import composition as composition_from_proto
from renderer.domain import AudioLayer, Clip, Composition, OutputFormat, TextLayer
from renderer.errors import InvalidArgument, SourceNotFound, SourceRefused
from renderer.sources import GeneratedColor, GeneratedSine, GeneratedTestPattern, LocalFile, SourceResolver
from renderer.validation import (
    MAX_AUDIO,
    MAX_CLIPS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    apply_proto_defaults,
    parse_format,
    validate_composition,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GOOD = Composition(
    width=160,
    height=120,
    fps=10,
    duration_seconds=2.0,
    background="navy",
    clips=(Clip("testsrc:", start=0.5, duration=1.0), Clip("color:#102030")),
    texts=(TextLayer("hello", start=0, end=1.5, x=4, y=4, font_size=16, color="white"), TextLayer("bye")),
    audio=(AudioLayer("sine:440", start=0.25, volume=0.5),),
)


def _with(**fields: object) -> Composition:
    return dataclasses.replace(GOOD, **fields)


def _clip(index: int, **fields: object) -> Composition:
    clips = list(GOOD.clips)
    clips[index] = dataclasses.replace(clips[index], **fields)
    return _with(clips=tuple(clips))


def _text(index: int, **fields: object) -> Composition:
    texts = list(GOOD.texts)
    texts[index] = dataclasses.replace(texts[index], **fields)
    return _with(texts=tuple(texts))


def _audio(**fields: object) -> Composition:
    return _with(audio=(dataclasses.replace(GOOD.audio[0], **fields),))


def test_a_good_composition_passes() -> None:
    validate_composition(GOOD, max_duration_seconds=30)
    validate_composition(GOOD, max_duration_seconds=None)


BAD = [
    (_with(width=15), "composition.width"),
    (_with(width=3842), "composition.width"),
    (_with(width=161), "composition.width"),  # odd: h264/vp9 need even sizes
    (_with(height=0), "composition.height"),
    (_with(height=2162), "composition.height"),
    (_with(height=121), "composition.height"),
    (_with(width=160.0), "composition.width"),  # not an integer
    (_with(fps=0), "composition.fps"),
    (_with(fps=61), "composition.fps"),
    (_with(fps=math.nan), "composition.fps"),
    (_with(duration_seconds=0), "composition.duration_seconds"),
    (_with(duration_seconds=-1), "composition.duration_seconds"),
    (_with(duration_seconds=math.inf), "composition.duration_seconds"),
    (_with(duration_seconds=math.nan), "composition.duration_seconds"),
    (_with(duration_seconds=31), "composition.duration_seconds"),  # over the caller's 30 s
    (_with(duration_seconds=0.01), "composition.duration_seconds"),  # not one frame at 10 fps
    (_with(background="chartreuse-ish"), "composition.background"),
    (_with(background="#12345"), "composition.background"),
    (_with(background="0x123456"), "composition.background"),
    (_with(clips=(Clip("testsrc:"),) * (MAX_CLIPS + 1)), "composition.clips"),
    (_with(texts=(TextLayer("a"),) * (MAX_TEXTS + 1)), "composition.texts"),
    (_with(audio=(AudioLayer("sine:1"),) * (MAX_AUDIO + 1)), "composition.audio"),
    (_clip(1, source=""), "composition.clips[1].source"),
    (_clip(1, source="x" * 1021 + ".mp4"), "composition.clips[1].source"),
    (_clip(1, source="sine:440"), "composition.clips[1].source"),  # audio source as a clip
    (_clip(1, source="color:nope"), "composition.clips[1].source"),
    (_clip(1, source="testsrc:size=1x1"), "composition.clips[1].source"),
    (_clip(1, source="concat:/etc/passwd|x.mp4"), "composition.clips[1].source"),
    (_clip(1, source="http://example.com/a.mp4"), "composition.clips[1].source"),
    (_clip(1, source="s3://B_ad/key.mp4"), "composition.clips[1].source"),
    (_clip(1, source="s3://bucket/"), "composition.clips[1].source"),
    (_clip(1, source="/etc/passwd"), "composition.clips[1].source"),  # no media extension
    (_clip(1, source="clips/a.mp4\x00.png"), "composition.clips[1].source"),
    (_clip(0, start=-0.1), "composition.clips[0].start"),
    (_clip(0, start=2.0), "composition.clips[0].start"),  # at the very end
    (_clip(0, start=math.inf), "composition.clips[0].start"),
    (_clip(0, trim_start=-1), "composition.clips[0].trim_start"),
    (_clip(0, trim_start=math.nan), "composition.clips[0].trim_start"),
    (_clip(0, duration=-1), "composition.clips[0].duration"),
    (_clip(0, duration=math.inf), "composition.clips[0].duration"),
    (_text(1, text="x" * (MAX_TEXT_CHARS + 1)), "composition.texts[1].text"),
    (_text(1, text="bell\x07"), "composition.texts[1].text"),
    (_text(1, text="nul\x00"), "composition.texts[1].text"),
    (_text(0, start=-1), "composition.texts[0].start"),
    (_text(0, start=5), "composition.texts[0].start"),
    (_text(0, end=-1), "composition.texts[0].end"),
    (_text(0, start=1.0, end=0.5), "composition.texts[0].end"),
    (_text(0, end=math.nan), "composition.texts[0].end"),
    (_text(0, font_size=3), "composition.texts[0].font_size"),
    (_text(0, font_size=513), "composition.texts[0].font_size"),
    (_text(0, font_size=0), "composition.texts[0].font_size"),  # proto's 0 is mapped before validation
    (_text(0, color="not-a-colour"), "composition.texts[0].color"),
    (_text(0, color="#GGGGGG"), "composition.texts[0].color"),
    (_text(0, x=10**9), "composition.texts[0].x"),
    (_text(0, y=-(10**9)), "composition.texts[0].y"),
    (_audio(source="testsrc:"), "composition.audio[0].source"),
    (_audio(source="sine:0"), "composition.audio[0].source"),
    (_audio(source="sine:20001"), "composition.audio[0].source"),
    (_audio(source="sine:1e3"), "composition.audio[0].source"),
    (_audio(source="sine:440:f=1"), "composition.audio[0].source"),
    (_audio(source="clips/picture.png"), "composition.audio[0].source"),
    (_audio(start=-1), "composition.audio[0].start"),
    (_audio(start=2.5), "composition.audio[0].start"),
    (_audio(volume=-0.1), "composition.audio[0].volume"),
    (_audio(volume=4.01), "composition.audio[0].volume"),
    (_audio(volume=math.inf), "composition.audio[0].volume"),
]


@pytest.mark.parametrize(("composition", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_a_bad_composition_is_refused_naming_the_field(composition: Composition, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_composition(composition, max_duration_seconds=30)
    assert caught.value.field == field
    assert caught.value.message and field in str(caught.value)


def test_the_absolute_duration_ceiling_applies_without_a_tier_limit() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_composition(_with(duration_seconds=3601), max_duration_seconds=None)
    assert caught.value.field == "composition.duration_seconds"


def test_hostile_text_is_valid_input() -> None:
    """Filter syntax, expansion and newlines are just text: refused only for control characters."""
    hostile = "A: ' \\ % [ ] ; %{pts} %{eif:1:d}\n'[out]; nullsrc\ttab"
    validate_composition(_text(0, text=hostile), max_duration_seconds=30)


def test_proto_zero_values_become_the_documented_defaults() -> None:
    proto_like = _with(
        background="",
        texts=(TextLayer("x", font_size=0, color=""),),
        audio=(AudioLayer("sine:440", volume=0.0),),
    )
    normalized = apply_proto_defaults(proto_like)
    assert normalized.background == "black"
    assert (normalized.texts[0].font_size, normalized.texts[0].color) == (48, "white")
    assert normalized.audio[0].volume == 1.0
    validate_composition(normalized, max_duration_seconds=30)


@pytest.mark.parametrize("value", ["mp4", "WEBM", " gif "])
def test_parse_format_accepts_the_three_formats(value: str) -> None:
    assert parse_format(value) in set(OutputFormat)


@pytest.mark.parametrize("value", ["", "avi", "mp4;rm -rf /", "gif\n"])
def test_parse_format_names_the_format_field(value: str) -> None:
    if value == "gif\n":  # surrounding whitespace is forgiven
        assert parse_format(value) is OutputFormat.GIF
        return
    with pytest.raises(InvalidArgument) as caught:
        parse_format(value)
    assert caught.value.field == "format"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_the_examples_are_valid_compositions(path: Path) -> None:
    message = json_format.ParseDict(json.loads(path.read_text()), renderer_pb2.Composition())
    composition = composition_from_proto(message)
    validate_composition(composition, max_duration_seconds=30)
    SourceResolver().check_composition(composition)  # generated sources only: no asset roots needed


# ------------------------------------------------------------------------------------------ sources


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """An asset root with a clip, a nested clip, a symlink inside and one pointing outside."""
    root = tmp_path / "assets"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(b"not really a video")
    (root / "top.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"secret")
    (root / "escape.mp4").symlink_to(outside)
    (root / "clips" / "inside.mp4").symlink_to(root / "top.mp4")
    (root / "dir.mp4").mkdir()
    return root


def test_files_under_the_asset_roots_resolve_to_their_real_path(assets: Path) -> None:
    resolver = SourceResolver([assets])
    resolved = resolver.resolve_file_source("clips/a.mp4", "f")
    assert resolved == LocalFile((assets / "clips" / "a.mp4").resolve(), "mp4", False)
    assert resolver.resolve_file_source(str(assets / "top.mp4"), "f").path == (assets / "top.mp4").resolve()
    # a symlink that stays inside the roots is fine, and is resolved to its target
    assert resolver.resolve_file_source("clips/inside.mp4", "f").path == (assets / "top.mp4").resolve()


def test_a_second_root_is_searched(assets: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.mp4").write_bytes(b"x")
    assert SourceResolver([assets, other]).resolve_file_source("b.mp4", "f").path == (other / "b.mp4").resolve()
    resolver = SourceResolver.from_env({"RENDER_ASSET_ROOTS": f"{assets}:{other}"})
    assert resolver.resolve_file_source("b.mp4", "f").path == (other / "b.mp4").resolve()


@pytest.mark.parametrize(
    "source",
    [
        "../secret.mp4",  # climbs out
        "clips/../../secret.mp4",
        "clips/../top.mp4",  # '..' is refused even when it would land inside
        "escape.mp4",  # symlink pointing outside the roots
        "SECRET_ABSOLUTE",  # absolute path outside the roots
        "/etc/../etc/hosts.mp4",
        "dir.mp4",  # not a regular file
    ],
)
def test_escapes_from_the_asset_roots_are_refused(assets: Path, source: str) -> None:
    if source == "SECRET_ABSOLUTE":
        source = str(assets.parent / "secret.mp4")
    with pytest.raises(SourceRefused) as caught:
        SourceResolver([assets]).check(source, "composition.clips[3].source", audio=False)
    assert caught.value.field == "composition.clips[3].source"


def test_a_missing_file_is_not_found_with_its_field(assets: Path) -> None:
    composition = _with(clips=(Clip("testsrc:"), Clip("clips/missing.mp4")))
    with pytest.raises(SourceNotFound) as caught:
        SourceResolver([assets]).check_composition(composition)
    assert caught.value.field == "composition.clips[1].source"
    assert isinstance(caught.value, InvalidArgument)


def test_file_sources_are_refused_without_asset_roots(assets: Path) -> None:
    with pytest.raises(SourceRefused):
        SourceResolver().check(str(assets / "top.mp4"), "f", audio=False)


def test_file_names_that_look_like_protocols_stay_inside_the_roots(assets: Path) -> None:
    """A file called "subfile,,start,0,end,0,,:x.mp4" is only ever a file (ffmpeg gets file:/abs/path)."""
    weird = assets / "clips" / "concat:x.mp4"
    weird.write_bytes(b"x")
    assert SourceResolver([assets]).resolve_file_source("clips/concat:x.mp4", "f").path == weird.resolve()


class _CopyingFetcher:
    """Serves s3://bucket/key from a local directory, like a tiny S3."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched: list[tuple[str, str]] = []

    async def fetch(self, bucket: str, key: str, destination: Path) -> None:
        self.fetched.append((bucket, key))
        source = self.root / bucket / key
        if not source.is_file():
            raise FileNotFoundError(key)
        destination.write_bytes(source.read_bytes())


async def test_s3_sources_need_a_fetcher_and_an_allowed_bucket(tmp_path: Path) -> None:
    with pytest.raises(SourceRefused, match="not enabled"):
        SourceResolver().check("s3://media/a.mp4", "composition.clips[0].source", audio=False)
    (tmp_path / "s3" / "media").mkdir(parents=True)
    (tmp_path / "s3" / "media" / "a.mp4").write_bytes(b"video bytes")
    fetcher = _CopyingFetcher(tmp_path / "s3")
    resolver = SourceResolver(s3_fetcher=fetcher, s3_buckets=["media"])
    with pytest.raises(SourceRefused, match="not allowed"):
        resolver.check("s3://other-bucket/a.mp4", "composition.clips[0].source", audio=False)
    work = tmp_path / "work"
    work.mkdir()
    resolved = await resolver.resolve("s3://media/a.mp4", "composition.clips[0].source", audio=False, workdir=work)
    assert isinstance(resolved, LocalFile)
    assert resolved.path.is_relative_to(work) and resolved.path.read_bytes() == b"video bytes"
    with pytest.raises(SourceNotFound) as caught:
        await resolver.resolve("s3://media/missing.mp4", "composition.audio[0].source", audio=True, workdir=work)
    assert caught.value.field == "composition.audio[0].source"
    assert fetcher.fetched == [("media", "a.mp4"), ("media", "missing.mp4")]


async def test_resolve_composition_maps_each_distinct_source_once(tmp_path: Path) -> None:
    composition = _with(
        clips=(Clip("testsrc:"), Clip("color:red"), Clip("testsrc:")),
        audio=(AudioLayer("sine:440"), AudioLayer("sine:440", start=1.0)),
    )
    resolved = await SourceResolver().resolve_composition(composition, tmp_path)
    assert resolved == {
        "testsrc:": GeneratedTestPattern(),
        "color:red": GeneratedColor("FF0000"),
        "sine:440": GeneratedSine(440.0),
    }


def test_asset_root_given_as_a_symlink_still_contains_its_files(assets: Path, tmp_path: Path) -> None:
    link = tmp_path / "assets-link"
    os.symlink(assets, link)
    assert SourceResolver([link]).resolve_file_source("top.mp4", "f").path == (assets / "top.mp4").resolve()


async def test_an_s3_source_the_role_may_not_read_fails_naming_the_field(tmp_path: Path) -> None:
    # A missing key answers 403, not 404, to a role without s3:ListBucket there: it must still name the field,
    # not fail as "could not fetch ... Forbidden".
    from botocore.exceptions import ClientError

    from renderer.s3 import Boto3Fetcher

    class ForbiddingClient:
        def download_file(self, bucket: str, key: str, filename: str) -> None:
            raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")

    resolver = SourceResolver(s3_fetcher=Boto3Fetcher(ForbiddingClient()), s3_buckets=["media"])
    with pytest.raises(SourceNotFound) as caught:
        await resolver.resolve("s3://media/typo.mp4", "composition.clips[2].source", audio=False, workdir=tmp_path)
    assert caught.value.field == "composition.clips[2].source"
    assert "no such object s3://media/typo.mp4, or not one this renderer may read" in str(caught.value)
