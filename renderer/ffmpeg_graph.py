"""Composition -> ffmpeg argument list, built with ffmpeg-python (its filter-graph escaping, no string
concatenation of anything a user wrote).

What reaches ffmpeg's syntax: validated numbers, hex colours from `validation.parse_color`, paths the
renderer chose (resolved asset files, its own work directory). User text is written to a per-render text
file and drawn with `drawtext=textfile=...:expansion=none`, so `: ' \\ % [ ] ;`, `%{...}` and newlines are
drawn literally and can never change the graph. Generated sources (color, testsrc2, sine) are source
filters inside -filter_complex, never `-f lavfi` inputs (see `_SourceFilter`); only files are inputs.

Builders, all pure apart from writing the text files into `workdir`:
  build_render       the whole composition in one format (mp4 / webm / gif), audio included
  build_video_chunk  frames [first, first + count) as h264 video-only mp4, identical settings in every
                     chunk, a keyframe (IDR, closed GOP) on the chunk's first frame
  build_audio        the whole audio track alone (AAC in .m4a), for muxing after a chunked render
  build_join         chunk files concatenated with the concat demuxer (no re-encode) + the audio track

Timing: frame i of the composition is at i / fps. A layer covers the frames whose time lies in
[start, end), so chunked and whole renders agree frame for frame, except the testsrc2 pattern, which starts
afresh in each chunk (see `_clip_stream`). When a composition has no audio layers
the output has no audio track (mp4/webm included): simplest, and a player treats it as silent.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import ffmpeg

from renderer.domain import Composition, OutputFormat, fps_fraction
from renderer.sources import GeneratedColor, GeneratedSine, GeneratedTestPattern, LocalFile, ResolvedSource
from renderer.validation import parse_color

FONT_FILE = Path(__file__).resolve().parent / "fonts" / "DejaVuSans.ttf"
AUDIO_EXTENSION = "m4a"
# A time that is a hair below a frame boundary still belongs to that frame (float input like 0.1 * 3).
_FRAME_EPSILON = 1e-6


def ffmpeg_exe() -> str:
    """The ffmpeg binary: $IMAGEIO_FFMPEG_EXE, else the one shipped in the imageio-ffmpeg wheel."""
    exe = os.environ.get("IMAGEIO_FFMPEG_EXE")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """Encoder knobs. The defaults favour speed: renders are small and the machines shared."""

    x264_preset: str = "veryfast"
    x264_crf: int = 23
    vp9_deadline: str = "realtime"
    vp9_cpu_used: int = 8
    vp9_crf: int = 34
    audio_bitrate: str = "128k"
    audio_sample_rate: int = 48000
    threads: int = 0  # 0: ffmpeg decides


DEFAULT_SETTINGS = EncoderSettings()


@dataclass(slots=True)
class FfmpegCommand:
    """An ffmpeg argument list (binary first) and what it will produce."""

    args: list[str]
    output: Path
    frames_total: int  # video frames expected in the output (0 for audio only)
    duration_seconds: float
    temp_files: tuple[Path, ...] = field(default=())

    def remove_temp_files(self) -> None:
        for path in self.temp_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @property
    def filter_graph(self) -> str:
        """The -filter_complex text ('' when none): what tests inspect for leaked user text."""
        if "-filter_complex" in self.args:
            return self.args[self.args.index("-filter_complex") + 1]
        return ""


def frame_at_or_after(seconds: float, rate: Fraction) -> int:
    """Index of the first frame whose time is >= seconds."""
    return max(0, math.ceil(seconds * rate - _FRAME_EPSILON))


def extension_of(fmt: OutputFormat) -> str:
    return fmt.value


# ------------------------------------------------------------------------------------------ builders


def build_render(
    c: Composition,
    fmt: OutputFormat,
    output: Path,
    sources: Mapping[str, ResolvedSource],
    *,
    workdir: Path,
    settings: EncoderSettings = DEFAULT_SETTINGS,
) -> FfmpegCommand:
    """The whole composition to `output` in `fmt`, audio included when there are audio layers."""
    graph = _Graph(c, sources, workdir, first_frame=0, frame_count=c.frames_total)
    video = graph.video()
    audio = graph.audio(settings.audio_sample_rate)
    streams = [video] if audio is None else [video, audio]
    if fmt is OutputFormat.GIF:
        # A palette per frame: a whole-video palette would hold every frame in memory until the end.
        split = video.filter_multi_output("split")
        palette = split[0].filter("palettegen", stats_mode="single")
        streams = [ffmpeg.filter([split[1], palette], "paletteuse", new=1, dither="bayer", bayer_scale=3)]
        options: dict[str, object] = {"format": "gif", "r": _rate(graph.rate), "loop": 0}
    elif fmt is OutputFormat.WEBM:
        options = {"format": "webm", **_vp9_options(settings, graph.rate)}
        options.update(_opus_options(settings) if audio is not None else {"an": None})
    else:
        options = {"format": "mp4", **_x264_options(settings, graph.rate), "movflags": "+faststart"}
        options.update(_aac_options(settings) if audio is not None else {"an": None})
    if settings.threads:
        options["threads"] = settings.threads
    return graph.command(streams, output, options, frames_total=c.frames_total)


def build_video_chunk(
    c: Composition,
    first_frame: int,
    frame_count: int,
    output: Path,
    sources: Mapping[str, ResolvedSource],
    *,
    workdir: Path,
    settings: EncoderSettings = DEFAULT_SETTINGS,
) -> FfmpegCommand:
    """Frames [first_frame, first_frame + frame_count) as h264 video-only mp4, for `build_join`.

    Every chunk of a composition gets the same encoder settings (so the streams concatenate without
    re-encoding) and starts on a keyframe."""
    if not (0 <= first_frame and frame_count >= 1 and first_frame + frame_count <= c.frames_total):
        raise ValueError(f"frames [{first_frame}, {first_frame + frame_count}) outside 0..{c.frames_total}")
    graph = _Graph(c, sources, workdir, first_frame=first_frame, frame_count=frame_count)
    options: dict[str, object] = {"format": "mp4", **_x264_options(settings, graph.rate), "an": None}
    if settings.threads:
        options["threads"] = settings.threads
    return graph.command([graph.video()], output, options, frames_total=frame_count)


def build_audio(
    c: Composition,
    output: Path,
    sources: Mapping[str, ResolvedSource],
    *,
    workdir: Path,
    settings: EncoderSettings = DEFAULT_SETTINGS,
) -> FfmpegCommand:
    """The composition's whole audio track, AAC in an .m4a, exactly the composition's length."""
    if not c.sounding_audio:
        raise ValueError("the composition has no audio layers that sound")
    graph = _Graph(c, sources, workdir, first_frame=0, frame_count=c.frames_total)
    audio = graph.audio(settings.audio_sample_rate)
    assert audio is not None
    options: dict[str, object] = {"format": "mp4", "vn": None, **_aac_options(settings)}
    return graph.command([audio], output, options, frames_total=0)


def build_join(
    chunk_paths: Sequence[Path],
    audio_path: Path | None,
    output: Path,
    *,
    workdir: Path,
    frames_total: int,
    duration_seconds: float,
) -> FfmpegCommand:
    """Concatenate h264 chunks (from `build_video_chunk`, in order) without re-encoding, mux the audio track
    (from `build_audio`) if any, into a fast-start mp4. The list file is written into `workdir`."""
    if not chunk_paths:
        raise ValueError("nothing to join")
    list_file = workdir / "chunks.txt"
    list_file.write_text("ffconcat version 1.0\n" + "".join(f"file {_concat_quote(p)}\n" for p in chunk_paths))
    video = ffmpeg.input(str(list_file), format="concat", safe=0, protocol_whitelist="file")["v:0"]
    streams = [video]
    options: dict[str, object] = {"format": "mp4", "c": "copy", "movflags": "+faststart"}
    if audio_path is not None:
        streams.append(ffmpeg.input(_file_url(audio_path), format="mp4", protocol_whitelist="file")["a:0"])
    node = ffmpeg.output(*streams, str(output), **options)
    return FfmpegCommand(
        args=_finish(_compile(node)),
        output=output,
        frames_total=frames_total,
        duration_seconds=duration_seconds,
        temp_files=(list_file,),
    )


# ------------------------------------------------------------------------------------------ the graph


class _Graph:
    """One composition over the frame window [first_frame, first_frame + frame_count)."""

    def __init__(
        self,
        c: Composition,
        sources: Mapping[str, ResolvedSource],
        workdir: Path,
        *,
        first_frame: int,
        frame_count: int,
    ) -> None:
        self.c = c
        self.sources = sources
        self.workdir = workdir
        self.rate = fps_fraction(c.fps)
        self.first = first_frame
        self.count = frame_count
        self.frames_total = c.frames_total
        self.temp_files: list[Path] = []

    # --- timing helpers -------------------------------------------------------------------------------

    def _seconds(self, frames: int | Fraction) -> float:
        return float(Fraction(frames) / self.rate)

    def _window(self, start: float, end: float | None) -> tuple[int, int] | None:
        """Local frame indexes [j0, j1) of a layer covering [start, end) seconds, clipped to the window."""
        a = frame_at_or_after(start, self.rate)
        b = self.frames_total if end is None else min(self.frames_total, frame_at_or_after(end, self.rate))
        j0, j1 = max(a, self.first) - self.first, min(b, self.first + self.count) - self.first
        return (j0, j1) if j0 < j1 else None

    def _enable(self, j0: int, j1: int) -> str:
        # Half a frame of margin on each side: exact frame times never sit on a comparison's edge.
        since = _num(self._seconds(Fraction(2 * j0 - 1, 2)))
        until = _num(self._seconds(Fraction(2 * j1 - 1, 2)))
        return f"gte(t,{since})*lt(t,{until})"

    # --- video ----------------------------------------------------------------------------------------

    def video(self) -> ffmpeg.nodes.FilterableStream:
        c = self.c
        size = f"{c.width}x{c.height}"
        # One spare frame of source, cut exactly by trim: the frame count never depends on float rounding.
        stream = _source(
            "color",
            c="0x" + parse_color(c.background, "composition.background"),
            s=size,
            r=_rate(self.rate),
            d=_num(self._seconds(self.count + 1)),
        ).filter("trim", end_frame=self.count)
        stream = stream.filter("setpts", "PTS-STARTPTS").filter("setsar", "1")
        for index, clip in enumerate(c.clips):
            end = clip.start + clip.duration if clip.duration > 0 else None
            window = self._window(clip.start, end)
            if window is None:
                continue
            j0, j1 = window
            offset = clip.trim_start + max(0.0, self._seconds(j0 + self.first) - clip.start)
            layer = self._clip_stream(self.sources[clip.source], offset, j1 - j0, f"composition.clips[{index}]")
            # Shift onto the timeline: j0 frames, in whatever time base the chain ended with.
            rate = self.rate
            layer = layer.filter("setpts", f"PTS-STARTPTS+round({j0}*{rate.denominator}/({rate.numerator}*TB))")
            stream = ffmpeg.overlay(
                stream, layer, x="(W-w)/2", y="(H-h)/2", eof_action="pass", enable=self._enable(j0, j1)
            )
        for index, text in enumerate(c.texts):
            if not text.text:
                continue
            window = self._window(text.start, text.end or None)
            if window is None:
                continue
            text_file = self.workdir / f"text-{index:03d}.txt"
            text_file.write_text(text.text, encoding="utf-8")
            self.temp_files.append(text_file)
            stream = stream.filter(
                "drawtext",
                fontfile=str(FONT_FILE),
                textfile=str(text_file),
                expansion="none",
                fontsize=text.font_size,
                fontcolor="0x" + parse_color(text.color, f"composition.texts[{index}].color"),
                x=text.x,
                y=text.y,
                enable=self._enable(*window),
            )
        return stream

    def _clip_stream(
        self, source: ResolvedSource, offset: float, frames: int, field: str
    ) -> ffmpeg.nodes.FilterableStream:
        c = self.c
        length = _num(self._seconds(frames + 1))
        rate = _rate(self.rate)
        match source:
            case GeneratedTestPattern():
                # Only this layer's frames, never the offset's: testsrc2 has no start option and draws its own
                # frame counter, so reaching an offset meant generating (and dropping) every frame before it,
                # work proportional to trim_start (up to a day of frames) or to a chunk's place in the render.
                # The pattern (moving parts, clock, counter) is decoration: it starts from 0 at the layer's first
                # frame in this render (in a chunked render, the chunk's first), whatever trim_start says.
                stream = _source("testsrc2", s=f"{c.width}x{c.height}", r=rate, d=length)
            case GeneratedColor(hex_rgb):
                stream = _source("color", c=f"0x{hex_rgb}", s=f"{c.width}x{c.height}", r=rate, d=length)
            case LocalFile(path, demuxer, is_image) if is_image:
                stream = _input(
                    _file_url(path),
                    format=demuxer,
                    pattern_type="none",
                    loop=1,
                    framerate=rate,
                    t=length,
                    protocol_whitelist="file",
                )["v:0"]
            case LocalFile(path, demuxer, _):
                options = {"format": demuxer, "ss": _num(offset), "t": length, "protocol_whitelist": "file"}
                stream = _input(_file_url(path), **options)["v:0"]
            case _:
                raise ValueError(f"{field}.source is not a video source")
        return (
            stream.filter("setpts", "PTS-STARTPTS")
            .filter("fps", rate)
            .filter("scale", w=c.width, h=c.height, force_original_aspect_ratio="decrease")
            .filter("setsar", "1")
            .filter("trim", end_frame=frames)
        )

    # --- audio ----------------------------------------------------------------------------------------

    def audio(self, sample_rate: int) -> ffmpeg.nodes.FilterableStream | None:
        """The full-length mix (audio is never chunked), or None without audio layers."""
        c = self.c
        sounding = c.sounding_audio  # the one rule for which layers are heard
        if not sounding:
            return None
        total_seconds = Fraction(self.frames_total) / self.rate
        total_samples = round(total_seconds * sample_rate)
        layers = []
        for index, layer in enumerate(c.audio):  # by index: an error names the layer's field
            if layer not in sounding:
                continue
            available = float(total_seconds) - layer.start
            source = self.sources[layer.source]
            match source:
                case GeneratedSine(frequency_hz):
                    stream = _source("sine", f=_num(frequency_hz), r=sample_rate, d=_num(available))
                case LocalFile(path, demuxer, False):
                    options = {"format": demuxer, "t": _num(available), "protocol_whitelist": "file"}
                    stream = _input(_file_url(path), **options)["a:0"]
                case _:
                    raise ValueError(f"composition.audio[{index}].source is not an audio source")
            stream = (
                stream.filter("asetpts", "PTS-STARTPTS")
                .filter("aresample", sample_rate)
                .filter("aformat", sample_fmts="fltp", channel_layouts="stereo")
                .filter("volume", _num(layer.volume))
            )
            delay = round(layer.start * sample_rate)
            if delay:
                stream = stream.filter("adelay", delays=f"{delay}S", all=1)
            layers.append(stream)
        mixed = (
            layers[0]
            if len(layers) == 1
            else ffmpeg.filter(layers, "amix", inputs=len(layers), duration="longest", normalize=0)
        )
        return mixed.filter("apad", whole_len=total_samples).filter("atrim", end_sample=total_samples)

    # --- output ---------------------------------------------------------------------------------------

    def command(
        self,
        streams: list[ffmpeg.nodes.FilterableStream],
        output: Path,
        options: Mapping[str, object],
        *,
        frames_total: int,
    ) -> FfmpegCommand:
        node = ffmpeg.output(*streams, str(output), **options)
        return FfmpegCommand(
            args=_finish(_compile(node)),
            output=output,
            frames_total=frames_total,
            duration_seconds=self._seconds(self.count) if frames_total else self._seconds(self.frames_total),
            temp_files=tuple(self.temp_files),
        )


# ------------------------------------------------------------------------------------------ helpers


class _Distinct:
    """ffmpeg-python identifies a node by its arguments and upstream nodes alone (not even its name): two
    layers from the same source with the same timing would share their nodes, and a node feeding two pads
    is refused ("a split filter is probably required"). A layer's own source node is distinct from any
    other, so each layer's whole chain is its own."""

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class _FileInput(_Distinct, ffmpeg.nodes.InputNode):
    """An `-i` input of one layer; the same file used by two layers is opened twice."""


def _input(filename: str, **kwargs: object) -> ffmpeg.nodes.FilterableStream:
    return _FileInput("input", kwargs={"filename": filename, **kwargs}).stream()


class _SourceFilter(_Distinct, ffmpeg.nodes.FilterNode):
    """A filter with no inputs (color, testsrc2, sine) inside -filter_complex.

    Generated sources are never `-f lavfi -i ...` inputs: the imageio-ffmpeg binary (ffmpeg 9.0.2) deadlocks
    now and then, every thread in a futex wait, when lavfi inputs feed a graph that also has audio."""

    def __init__(self, name: str, kwargs: Mapping[str, object]) -> None:
        ffmpeg.nodes.Node.__init__(
            self,
            stream_spec=None,
            name=name,
            incoming_stream_types={ffmpeg.nodes.FilterableStream},
            outgoing_stream_type=ffmpeg.nodes.FilterableStream,
            min_inputs=0,
            max_inputs=0,
            args=[],
            kwargs=dict(kwargs),
        )


def _source(name: str, **kwargs: object) -> ffmpeg.nodes.FilterableStream:
    return _SourceFilter(name, kwargs).stream()


def _compile(node: ffmpeg.nodes.OutputStream) -> list[str]:
    """`node.compile()` that also accepts a graph without any -i input (only source filters): ffmpeg-python
    0.2's own get_args reduces the input list without an initial value."""
    from ffmpeg._run import _get_filter_arg, _get_input_args, _get_output_args
    from ffmpeg.dag import topo_sort

    nodes, outgoing_edge_maps = topo_sort(ffmpeg.nodes.get_stream_spec_nodes(node))
    inputs = [n for n in nodes if isinstance(n, ffmpeg.nodes.InputNode)]
    filters = [n for n in nodes if isinstance(n, ffmpeg.nodes.FilterNode)]
    outputs = [n for n in nodes if isinstance(n, ffmpeg.nodes.OutputNode)]
    stream_names = {(n, None): str(i) for i, n in enumerate(inputs)}
    filter_arg = _get_filter_arg(filters, outgoing_edge_maps, stream_names)
    args = [ffmpeg_exe()]
    for n in inputs:
        args += _get_input_args(n)
    if filter_arg:
        args += ["-filter_complex", filter_arg]
    for n in outputs:
        args += _get_output_args(n, stream_names)
    return args


def _x264_options(settings: EncoderSettings, rate: Fraction) -> dict[str, object]:
    return {
        "c:v": "libx264",
        "preset": settings.x264_preset,
        "crf": settings.x264_crf,
        "pix_fmt": "yuv420p",
        "r": _rate(rate),
        # A closed GOP and an IDR on frame 0: every chunk starts decodable on its own.
        "flags": "+cgop",
        "force_key_frames": "expr:eq(n,0)",
    }


def _vp9_options(settings: EncoderSettings, rate: Fraction) -> dict[str, object]:
    return {
        "c:v": "libvpx-vp9",
        "deadline": settings.vp9_deadline,
        "cpu-used": settings.vp9_cpu_used,
        "crf": settings.vp9_crf,
        "b:v": 0,
        "row-mt": 1,
        "pix_fmt": "yuv420p",
        "r": _rate(rate),
    }


def _aac_options(settings: EncoderSettings) -> dict[str, object]:
    return {"c:a": "aac", "b:a": settings.audio_bitrate, "ar": settings.audio_sample_rate}


def _opus_options(settings: EncoderSettings) -> dict[str, object]:
    return {"c:a": "libopus", "b:a": settings.audio_bitrate, "ar": 48000}


def _finish(args: list[str]) -> list[str]:
    """Global options right after the binary (ffmpeg ignores trailing ones), overwrite allowed."""
    return [args[0], "-hide_banner", "-y", *args[1:]]


def _file_url(path: Path) -> str:
    # "file:" so that no part of a path is ever read as another protocol ("concat:", "subfile,...").
    return "file:" + str(Path(path).resolve())


def _concat_quote(path: Path) -> str:
    """A path quoted for the concat demuxer's script syntax."""
    return "'" + str(Path(path).resolve()).replace("'", "'\\''") + "'"


def _rate(rate: Fraction) -> str:
    return f"{rate.numerator}/{rate.denominator}"


def _num(value: float) -> str:
    """A finite number in plain decimal notation (never 1e-05, never inf/nan)."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
