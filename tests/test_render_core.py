"""The ffmpeg render core with the real ffmpeg: formats, layers, literal text, chunked renders, the local
backend. Renders are tiny (160x120, 10 fps, 1-2 s) so the whole file takes seconds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from google.protobuf import json_format

from exportapi.renderer.v1 import renderer_pb2
from renderer.converters import composition as composition_from_proto
from renderer.domain import (
    RESERVATION_SEAL,
    AudioLayer,
    Clip,
    Composition,
    OutputFormat,
    Progress,
    RenderAssignment,
    RenderError,
    Reservation,
    TextLayer,
)
from renderer.errors import SourceRefused
from renderer.ffmpeg_graph import build_render, build_video_chunk, ffmpeg_exe
from renderer.ffmpeg_run import join_chunks, render_audio_track, render_composition, render_video_chunk, run_ffmpeg
from renderer.local_backend import LocalBackend
from renderer.media import decode_frame_rgb, measure, measure_async
from renderer.sources import GeneratedColor, GeneratedSine, GeneratedTestPattern, LocalFile, SourceResolver

NAVY = (0, 0, 128)
RED = (255, 0, 0)
BLUE = (0, 0, 255)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def tiny(seconds: float = 1.5, **fields: object) -> Composition:
    base = Composition(width=160, height=120, fps=10, duration_seconds=seconds, background="navy")
    return dataclasses.replace(base, **fields)


def assignment(c: Composition, fmt: OutputFormat, export_id: str = "export-1") -> RenderAssignment:
    # Only tests of a backend build their own Reservation; everything else gets one from metering.
    reservation = Reservation(export_id, datetime.now(UTC) + timedelta(minutes=2), RESERVATION_SEAL)
    return RenderAssignment(reservation, c, fmt)


def mean_rgb(frame: tuple[int, int, bytes], x0: int, y0: int, x1: int, y1: int) -> tuple[float, float, float]:
    width, _, data = frame
    sums, count = [0, 0, 0], 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            offset = (y * width + x) * 3
            for channel in range(3):
                sums[channel] += data[offset + channel]
            count += 1
    return (sums[0] / count, sums[1] / count, sums[2] / count)


def near(actual: tuple[float, float, float], expected: tuple[int, int, int], tolerance: float = 30) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real media in an asset root: an 80x40 clip (1 s red then 1 s blue), a tone, a corrupt 'video'."""
    root = tmp_path_factory.mktemp("assets")
    exe = ffmpeg_exe()
    two_colours = (
        "color=c=red:s=80x40:r=10:d=1[a];color=c=blue:s=80x40:r=10:d=1[b];[a][b]concat=n=2:v=1:a=0[out0]"
    )
    subprocess.run(
        [exe, "-v", "error", "-y", "-f", "lavfi", "-i", two_colours, "-c:v", "libx264", "-pix_fmt", "yuv420p",
         str(root / "red_then_blue.mp4")],
        check=True,
    )
    subprocess.run(
        [exe, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=660:r=44100:d=1", str(root / "tone.wav")],
        check=True,
    )
    subprocess.run(  # '%d' in the name: an image is one file, never an image2 sequence pattern
        [exe, "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=40x40:d=0.1", "-frames:v", "1",
         "-update", "1", str(root / "square%d.png")],
        check=True,
    )
    subprocess.run(
        [exe, "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=blue:s=64x48:r=10:d=1", "-c:v", "libvpx-vp9",
         "-deadline", "realtime", "-cpu-used", "8", str(root / "blue.webm")],
        check=True,
    )
    (root / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 500)
    return root


@pytest.fixture
def backend(tmp_path: Path, assets: Path) -> LocalBackend:
    return LocalBackend(tmp_path / "renders", asset_roots=[assets])


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", list(OutputFormat))
async def test_each_format_renders_to_the_composition_length(backend: LocalBackend, fmt: OutputFormat) -> None:
    c = tiny(
        1.5,
        clips=(Clip("testsrc:", start=0.2, duration=1.0),),
        texts=(TextLayer("hello", x=4, y=4, font_size=16),),
        audio=(AudioLayer("sine:440", volume=0.5),),
    )
    updates: list[Progress] = []
    output = await backend.render(assignment(c, fmt, f"fmt-{fmt.value}"), updates.append)

    path = Path(urlparse(output.uri).path)
    assert output.uri.startswith("file://") and path == backend.output_dir.resolve() / f"fmt-{fmt.value}.{fmt.value}"
    assert os.listdir(backend.output_dir) == [path.name]  # no temporary leftovers
    assert output.file_size_bytes == path.stat().st_size > 0
    info = measure(path)
    assert info.frames == output.frames == c.frames_total == 15
    assert info.duration_seconds == pytest.approx(1.5, abs=0.02) and output.duration_seconds == info.duration_seconds
    assert info.video is not None and info.video.codec == {"mp4": "h264", "webm": "vp9", "gif": "gif"}[fmt.value]
    assert (info.video.width, info.video.height) == (160, 120)
    if fmt is OutputFormat.GIF:
        assert not info.has_audio
    else:
        assert info.audio is not None and info.audio.codec == {"mp4": "aac", "webm": "opus"}[fmt.value]
        assert info.audio.duration_seconds == pytest.approx(1.5, abs=0.05)
    assert updates and updates[-1] == Progress(15, 15)


async def test_without_audio_layers_the_output_is_video_only(backend: LocalBackend) -> None:
    output = await backend.render(assignment(tiny(1.0), OutputFormat.MP4, "silent"), lambda p: None)
    info = measure(urlparse(output.uri).path)
    assert info.frames == 10 and not info.has_audio


async def test_an_odd_frame_rate_gives_the_exact_frame_count(backend: LocalBackend) -> None:
    c = tiny(1.0, fps=7, clips=(Clip("testsrc:", start=0.3),))
    output = await backend.render(assignment(c, OutputFormat.MP4, "fps7"), lambda p: None)
    assert output.frames == 7 and output.duration_seconds == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------------------------------ layers


async def test_clips_are_scaled_to_fit_trimmed_and_placed_on_the_timeline(backend: LocalBackend) -> None:
    """An 80x40 clip in a 160x120 frame becomes 160x80, centred (rows 20..99); trim_start=1 skips the red
    second, so the clip shows blue from its start at 0.5 s, and the background before it."""
    c = tiny(1.5, clips=(Clip("red_then_blue.mp4", start=0.5, trim_start=1.0, duration=0.7),))
    output = await backend.render(assignment(c, OutputFormat.MP4, "clips"), lambda p: None)
    path = urlparse(output.uri).path
    before, during, after = (decode_frame_rgb(path, index) for index in (2, 8, 13))
    assert near(mean_rgb(before, 40, 40, 120, 80), NAVY)
    assert near(mean_rgb(during, 40, 40, 120, 80), BLUE)
    assert near(mean_rgb(during, 40, 2, 120, 16), NAVY)  # letterbox above the scaled clip
    assert near(mean_rgb(during, 40, 104, 120, 118), NAVY)  # and below
    assert near(mean_rgb(after, 40, 40, 120, 80), NAVY)  # 0.5 + 0.7 = 1.2 s: gone at 1.3 s


async def test_images_and_webm_files_are_clips_too(backend: LocalBackend) -> None:
    c = tiny(1.0, clips=(Clip("blue.webm", duration=0.5), Clip("square%d.png", start=0.5)))
    output = await backend.render(assignment(c, OutputFormat.MP4, "images"), lambda p: None)
    path = urlparse(output.uri).path
    assert output.frames == 10
    # the 4:3 webm fills the frame; the square image becomes 120x120, centred, pillarboxed
    assert near(mean_rgb(decode_frame_rgb(path, 2), 0, 0, 160, 120), BLUE)
    late = decode_frame_rgb(path, 7)
    assert near(mean_rgb(late, 30, 10, 130, 110), RED)
    assert near(mean_rgb(late, 0, 10, 15, 110), NAVY)


async def test_one_file_can_serve_several_layers_with_the_same_timing(backend: LocalBackend) -> None:
    """Layers whose nodes would be identical (same file, offset and length) are still separate chains."""
    c = tiny(
        1.0,
        clips=(Clip("red_then_blue.mp4", duration=0.3), Clip("red_then_blue.mp4", start=0.5, duration=0.3)),
        audio=(AudioLayer("tone.wav"), AudioLayer("tone.wav", volume=0.5)),
    )
    output = await backend.render(assignment(c, OutputFormat.MP4, "reused"), lambda p: None)
    path = urlparse(output.uri).path
    assert output.frames == 10 and measure(path).has_audio
    for index, colour in ((1, RED), (4, NAVY), (6, RED), (9, NAVY)):
        assert near(mean_rgb(decode_frame_rgb(path, index), 40, 40, 120, 80), colour), index


async def test_later_clips_are_drawn_over_earlier_ones(backend: LocalBackend) -> None:
    c = tiny(1.0, clips=(Clip("color:red"), Clip("color:blue", start=0.5)))
    output = await backend.render(assignment(c, OutputFormat.MP4, "order"), lambda p: None)
    path = urlparse(output.uri).path
    assert near(mean_rgb(decode_frame_rgb(path, 2), 0, 0, 160, 120), RED)
    assert near(mean_rgb(decode_frame_rgb(path, 7), 0, 0, 160, 120), BLUE)


async def test_text_is_drawn_only_between_start_and_end(backend: LocalBackend) -> None:
    c = tiny(1.5, texts=(TextLayer("MMMM", start=0.5, end=1.0, x=10, y=40, font_size=40, color="white"),))
    output = await backend.render(assignment(c, OutputFormat.MP4, "text"), lambda p: None)
    path = urlparse(output.uri).path
    region = (10, 40, 110, 80)
    shown = [index for index in range(15) if mean_rgb(decode_frame_rgb(path, index), *region)[0] > 60]
    assert shown == [5, 6, 7, 8, 9]


async def test_audio_layers_from_files_and_generators_are_mixed(backend: LocalBackend) -> None:
    c = tiny(2.0, audio=(AudioLayer("tone.wav", start=0.5, volume=2.0), AudioLayer("sine:220", volume=0.3)))
    output = await backend.render(assignment(c, OutputFormat.WEBM, "audio"), lambda p: None)
    info = measure(urlparse(output.uri).path)
    assert info.audio is not None and info.audio.duration_seconds == pytest.approx(2.0, abs=0.05)
    assert info.frames == 20


# ------------------------------------------------------------------------------------------ hostile text

HOSTILE = [
    ": ' \\ % [ ] ; %{pts} \n",
    "'[out]; nullsrc",
    "A%{pts}",
    "x\\'; drawtext=text=pwned:fontsize=99 [v] %{eif:n:d} %%{localtime}",
]


def test_user_text_never_reaches_the_filter_graph(tmp_path: Path) -> None:
    """The graph is the same whatever the text says; the text reaches ffmpeg only as the file's bytes."""
    benign = tiny(1.0, texts=(TextLayer("plain", x=4, y=4),))
    reference = build_render(benign, OutputFormat.MP4, tmp_path / "o.mp4", {}, workdir=tmp_path)
    for text in HOSTILE:
        c = tiny(1.0, texts=(TextLayer(text, x=4, y=4),))
        command = build_render(c, OutputFormat.MP4, tmp_path / "o.mp4", {}, workdir=tmp_path)
        assert command.args == reference.args
        assert "expansion=none" in command.filter_graph and "textfile=" in command.filter_graph
        assert not any(text.strip() in arg for arg in command.args)
        assert command.temp_files[0].read_text(encoding="utf-8") == text


async def _render_text_frame(
    tmp_path: Path, name: str, text: str, *, file_text: str | None = None, expansion: str = "none"
) -> bytes:
    """Frame 0 of a one-text render; optionally with other bytes in the text file and another expansion
    mode, to draw a baseline through ffmpeg's own escaping instead of ours."""
    c = tiny(0.3, texts=(TextLayer(text, x=4, y=4, font_size=14),))
    work = tmp_path / name
    work.mkdir()
    command = build_render(c, OutputFormat.MP4, work / "out.mp4", {}, workdir=work)
    if file_text is not None:
        command.temp_files[0].write_text(file_text, encoding="utf-8")
    args = [arg.replace("expansion=none", f"expansion={expansion}") for arg in command.args]
    await run_ffmpeg(args)
    return decode_frame_rgb(work / "out.mp4", 0)[2]


@pytest.mark.parametrize("text", [HOSTILE[0] + HOSTILE[1], "A%{pts}"], ids=["syntax", "expansion"])
async def test_hostile_text_renders_literally(tmp_path: Path, text: str) -> None:
    """Our frame equals a baseline in which ffmpeg expands an escaped copy of the text (backslash and
    percent escaped: the documented way to draw them literally), and differs from an unescaped expansion."""
    ours = await _render_text_frame(tmp_path, "ours", text)
    escaped = text.replace("\\", "\\\\").replace("%", "\\%")
    baseline = await _render_text_frame(tmp_path, "baseline", text, file_text=escaped, expansion="normal")
    assert ours == baseline
    empty = await _render_text_frame(tmp_path, "empty", "A", file_text=" ")
    assert ours != empty  # something was drawn at all
    if "%{pts}" in text and "\\" not in text:
        expanded = await _render_text_frame(tmp_path, "expanded", text, expansion="normal")
        assert ours != expanded  # the check would notice an expansion


# ------------------------------------------------------------------------------------------ chunks


async def test_chunks_concat_with_audio_have_exactly_the_frames_of_the_whole(tmp_path: Path, assets: Path) -> None:
    # The test pattern stays inside the first chunk: its drawn clock restarts in each chunk (see
    # test_a_chunk_in_the_middle_of_a_test_pattern_starts_the_pattern_afresh); the other layers cross boundaries.
    c = tiny(
        2.0,
        clips=(
            Clip("testsrc:", start=0.3, duration=0.4),
            Clip("color:green", start=0.6, duration=0.4),
            Clip("red_then_blue.mp4", start=1.1, duration=0.5),
        ),
        texts=(TextLayer("chunked", start=0.5, end=1.7, x=4, y=4, font_size=16),),
        audio=(AudioLayer("sine:440", volume=0.5), AudioLayer("tone.wav", start=0.7)),
    )
    resolver = SourceResolver([assets])
    plan = [(0, 7), (7, 7), (14, 6)]  # 20 frames, an uneven last chunk
    chunk_paths = [tmp_path / f"chunk-{index}.mp4" for index in range(len(plan))]
    for (first, count), path in zip(plan, chunk_paths, strict=True):
        await render_video_chunk(c, first, count, path, resolver=resolver)
        chunk = measure(path)
        assert chunk.frames == count and not chunk.has_audio
    audio_path = tmp_path / "audio.m4a"
    await render_audio_track(c, audio_path, resolver=resolver)
    audio = measure(audio_path)
    assert audio.video is None and audio.audio is not None
    assert audio.audio.duration_seconds == pytest.approx(2.0, abs=0.05)

    joined = tmp_path / "joined.mp4"
    await join_chunks(c, chunk_paths, audio_path, joined)
    info = measure(joined)
    assert info.frames == c.frames_total == 20
    assert info.duration_seconds == pytest.approx(2.0, abs=0.01)
    assert info.audio is not None and info.audio.duration_seconds == pytest.approx(2.0, abs=0.05)

    # Frame for frame the same picture as a render in one piece (up to encoding noise).
    whole = tmp_path / "whole.mp4"
    await render_composition(c, OutputFormat.MP4, whole, resolver=resolver)
    for index in (0, 3, 6, 7, 12, 13, 14, 19):
        a, b = decode_frame_rgb(joined, index), decode_frame_rgb(whole, index)
        assert near(mean_rgb(a, 0, 0, 160, 120), mean_rgb(b, 0, 0, 160, 120), tolerance=6), index
        assert near(mean_rgb(a, 40, 40, 120, 80), mean_rgb(b, 40, 40, 120, 80), tolerance=12), index


async def test_a_join_without_audio_is_video_only(tmp_path: Path) -> None:
    c = tiny(1.0, clips=(Clip("testsrc:"),))
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    await render_video_chunk(c, 0, 4, paths[0], resolver=SourceResolver())
    await render_video_chunk(c, 4, 6, paths[1], resolver=SourceResolver())
    await join_chunks(c, paths, None, tmp_path / "joined.mp4")
    info = measure(tmp_path / "joined.mp4")
    assert info.frames == 10 and not info.has_audio


def test_every_chunk_is_encoded_with_the_same_settings_and_starts_on_a_keyframe(tmp_path: Path) -> None:
    c = tiny(2.0, clips=(Clip("testsrc:"),))
    sources = {"testsrc:": GeneratedTestPattern()}

    def encoder_args(first: int, count: int) -> list[str]:
        """Everything after the filter graph: the stream mapping and the output's options."""
        args = build_video_chunk(c, first, count, tmp_path / "x.mp4", sources, workdir=tmp_path).args
        return args[args.index("-map") :]

    assert encoder_args(0, 7) == encoder_args(7, 7) == encoder_args(14, 6)
    args = encoder_args(0, 7)
    assert args[args.index("-force_key_frames") + 1] == "expr:eq(n,0)" and "+cgop" in args and "-an" in args
    with pytest.raises(ValueError):
        build_video_chunk(c, 15, 6, tmp_path / "x.mp4", sources, workdir=tmp_path)


# A day into a generated source, at the largest size and rate: ffmpeg must not be asked for the day's frames.
_FAR = 86400.0
_FAR_SOURCES = {
    "testsrc:": GeneratedTestPattern(),
    "color:red": GeneratedColor("ff0000"),
    "still.png": LocalFile(Path("/nonexistent/still.png"), "image2", True),
    "sine:440": GeneratedSine(440.0),
}


def _far_composition(seconds: float) -> Composition:
    return Composition(
        width=3840, height=2160, fps=60, duration_seconds=seconds,
        clips=tuple(Clip(source, trim_start=_FAR) for source in ("testsrc:", "color:red", "still.png")),
        audio=(AudioLayer("sine:440"),),
    )


def _generated_seconds(args: list[str]) -> list[float]:
    """Every length ffmpeg is asked to generate or read: source filters' `d=`, inputs' `-t`."""
    graph = args[args.index("-filter_complex") + 1]
    lengths = [float(m) for m in re.findall(r"(?:^|[;\]])(?:testsrc2|color|sine)=(?:[^;\[]*:)?d=([0-9.]+)", graph)]
    lengths += [float(args[i + 1]) for i, arg in enumerate(args) if arg == "-t"]
    return lengths


@pytest.mark.parametrize(
    ("seconds", "first", "count"),
    [(1.0, None, 60), (3600.0, 215_400, 600)],
    ids=["whole-render", "last-chunk-of-an-hour"],
)
def test_trim_start_on_generated_sources_and_images_asks_for_no_frames_before_it(
    tmp_path: Path, seconds: float, first: int | None, count: int
) -> None:
    """testsrc2 has no start option: the graph once generated `trim_start` + the clip's time of frames and
    dropped all but the last (5,184,000 4K frames for trim_start = 1 day). Every generated source and image
    now produces only the frames of the render's window (a chunk: its own, not those before it)."""
    c = _far_composition(seconds)
    if first is None:
        command = build_render(c, OutputFormat.MP4, tmp_path / "o.mp4", _FAR_SOURCES, workdir=tmp_path)
    else:
        command = build_video_chunk(c, first, count, tmp_path / "o.mp4", _FAR_SOURCES, workdir=tmp_path)
    lengths = _generated_seconds(command.args)
    # background + testsrc2 + color + the image's -t (+ sine in a whole render)
    assert len(lengths) == (5 if first is None else 4), command.args
    assert max(lengths) <= (count + 1) / 60 + 1e-6, lengths
    assert "trim=start" not in command.filter_graph


@pytest.mark.timeout(60)
async def test_a_test_pattern_a_day_into_its_source_renders_at_once(tmp_path: Path) -> None:
    """Before, ffmpeg generated 864,000 frames to throw away (and a chunk at the end of an hour-long
    composition 900,000) before the first useful one."""
    resolver = SourceResolver()
    c = tiny(1.0, clips=(Clip("testsrc:", trim_start=_FAR),))
    await render_composition(c, OutputFormat.MP4, tmp_path / "whole.mp4", resolver=resolver)
    assert measure(tmp_path / "whole.mp4").frames == 10

    hour = tiny(3600.0, clips=(Clip("testsrc:", trim_start=_FAR),))
    await render_video_chunk(hour, 35_990, 10, tmp_path / "chunk.mp4", resolver=resolver)
    assert measure(tmp_path / "chunk.mp4").frames == 10


def _quadrant_means(frame: tuple[int, int, bytes]) -> list[tuple[float, float, float]]:
    return [mean_rgb(frame, x, y, x + 80, y + 60) for x in (0, 80) for y in (0, 60)]


async def test_a_chunk_in_the_middle_of_a_test_pattern_starts_the_pattern_afresh(tmp_path: Path) -> None:
    """The price of generating only a chunk's own frames: testsrc2 draws its own clock and counter, so each
    chunk's pattern starts where a whole render's starts (and trim_start does not move it)."""
    resolver = SourceResolver()
    c = tiny(2.0, clips=(Clip("testsrc:"),))
    await render_composition(c, OutputFormat.MP4, tmp_path / "whole.mp4", resolver=resolver)
    await render_video_chunk(c, 10, 10, tmp_path / "second.mp4", resolver=resolver)
    trimmed = tiny(1.0, clips=(Clip("testsrc:", trim_start=5.0),))
    await render_composition(trimmed, OutputFormat.MP4, tmp_path / "trimmed.mp4", resolver=resolver)

    start = _quadrant_means(decode_frame_rgb(tmp_path / "whole.mp4", 0))
    for name in ("second.mp4", "trimmed.mp4"):
        frame = _quadrant_means(decode_frame_rgb(tmp_path / name, 0))
        assert all(near(a, b, tolerance=6) for a, b in zip(frame, start, strict=True)), name
    # and the pattern does move: the whole render's frame 10 is not its frame 0
    later = _quadrant_means(decode_frame_rgb(tmp_path / "whole.mp4", 10))
    assert not all(near(a, b, tolerance=6) for a, b in zip(later, start, strict=True))


async def test_generated_sources_are_filters_inside_the_graph_never_lavfi_inputs(tmp_path: Path) -> None:
    """The imageio-ffmpeg binary deadlocks now and then when `-f lavfi` inputs feed a graph with audio; source
    filters inside -filter_complex do not. Identical generated sources stay separate filters."""
    c = tiny(
        1.0,
        clips=(Clip("color:red"), Clip("color:red"), Clip("testsrc:", start=0.5)),
        audio=(AudioLayer("sine:440"), AudioLayer("sine:440", volume=0.5)),
    )
    output = tmp_path / "generated.mp4"
    command = await render_composition(c, OutputFormat.MP4, output, resolver=SourceResolver())
    assert "-i" not in command.args and "lavfi" not in command.args
    graph = command.filter_graph
    assert (graph.count("color="), graph.count("testsrc2="), graph.count("sine=")) == (3, 1, 2)
    info = measure(output)
    assert info.frames == 10 and info.audio is not None
    assert near(mean_rgb(decode_frame_rgb(output, 2), 0, 0, 160, 120), RED)


async def test_sixty_tiny_renders_with_audio_all_finish(tmp_path: Path) -> None:
    """With generated sources as `-f lavfi` inputs, 5 to 15 % of renders of this shape hung forever (this
    test failed 5 times in 5); with them inside the graph, none in 500. Each render is bounded: a hang
    fails here instead of hanging the suite."""
    c = tiny(
        1.0,
        clips=(Clip("testsrc:"),),
        texts=(TextLayer("again", x=4, y=4, font_size=14),),
        audio=(AudioLayer("sine:440"),),
    )
    resolver = SourceResolver()

    async def render(attempt: int) -> None:
        output = tmp_path / f"tiny-{attempt}.mp4"
        await asyncio.wait_for(
            render_composition(c, OutputFormat.MP4, output, resolver=resolver, stall_seconds=None), timeout=20
        )
        info = await measure_async(output)
        assert info.frames == 10 and info.audio is not None, attempt
        output.unlink()

    for pair in range(30):  # two at a time, as on a busy server
        await asyncio.gather(render(2 * pair), render(2 * pair + 1))


# ------------------------------------------------------------------------------------------ backend


def test_a_render_assignment_needs_a_real_reservation() -> None:
    with pytest.raises(PermissionError):
        Reservation("export-1", datetime.now(UTC), object())  # type: ignore[arg-type]
    with pytest.raises(PermissionError):
        Reservation("", datetime.now(UTC), RESERVATION_SEAL)

    @dataclasses.dataclass
    class LookAlike:
        export_id: str = "export-1"

    with pytest.raises(PermissionError):
        RenderAssignment(LookAlike(), tiny(), OutputFormat.MP4)  # type: ignore[arg-type]


async def test_the_backend_refuses_anything_but_an_assignment(backend: LocalBackend) -> None:
    @dataclasses.dataclass
    class Unreserved:
        composition: Composition
        format: OutputFormat
        export_id: str = "sneaky"

    with pytest.raises(PermissionError):
        await backend.render(Unreserved(tiny(), OutputFormat.MP4), lambda p: None)  # type: ignore[arg-type]
    assert not backend.output_dir.exists() or not os.listdir(backend.output_dir)


async def test_an_export_id_cannot_climb_out_of_the_output_dir(backend: LocalBackend) -> None:
    with pytest.raises(RenderError):
        await backend.render(assignment(tiny(), OutputFormat.MP4, "../../escape"), lambda p: None)
    assert not (backend.output_dir.parent.parent / "escape.mp4").exists()


async def test_a_failing_render_raises_ffmpegs_error_and_leaves_no_file(backend: LocalBackend) -> None:
    c = tiny(1.0, clips=(Clip("corrupt.mp4"),))
    with pytest.raises(RenderError) as caught:
        await backend.render(assignment(c, OutputFormat.MP4, "broken"), lambda p: None)
    message = str(caught.value)
    assert "ffmpeg failed" in message and "Invalid data found" in message
    assert "corrupt.mp4" in message and str(backend.output_dir) not in message
    assert str(next(iter(backend.resolver.asset_roots))) not in message  # the user's name, not the server's path
    assert not os.listdir(backend.output_dir)


async def test_a_refused_source_fails_before_ffmpeg_runs(backend: LocalBackend) -> None:
    c = tiny(1.0, clips=(Clip("testsrc:"), Clip("../outside.mp4")))
    with pytest.raises(SourceRefused) as caught:
        backend.check(c)
    assert caught.value.field == "composition.clips[1].source"
    with pytest.raises(SourceRefused):
        await backend.render(assignment(c, OutputFormat.MP4, "refused"), lambda p: None)
    assert not os.listdir(backend.output_dir)


async def test_concurrent_renders_each_get_their_own_complete_file(backend: LocalBackend) -> None:
    c = tiny(1.0, clips=(Clip("testsrc:"),), texts=(TextLayer("same text", x=4, y=4, font_size=14),))
    outputs = await asyncio.gather(
        *(backend.render(assignment(c, fmt, f"concurrent-{fmt.value}"), lambda p: None) for fmt in OutputFormat)
    )
    assert sorted(os.listdir(backend.output_dir)) == sorted(f"concurrent-{f.value}.{f.value}" for f in OutputFormat)
    assert all(output.frames == 10 for output in outputs)


class _DirectoryFetcher:
    """A stand-in for S3 that serves objects from a directory (the Lambda tests use moto's real S3)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def fetch(self, bucket: str, key: str, destination: Path) -> None:
        source = self.root / bucket / key
        if not source.is_file():
            raise FileNotFoundError(key)
        destination.write_bytes(source.read_bytes())


async def test_s3_sources_are_fetched_through_the_configured_fetcher(tmp_path: Path, assets: Path) -> None:
    (tmp_path / "s3" / "media").mkdir(parents=True)
    (tmp_path / "s3" / "media" / "clip.mp4").write_bytes((assets / "red_then_blue.mp4").read_bytes())
    backend = LocalBackend(tmp_path / "renders", s3_fetcher=_DirectoryFetcher(tmp_path / "s3"), s3_buckets=["media"])
    c = tiny(1.0, clips=(Clip("s3://media/clip.mp4", trim_start=1.0),))
    output = await backend.render(assignment(c, OutputFormat.MP4, "from-s3"), lambda p: None)
    assert near(mean_rgb(decode_frame_rgb(urlparse(output.uri).path, 3), 40, 40, 120, 80), BLUE)


def _pids_running(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


async def test_cancelling_a_render_stops_ffmpeg_and_removes_the_partial_file(backend: LocalBackend) -> None:
    # Long enough that it is certainly still running when cancelled; it only runs for a moment.
    c = Composition(
        width=1280, height=720, fps=30, duration_seconds=300, clips=(Clip("testsrc:"),),
        texts=(TextLayer("cancel me", font_size=64),),
    )
    started = asyncio.Event()

    def on_progress(progress: Progress) -> None:
        if progress.frames_rendered > 0:
            started.set()

    export_id = "cancel-7f3a9c"
    task = asyncio.create_task(backend.render(assignment(c, OutputFormat.MP4, export_id), on_progress))
    await asyncio.wait_for(started.wait(), timeout=60)
    pids = _pids_running(export_id)
    assert len(pids) == 1  # the ffmpeg writing our partial file
    assert any(name.startswith(f".{export_id}") for name in os.listdir(backend.output_dir))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not Path(f"/proc/{pids[0]}").exists()
    assert not os.listdir(backend.output_dir)


# Writes a bit of its output, then hangs like the deadlocked ffmpeg; stops on 'q' as ffmpeg does.
_STALLING_FFMPEG = """\
import os, sys, threading, time
with open(sys.argv[-1], "wb") as partial:
    partial.write(b"partial")
threading.Thread(target=lambda: sys.stdin.read(1) and os._exit(255), daemon=True).start()
while True:
    sys.stdout.write("frame=2\\nout_time_us=200000\\nprogress=continue\\n")
    sys.stdout.flush()
    time.sleep(0.1)
"""


async def test_a_stalled_render_fails_and_leaves_no_file(
    tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "stalling-ffmpeg"
    fake.write_text(f"#!{sys.executable}\n{_STALLING_FFMPEG}")
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    backend = LocalBackend(tmp_path / "renders", asset_roots=[assets], stall_seconds=0.5)
    c = tiny(1.0, clips=(Clip("red_then_blue.mp4"),), audio=(AudioLayer("sine:440"),))
    render = backend.render(assignment(c, OutputFormat.MP4, "stalled"), lambda p: None)
    with pytest.raises(RenderError, match="ffmpeg stalled"):
        await asyncio.wait_for(render, timeout=30)
    assert not os.listdir(backend.output_dir)
    assert not _pids_running(str(fake))


async def test_the_example_hello_renders(backend: LocalBackend) -> None:
    message = json_format.ParseDict(json.loads((EXAMPLES / "hello.json").read_text()), renderer_pb2.Composition())
    c = composition_from_proto(message)
    output = await backend.render(assignment(c, OutputFormat.MP4, "hello"), lambda p: None)
    assert output.frames == c.frames_total == 75
    assert measure(urlparse(output.uri).path).has_audio
