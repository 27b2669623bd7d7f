"""Servers the benchmarks measure, each in its own process so that client and server never share a GIL:
`python -m metering` on a dedicated database, and the no-op server of the same proto."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Every bench user is on `free`, made roomy: the quota is still checked on every call, never reached.
BENCH_TIERS = """\
[tiers.free]
daily_limit = 1000000000
max_duration_seconds = 3600
"""


@dataclass(frozen=True, slots=True)
class ServerProcess:
    target: str
    pid: int
    log_path: Path


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("METERING_", "BENCH_")) and key != "DATABASE_URL"
    }
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def metering_process(
    database_url: str, *, env: Mapping[str, str] | None = None, startup_timeout: float = 60.0
) -> AsyncIterator[ServerProcess]:
    """`python -m metering` on `database_url` and a free loopback port; yields once it is SERVING."""
    work = Path(tempfile.mkdtemp(prefix="bench-metering-"))
    tiers = work / "tiers.toml"
    tiers.write_text(BENCH_TIERS)
    log_path = work / "metering.log"
    settings = {
        "DATABASE_URL": database_url,
        # A port chosen here, not port 0: the server's "serving" log line may be filtered out by its log level.
        "METERING_LISTEN": f"127.0.0.1:{free_port()}",
        "METERING_TIERS_FILE": str(tiers),
        # Experiments: BENCH_METERING_X=v runs the server with METERING_X=v (e.g. DB_POOL_SIZE, LOG_LEVEL).
        **{
            "METERING_" + key.removeprefix("BENCH_METERING_"): value
            for key, value in os.environ.items()
            if key.startswith("BENCH_METERING_")
        },
        **(env or {}),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "metering"],
            cwd=REPO_ROOT,
            env=_child_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        target = settings["METERING_LISTEN"]
        await wait_serving(target, timeout=startup_timeout, process=process, log_path=log_path)
        yield ServerProcess(target, process.pid, log_path)
    finally:
        await asyncio.to_thread(_stop, process)
        with contextlib.suppress(OSError):
            tiers.unlink()
            log_path.unlink()
            work.rmdir()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_serving(
    target: str,
    *,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Polls grpc.health.v1 until `target` is SERVING; fails early if `process` exits."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                output = log_path.read_text(errors="replace")[-3000:] if log_path else ""
                raise RuntimeError(f"the server exited with {process.returncode}:\n{output}")
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                output = log_path.read_text(errors="replace")[-3000:] if log_path else ""
                raise TimeoutError(f"{target} is not SERVING after {timeout} s\n{output}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def noop_process(*, startup_timeout: float = 30.0) -> AsyncIterator[ServerProcess]:
    """`python -m bench.noop_server` on a free loopback port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.noop_server"],
        cwd=REPO_ROOT,
        env=_child_env({"BENCH_NOOP_LISTEN": "127.0.0.1:0"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), startup_timeout)
        text = line.decode().strip()
        if "listening on " not in text:
            raise RuntimeError(f"the no-op server did not start (exit {process.poll()}): {text!r}")
        yield ServerProcess(text.rsplit("listening on ", 1)[1], process.pid, Path(os.devnull))
    finally:
        await asyncio.to_thread(_stop, process)
