"""Local rendering: a renderer job's wall time against raw ffmpeg running the same filter graph and encoder
settings, and metering's own overhead per render.

The job goes through the renderer's real parts, wired as `renderer.server.start` wires them: JobRunner ->
GrpcMeteringClient (to `python -m metering` in its own process) -> LocalBackend (ffmpeg) -> the durable
Outbox -> Complete. Raw ffmpeg runs the argument list `build_render` makes for the same composition, alone.
Runs alternate (raw, job, raw, job, ...) so drifting machine load hits both alike; medians are compared.
Metering's overhead is the time the job spent in CheckAndReserve plus in handing over its completion
(outbox write, Complete, outbox delete).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.database import BenchPostgres
from bench.machine import peak_rss_mib
from bench.services import metering_process

TARGET_RATIO = 1.05
TARGET_METERING_MS = 10.0


@dataclass(frozen=True, slots=True)
class RenderSettings:
    width: int = 1280
    height: int = 720
    fps: float = 30.0
    seconds: float = 10.0
    repetitions: int = 5  # medians of 3 swung by 5 % in the ratio and 2x in metering per render
    largest_frame: bool = True  # also measure the largest frame the renderer accepts (for sizing deploy/k8s)

    @classmethod
    def quick(cls) -> RenderSettings:
        return cls(width=160, height=120, fps=10.0, seconds=1.0, repetitions=1, largest_frame=False)


def composition(settings: RenderSettings) -> Any:
    from renderer.domain import AudioLayer, Clip, Composition, TextLayer

    seconds = settings.seconds
    return Composition(
        width=settings.width,
        height=settings.height,
        fps=settings.fps,
        duration_seconds=seconds,
        background="navy",
        clips=(Clip(source="testsrc:", start=0.0, duration=seconds),),
        texts=(TextLayer(text="benchmark", start=0.0, end=seconds, x=16, y=16, font_size=24, color="white"),),
        audio=(AudioLayer(source="sine:440", start=0.0, volume=0.5),),
    )


class _Timed:
    """Adds up the time spent in some async methods of an object it stands in for."""

    def __init__(self, inner: Any, methods: tuple[str, ...]) -> None:
        self._inner = inner
        self.seconds: dict[str, list[float]] = {name: [] for name in methods}
        for name in methods:
            setattr(self, name, self._wrap(name, getattr(inner, name)))

    def _wrap(self, name: str, method: Any) -> Any:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - started)

        return timed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass(frozen=True, slots=True)
class _Measured:
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    stderr: bytes


def _run_measured(args: list[str]) -> _Measured:
    """Runs a command to its end; wait4 gives that child's own CPU time and peak RSS (KiB on Linux)."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        return _Measured(
            process.returncode, elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, errors.read()
        )


async def _raw_ffmpeg(c: Any, work: Path, fmt: Any = None) -> _Measured:
    from renderer.domain import OutputFormat
    from renderer.ffmpeg_graph import build_render
    from renderer.sources import SourceResolver

    fmt = fmt or OutputFormat.MP4
    workdir = work / f"raw-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    output = workdir / f"out.{fmt.value}"
    sources = await SourceResolver([]).resolve_composition(c, workdir)
    command = build_render(c, fmt, output, sources, workdir=workdir)
    done = await asyncio.to_thread(_run_measured, list(command.args))
    if done.returncode != 0:
        raise RuntimeError(f"raw ffmpeg failed: {done.stderr.decode(errors='replace')[-1000:]}")
    return done


async def _largest_frames(work: Path, settings: RenderSettings) -> dict[str, dict[str, float]]:
    """One second at the largest frame the renderer accepts, in each format: what one render can take of a
    node at most (x264 and VP9 buffers grow with the frame; the length adds little)."""
    from renderer.domain import OutputFormat
    from renderer.validation import MAX_HEIGHT, MAX_WIDTH

    width, height = (MAX_WIDTH, MAX_HEIGHT) if settings.largest_frame else (settings.width, settings.height)
    c = composition(RenderSettings(width=width, height=height, fps=settings.fps, seconds=1.0))
    figures = {}
    for fmt in OutputFormat:
        done = await _raw_ffmpeg(c, work, fmt)
        figures[fmt.value] = {
            "width": width, "height": height, "seconds": round(done.seconds, 2),
            "cpu_cores": round(done.cpu_seconds / done.seconds, 2), "peak_rss_mib": round(done.peak_rss_mib, 1),
        }
    return figures


async def run_render(pg: BenchPostgres, settings: RenderSettings) -> dict[str, Any]:
    from renderer.domain import OutputFormat, RenderMode
    from renderer.jobs import JobRunner, JobState, RenderRequest
    from renderer.local_backend import LocalBackend
    from renderer.metering_client import GrpcMeteringClient
    from renderer.outbox import Outbox

    c = composition(settings)
    dsn = await pg.create_database("bench_render")
    raw: list[_Measured] = []
    jobs: list[float] = []
    metering_rss = 0.0
    largest: dict[str, dict[str, float]] = {}
    try:
        async with metering_process(dsn) as service:
            with tempfile.TemporaryDirectory(prefix="bench-render-") as name:
                work = Path(name)
                client = GrpcMeteringClient(service.target, timeout_seconds=5.0)
                metering = _Timed(client, ("reserve",))
                outbox = Outbox(work / "state" / "outbox.sqlite3", client.complete)
                outbox.start()
                completions = _Timed(outbox, ("submit",))
                runner = JobRunner(
                    metering, completions, {RenderMode.LOCAL: LocalBackend(work / "renders")}, concurrency=1
                )
                try:
                    # One unmeasured round of each: first runs pay for imports, page cache and connections.
                    await _raw_ffmpeg(c, work)
                    await _job(runner, c, OutputFormat.MP4, RenderRequest, JobState)
                    metering.seconds["reserve"].clear()
                    completions.seconds["submit"].clear()
                    for _ in range(settings.repetitions):
                        raw.append(await _raw_ffmpeg(c, work))
                        jobs.append(await _job(runner, c, OutputFormat.MP4, RenderRequest, JobState))
                    metering_rss = peak_rss_mib(service.pid)
                    largest = await _largest_frames(work, settings)
                finally:
                    await runner.shutdown(5)
                    await outbox.close()
                    await client.close()
    finally:
        await pg.drop_database(dsn)
    reserve_ms = [1000 * s for s in metering.seconds["reserve"]]
    complete_ms = [1000 * s for s in completions.seconds["submit"]]
    per_render = [r + c for r, c in zip(reserve_ms, complete_ms, strict=True)]
    raw_median, job_median = statistics.median(r.seconds for r in raw), statistics.median(jobs)
    return {
        "settings": {"width": settings.width, "height": settings.height, "fps": settings.fps,
                     "seconds": settings.seconds, "repetitions": settings.repetitions, "format": "mp4",
                     "layers": "testsrc clip + text + sine audio"},
        "raw_ffmpeg_s": [round(r.seconds, 3) for r in raw],
        "job_s": [round(value, 3) for value in jobs],
        "raw_ffmpeg_median_s": round(raw_median, 3),
        "job_median_s": round(job_median, 3),
        "ratio": round(job_median / raw_median, 3),
        "job_overhead_ms": round(1000 * (job_median - raw_median), 1),
        "metering_ms_per_render": round(statistics.median(per_render), 2),
        "reserve_ms": round(statistics.median(reserve_ms), 2),
        "complete_ms": round(statistics.median(complete_ms), 2),
        # For sizing deploy/k8s: what one render's ffmpeg takes of a node, and the peaks of the processes
        # around it (the job runner is hosted by this benchmark process, so its figure is an upper bound).
        "resources": {
            "ffmpeg_cpu_cores": round(statistics.median(r.cpu_seconds / r.seconds for r in raw), 2),
            "ffmpeg_peak_rss_mib": round(max(r.peak_rss_mib for r in raw), 1),
            "job_runner_process_peak_rss_mib": peak_rss_mib(),
            "metering_peak_rss_mib": metering_rss,
            "largest_frame": largest,
        },
        "targets": {"ratio": TARGET_RATIO, "metering_ms_per_render": TARGET_METERING_MS},
    }


async def _job(runner: Any, c: Any, fmt: Any, request_type: Any, states: Any) -> float:
    started = time.perf_counter()
    job = await runner.start(
        request_type(idempotency_key=uuid.uuid4().hex, user_id="bench-user", project_id="bench-project",
                     composition=c, format=fmt)
    )
    last = job
    async for last in runner.watch(job.job_id):  # noqa: B007 - the last one is the terminal state
        pass
    elapsed = time.perf_counter() - started
    if last.state is not states.SUCCEEDED:
        raise RuntimeError(f"render job ended {last.state}: {last.error}")
    return elapsed
