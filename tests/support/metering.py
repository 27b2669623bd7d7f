"""Test helpers: metering servers on loopback, in-process or as a `python -m metering` subprocess.

    async with start_metering(database_url, lease_seconds=2) as metering:
        stub = ... metering.target ...          # "127.0.0.1:PORT"
        await metering.stop()                   # e.g. an outage; stopping again is harmless

    async with start_metering_subprocess(database_url) as (target, process):
        process.send_signal(signal.SIGTERM)     # kill/restart tests

Neither reads the developer's environment for metering settings: only what the test passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from metering.config import Config
from metering.quota import Clock, system_clock
from metering.server import MeteringServer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Short intervals: outage tests see NOT_SERVING quickly, gauge tests see a new count soon.
TEST_DEFAULTS = {
    "METERING_HEALTH_PROBE_SECONDS": "0.5",
    "METERING_GAUGE_REFRESH_SECONDS": "0.5",
    "METERING_SHUTDOWN_GRACE_SECONDS": "5",
}


@dataclass
class RunningMetering:
    server: MeteringServer
    target: str

    async def stop(self, grace: float | None = 0.5) -> None:
        await self.server.stop(grace)


def _settings(database_url: str, listen: str, lease_seconds: float, env: Mapping[str, str] | None) -> dict:
    values = {
        **TEST_DEFAULTS,
        "DATABASE_URL": database_url,
        "METERING_LISTEN": listen,
        "METERING_LEASE_SECONDS": str(lease_seconds),
    }
    values.update(env or {})
    return values


@contextlib.asynccontextmanager
async def start_metering(
    database_url: str,
    *,
    lease_seconds: float = 120.0,
    env: Mapping[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    clock: Clock = system_clock,
) -> AsyncIterator[RunningMetering]:
    """An in-process metering server on `listen` (a free loopback port by default)."""
    config = Config.from_env(_settings(database_url, listen, lease_seconds, env))
    server = MeteringServer(config, database_url=database_url, clock=clock)
    await server.start()
    running = RunningMetering(server, server.target)
    try:
        yield running
    finally:
        await running.stop()


@dataclass
class MeteringProcess:
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_lines: list[dict] = field(default_factory=list)

    def __iter__(self) -> Iterator[object]:  # `async with ... as (target, process)`
        return iter((self.target, self.process))

    def log(self) -> list[dict]:
        """The server's structured log so far, one dict per line (non-JSON lines as {"raw": ...})."""
        return read_log(self.log_path)


def read_log(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            entries.append({"raw": line})
    return entries


@contextlib.asynccontextmanager
async def start_metering_subprocess(
    database_url: str,
    *,
    env: Mapping[str, str] | None = None,
    lease_seconds: float = 120.0,
    listen: str = "127.0.0.1:0",
    startup_timeout: float = 60.0,
) -> AsyncIterator[MeteringProcess]:
    """`python -m metering` as a child process; yields once its health check says SERVING.

    On exit a still-running server gets SIGTERM (then SIGKILL after 15 s)."""
    child_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("METERING_") and key != "DATABASE_URL"
    }
    child_env.update(_settings(database_url, listen, lease_seconds, env))
    child_env["PYTHONUNBUFFERED"] = "1"
    log_file = tempfile.NamedTemporaryFile(prefix="metering-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    process = subprocess.Popen(
        [sys.executable, "-m", "metering"],
        cwd=REPO_ROOT,
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    try:
        target = await _wait_serving(process, log_path, startup_timeout)
        yield MeteringProcess(target, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        with contextlib.suppress(OSError):
            log_path.unlink()


async def _wait_serving(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    target = None
    while target is None:
        if process.poll() is not None:
            raise RuntimeError(f"metering exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"metering did not start in {timeout} s:\n{log_path.read_text()}")
        for entry in read_log(log_path):
            if entry.get("msg") == "serving":
                target = entry["target"]
        if target is None:
            await asyncio.sleep(0.05)
    await wait_health(target, health_pb2.HealthCheckResponse.SERVING, timeout=max(deadline - time.monotonic(), 1))
    return target


async def wait_health(target: str, wanted: int, *, timeout: float = 10.0, service: str = "") -> None:
    """Polls grpc.health.v1 Check until it answers `wanted`."""
    deadline = time.monotonic() + timeout
    last: object = None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                last = answer.status
                if answer.status == wanted:
                    return
            except grpc.aio.AioRpcError as error:
                last = error.code()
            await asyncio.sleep(0.1)
    raise TimeoutError(f"health of {target} stayed {last}, wanted {wanted}")


def http_health(port: int) -> tuple[int, str]:
    """GET /healthz of a metrics listener on loopback: (HTTP status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, answer.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


@contextlib.asynccontextmanager
async def metering_stub(target: str) -> AsyncIterator[metering_pb2_grpc.MeteringStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield metering_pb2_grpc.MeteringStub(channel)


def reserve_request(
    key: str = "key-1",
    *,
    user: str = "alice",
    project: str = "project-1",
    mode: int = metering_pb2.RENDER_MODE_LOCAL,
    format: str = "mp4",
    seconds: float = 10.0,
    resolution: str = "160x120",
) -> metering_pb2.CheckAndReserveRequest:
    return metering_pb2.CheckAndReserveRequest(
        idempotency_key=key,
        user_id=user,
        project_id=project,
        render_mode=mode,
        format=format,
        duration_seconds=seconds,
        resolution=resolution,
    )


_DETAIL_TYPES = (
    error_details_pb2.QuotaFailure,
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.BadRequest,
)


def status_details(error: grpc.aio.AioRpcError) -> dict[type, object]:
    """The google.rpc details of a failed call, by message type."""
    found: dict[type, object] = {}
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        assert status.code == error.code().value[0] and status.message == error.details()
        for packed in status.details:
            for kind in _DETAIL_TYPES:
                if packed.Is(kind.DESCRIPTOR):
                    message = kind()
                    packed.Unpack(message)
                    found[kind] = message
    return found


class FakeClock:
    """An injectable clock (metering.quota.Clock) that stands still until moved."""

    def __init__(self, start: datetime) -> None:
        self.moment = start

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


async def run_maintenance_cli(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str
) -> tuple[int, str, str]:
    """`python -m metering.cli ARGV` in this process with only `env` of the database settings (a pytest
    MonkeyPatch restores them): the exit code, stdout and stderr."""
    import io

    from metering import cli

    for name in ("DATABASE_URL", "METERING_RETENTION_DAYS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    code = await asyncio.to_thread(cli.main, list(argv), out)
    return code, out.getvalue(), err.getvalue()
