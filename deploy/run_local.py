"""`make run`: metering (with an embedded PostgreSQL when DATABASE_URL is unset) and one renderer on loopback.

Each runs as its own process, exactly as in production (`python -m metering`, `python -m renderer`); this
script only starts them in order, waits until each answers its health check, and stops both on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_SECONDS = 120


def wait_serving(target: str, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode} during start-up; see its log above")
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"{name} did not become healthy at {target} within {STARTUP_TIMEOUT_SECONDS} s")


def main() -> int:
    # SIGTERM (a supervisor, `timeout`) stops both servers the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    env = dict(os.environ)
    metering_listen = env.setdefault("METERING_LISTEN", "127.0.0.1:50051")
    env.setdefault("METERING_TARGET", metering_listen)
    renderer_listen = env.setdefault("RENDERER_LISTEN", "127.0.0.1:50052")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        metering = subprocess.Popen([sys.executable, "-m", "metering"], env=env)
        processes.append(metering)
        wait_serving(metering_listen, metering, "metering")
        renderer = subprocess.Popen([sys.executable, "-m", "renderer"], env=env)
        processes.append(renderer)
        wait_serving(renderer_listen, renderer, "renderer")
        database = env.get("DATABASE_URL") or "embedded PostgreSQL under .data/pg"
        print(
            f"\nmetering  {metering_listen}  (database: {database})\n"
            f"renderer  {renderer_listen}\n\n"
            "try:  .venv/bin/python -m renderer.cli render examples/hello.json --user alice --project demo\n"
            "      .venv/bin/python -m metering.cli usage alice\n"
            "Ctrl-C stops both.\n",
            flush=True,
        )
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
