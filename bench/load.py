"""The load client: several processes, each an asyncio loop (uvloop) with its share of the calls in flight.

A "pair" is what a render costs metering: CheckAndReserve, then Complete of the export it returned. Two ways
to drive it:

- closed loop (`rate=None`): `in_flight` pairs always running; measures the most pairs per second the
  target can do. Latency at saturation is queueing (in flight / throughput), reported but not a target.
- open loop (`rate=R`): pairs start at a fixed rate R whatever the answers; latency counts from the moment
  a pair was due (so a slow answer cannot hide the ones queued behind it).

Two shapes of load: "spread" (each pair picks one of `users` users) and "hot" (every pair is one user's).
Only pairs that start inside the measuring window count; a warm-up before it fills caches and pools.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("mp4", "webm", "gif")
SHAPES = ("spread", "hot")
# Open-loop safety valve: more than this many pairs outstanding in one process means the target is far
# behind the rate; further arrivals are counted as dropped instead of piling up without bound.
MAX_OUTSTANDING_PER_PROCESS = 4000


@dataclass(frozen=True, slots=True)
class LoadSpec:
    target: str
    shape: str = "spread"
    in_flight: int = 64
    processes: int = 2
    seconds: float = 10.0
    warmup_seconds: float = 2.0
    rate: float | None = None  # pairs per second in total; None: closed loop
    users: int = 10_000
    run_id: str = "run"
    token: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        if self.processes < 1 or self.in_flight < self.processes:
            raise ValueError("need at least one process and one call in flight per process")


@dataclass(slots=True)
class WorkerResult:
    pairs: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, pairs of the window only


@dataclass(frozen=True, slots=True)
class LoadResult:
    pairs_per_second: float
    pairs: int
    errors: dict[str, int]
    dropped: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    seconds: float
    in_flight: int
    processes: int
    rate: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: list[float], quantile: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-quantile * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def run_load(spec: LoadSpec, *, startup_timeout: float = 60.0) -> LoadResult:
    """Runs the load in `spec.processes` fresh processes (spawned: no inherited gRPC state) and merges."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    results = context.Queue()
    go = context.Event()
    start_at = context.Value("d", 0.0)
    workers = [
        context.Process(
            target=_worker_entry, args=(spec, index, ready, results, go, start_at), name=f"bench-load-{index}"
        )
        for index in range(spec.processes)
    ]
    for worker in workers:
        worker.start()
    try:
        _wait_ready(ready, workers, startup_timeout)
        with start_at.get_lock():
            start_at.value = time.monotonic() + 0.05
        go.set()
        limit = spec.warmup_seconds + spec.seconds + 120
        merged = WorkerResult()
        for _ in workers:
            outcome = results.get(timeout=limit)
            if isinstance(outcome, str):
                raise RuntimeError(f"a load worker failed: {outcome}")
            merged.pairs += outcome.pairs
            merged.dropped += outcome.dropped
            merged.latencies += outcome.latencies
            for code, count in outcome.errors.items():
                merged.errors[code] = merged.errors.get(code, 0) + count
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    latencies = sorted(merged.latencies)
    return LoadResult(
        pairs_per_second=merged.pairs / spec.seconds,
        pairs=merged.pairs,
        errors=merged.errors,
        dropped=merged.dropped,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        mean_ms=(sum(latencies) / len(latencies) * 1000) if latencies else 0.0,
        max_ms=(latencies[-1] * 1000) if latencies else 0.0,
        seconds=spec.seconds,
        in_flight=spec.in_flight,
        processes=spec.processes,
        rate=spec.rate,
    )


def _wait_ready(ready: Any, workers: list[Any], timeout: float) -> None:
    import queue

    deadline = time.monotonic() + timeout
    waiting = len(workers)
    while waiting:
        try:
            message = ready.get(timeout=0.2)
        except queue.Empty:
            dead = [worker for worker in workers if worker.exitcode is not None]
            if dead:
                raise RuntimeError(f"load worker {dead[0].name} exited with {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"load workers not ready after {timeout} s") from None
            continue
        if message != "ready":
            raise RuntimeError(f"a load worker failed to start: {message}")
        waiting -= 1


# ------------------------------------------------------------------------------------ in the worker


def _worker_entry(spec: LoadSpec, index: int, ready: Any, results: Any, go: Any, start_at: Any) -> None:
    try:
        import uvloop

        outcome = uvloop.run(_worker(spec, index, ready, go, start_at))
    except BaseException as error:  # the parent must hear about it rather than wait for a result
        import traceback

        message = f"worker {index}: {error!r}\n{traceback.format_exc()}"
        ready.put(message)
        results.put(message)
        return
    results.put(outcome)


async def _worker(spec: LoadSpec, index: int, ready: Any, go: Any, start_at: Any) -> WorkerResult:
    import asyncio

    import grpc

    from exportapi.metering.v1 import metering_pb2 as pb
    from exportapi.metering.v1 import metering_pb2_grpc

    rng = random.Random(f"{spec.run_id}-{index}")
    metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else ()
    result = WorkerResult()
    sequence = 0

    async with grpc.aio.insecure_channel(spec.target) as channel:
        stub = metering_pb2_grpc.MeteringStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        ready.put("ready")
        await asyncio.to_thread(go.wait)
        window_start = start_at.value + spec.warmup_seconds
        window_end = window_start + spec.seconds

        async def pair(due: float) -> None:
            nonlocal sequence
            sequence += 1
            if spec.shape == "hot":
                user = "hot-user"
            else:
                user = f"user-{rng.randrange(spec.users)}"
            reserve = pb.CheckAndReserveRequest(
                idempotency_key=f"{spec.run_id}-{index}-{sequence}",
                user_id=user,
                project_id=f"{user}-p{rng.randrange(3)}",
                render_mode=pb.RENDER_MODE_LOCAL if rng.random() < 0.7 else pb.RENDER_MODE_LAMBDA,
                format=rng.choice(FORMATS),
                duration_seconds=10.0,
                resolution="1280x720",
            )
            try:
                answer = await stub.CheckAndReserve(reserve, timeout=30, metadata=metadata)
                await stub.Complete(
                    pb.CompleteRequest(
                        export_id=answer.export_id,
                        outcome=pb.EXPORT_STATUS_COMPLETED,
                        file_size_bytes=1_000_000,
                        duration_seconds=10.0,
                        output_uri=f"file:///renders/{answer.export_id}.mp4",
                        render_seconds=1.5,
                    ),
                    timeout=30,
                    metadata=metadata,
                )
            except grpc.aio.AioRpcError as error:
                if window_start <= due < window_end:
                    name = error.code().name
                    result.errors[name] = result.errors.get(name, 0) + 1
                return
            if window_start <= due < window_end:
                result.pairs += 1
                result.latencies.append(time.monotonic() - due)

        share = spec.in_flight // spec.processes + (1 if index < spec.in_flight % spec.processes else 0)
        if spec.rate is None:

            async def closed_loop() -> None:
                while (started := time.monotonic()) < window_end:
                    await pair(started)

            await asyncio.gather(*(closed_loop() for _ in range(share)))
        else:
            await _open_loop(pair, spec.rate / spec.processes, start_at.value, window_end, result)
    return result


async def _open_loop(pair: Any, rate: float, start: float, end: float, result: WorkerResult) -> None:
    import asyncio

    interval = 1.0 / rate
    # Each process starts at its own phase, so the processes' arrivals interleave instead of bunching.
    due = start + random.random() * interval
    outstanding: set[asyncio.Task[None]] = set()
    while due < end:
        now = time.monotonic()
        while due <= now and due < end:
            if len(outstanding) >= MAX_OUTSTANDING_PER_PROCESS:
                result.dropped += 1
            else:
                task = asyncio.create_task(pair(due))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            due += interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    if outstanding:
        await asyncio.wait(outstanding, timeout=60)
