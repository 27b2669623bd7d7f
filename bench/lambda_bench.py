"""Lambda fan-out on `renderer.lambda_local`: a long render in N chunks against the same render in one
invocation.

Both go through a JobRunner with the real LambdaBackend (aioboto3) and real metering; lambda_local runs the
project's real handler in worker processes (one per chunk, plus audio) and S3 is moto in server mode, all
on this machine. With 2 cores, N chunks cannot run N times faster than one invocation that already uses
both cores (x264 is multi-threaded): the figure says what fan-out costs or gains here, not on AWS.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.database import BenchPostgres
from bench.services import metering_process


@dataclass(frozen=True, slots=True)
class LambdaSettings:
    width: int = 640
    height: int = 360
    fps: float = 30.0
    seconds: float = 16.0
    chunks: int = 4
    repetitions: int = 2

    @classmethod
    def quick(cls) -> LambdaSettings:
        return cls(width=160, height=120, fps=10.0, seconds=4.0, chunks=2, repetitions=1)


async def run_lambda(pg: BenchPostgres, settings: LambdaSettings) -> dict[str, Any]:
    from renderer.domain import AudioLayer, Clip, Composition, OutputFormat, RenderMode, TextLayer
    from renderer.jobs import JobRunner, JobState, RenderRequest
    from renderer.lambda_backend import LambdaBackend, LambdaBackendConfig
    from renderer.metering_client import GrpcMeteringClient
    from renderer.outbox import Outbox
    from tests.support.lambda_env import lambda_environment

    seconds = settings.seconds
    composition = Composition(
        width=settings.width, height=settings.height, fps=settings.fps, duration_seconds=seconds,
        background="navy",
        clips=(Clip(source="testsrc:", start=0.0, duration=seconds),),
        texts=(TextLayer(text="fan-out", start=0.0, end=seconds, x=16, y=16, font_size=24, color="white"),),
        audio=(AudioLayer(source="sine:440", start=0.0, volume=0.5),),
    )
    chunk_seconds = seconds / settings.chunks
    single: list[float] = []
    fanned: list[float] = []
    dsn = await pg.create_database("bench_lambda")
    try:
        async with (
            metering_process(dsn) as service,
            lambda_environment(workers=settings.chunks + 1) as env,
        ):
            with tempfile.TemporaryDirectory(prefix="bench-lambda-") as name:
                client = GrpcMeteringClient(service.target, timeout_seconds=5.0)
                outbox = Outbox(Path(name) / "outbox.sqlite3", client.complete)
                outbox.start()

                def runner(chunk: float) -> Any:
                    config = LambdaBackendConfig(
                        function_name=env.function_name, bucket=env.bucket, chunk_seconds=chunk,
                        max_concurrency=settings.chunks + 1, timeout_seconds=300,
                        endpoint_url=env.lambda_endpoint, s3_endpoint_url=env.s3_endpoint,
                    )
                    return JobRunner(client, outbox, {RenderMode.LAMBDA: LambdaBackend(config)},
                                     default_mode=RenderMode.LAMBDA, concurrency=1)

                whole = runner(seconds + 1)  # longer than the video: one invocation
                chunked = runner(chunk_seconds)
                try:
                    # Unmeasured: the first invocations start lambda_local's workers and import the handler.
                    await _job(chunked, composition, OutputFormat.MP4, RenderRequest, JobState)
                    await _job(whole, composition, OutputFormat.MP4, RenderRequest, JobState)
                    for index in range(settings.repetitions):
                        order = [(whole, single), (chunked, fanned)]
                        for job_runner, sink in order if index % 2 == 0 else reversed(order):
                            sink.append(await _job(job_runner, composition, OutputFormat.MP4, RenderRequest,
                                                   JobState))
                    stats = (await env.state()).get("stats", {})
                finally:
                    await whole.shutdown(5)
                    await chunked.shutdown(5)
                    await outbox.close()
                    await client.close()
    finally:
        await pg.drop_database(dsn)
    single_median, fanned_median = statistics.median(single), statistics.median(fanned)
    return {
        "settings": {"width": settings.width, "height": settings.height, "fps": settings.fps,
                     "seconds": seconds, "chunks": settings.chunks, "chunk_seconds": chunk_seconds,
                     "repetitions": settings.repetitions, "lambda_local_workers": settings.chunks + 1},
        "single_invocation_s": [round(value, 3) for value in single],
        "fan_out_s": [round(value, 3) for value in fanned],
        "single_median_s": round(single_median, 3),
        "fan_out_median_s": round(fanned_median, 3),
        "speedup": round(single_median / fanned_median, 3),
        "lambda_local_stats": stats,
    }


async def _job(runner: Any, composition: Any, fmt: Any, request_type: Any, states: Any) -> float:
    started = time.perf_counter()
    job = await runner.start(
        request_type(idempotency_key=uuid.uuid4().hex, user_id="bench-user", project_id="bench-lambda",
                     composition=composition, format=fmt)
    )
    last = job
    async for last in runner.watch(job.job_id):  # noqa: B007 - the last one is the terminal state
        pass
    elapsed = time.perf_counter() - started
    if last.state is not states.SUCCEEDED:
        raise RuntimeError(f"lambda render ended {last.state}: {last.error}")
    return elapsed
