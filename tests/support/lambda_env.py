"""Test helpers: moto S3 in server mode plus `renderer.lambda_local` as a subprocess, on loopback.

    async with lambda_environment() as env:
        env.s3_endpoint, env.lambda_endpoint, env.bucket, env.function_name
        await env.configure(throttle_next=2)        # lambda_local's admin endpoint
        (await env.state())["stats"]["invocations"]

`lambda_environment` points this process at fake AWS credentials (restored on exit) so no test can reach real
AWS, creates the bucket, and runs lambda_local with the same environment plus AWS_ENDPOINT_URL_S3, so the real
handler in its worker processes writes to moto. `probe_handler` is a trivial handler for testing lambda_local
itself; register it with `functions={"probe": PROBE_HANDLER}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER_HANDLER = "renderer.lambda_handler:handler"
PROBE_HANDLER = "tests.support.lambda_env:probe_handler"

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_SESSION_TOKEN": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Never read a developer's real profile or ask instance metadata for credentials.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def probe_handler(event: dict[str, Any], context: Any) -> Any:
    """A trivial Lambda handler: `{"op": "echo" | "sleep" | "fail" | "exit" | "s3_put" | "child_sleep" | "env"}`."""
    op = event.get("op", "echo")
    if op == "echo":
        return {"event": event, "pid": os.getpid(), "function": context.function_name,
                "remaining_ms": context.get_remaining_time_in_millis()}
    if op == "sleep":
        time.sleep(float(event["seconds"]))
        return {"slept": event["seconds"], "pid": os.getpid()}
    if op == "fail":
        raise ValueError(event.get("message", "probe failure"))
    if op == "exit":
        os._exit(int(event.get("code", 3)))
    if op == "s3_put":  # proves the caller's AWS_ENDPOINT_URL_S3 reaches the worker
        import boto3

        boto3.client("s3").put_object(Bucket=event["bucket"], Key=event["key"], Body=event["body"].encode())
        return {"put": event["key"]}
    if op == "child_sleep":  # a child in its own session (as the ffmpeg runner starts ffmpeg), then wait
        import subprocess
        from pathlib import Path

        child = subprocess.Popen(["sleep", str(event["seconds"])], start_new_session=True)
        Path(event["pid_file"]).write_text(str(child.pid))
        child.wait()
        return {"child": child.pid}
    if op == "env":
        return {name: os.environ.get(name) for name in event["names"]}
    raise ValueError(f"unknown op {op!r}")


@contextlib.contextmanager
def fake_aws_credentials(extra: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Sets fake credentials (and `extra`) in os.environ for the duration; yields what was set."""
    wanted = {**FAKE_AWS_ENV, **(extra or {})}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield wanted
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto in server mode on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def lambda_local_process(
    functions: Mapping[str, str],
    *,
    env: Mapping[str, str] | None = None,
    workers: int = 2,
    timeouts: Mapping[str, float] | None = None,
) -> AsyncIterator[str]:
    """`python -m renderer.lambda_local` on a free loopback port; yields its endpoint URL."""
    child_env = {
        **os.environ,
        **(env or {}),
        "LAMBDA_LOCAL_LISTEN": "127.0.0.1:0",
        "LAMBDA_LOCAL_FUNCTIONS": ",".join(f"{name}={handler}" for name, handler in functions.items()),
        "LAMBDA_LOCAL_WORKERS": str(workers),
        "LAMBDA_LOCAL_TIMEOUTS": ",".join(f"{name}={s}" for name, s in (timeouts or {}).items()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "renderer.lambda_local",
        cwd=REPO_ROOT, env=child_env, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            line = (await proc.stdout.readline()).decode()
        if "listening on " not in line:
            raise RuntimeError(f"lambda_local did not start (exit {await proc.wait()}): {line!r}")
        yield line.rsplit("listening on ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass(frozen=True)
class LambdaEnv:
    s3_endpoint: str
    lambda_endpoint: str
    bucket: str
    function_name: str

    def _admin(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.lambda_endpoint}/_local/state", data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    async def configure(self, **changes: Any) -> dict[str, Any]:
        """lambda_local's switches: throttle_next, max_concurrency, timeouts={name: s}, reset_stats."""
        return await asyncio.to_thread(self._admin, "POST", changes)

    async def state(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._admin, "GET")

    def s3_client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint)


@contextlib.asynccontextmanager
async def lambda_environment(
    *,
    bucket: str = "renders-test",
    function_name: str = "export-render",
    functions: Mapping[str, str] | None = None,
    workers: int = 2,
    timeouts: Mapping[str, float] | None = None,
) -> AsyncIterator[LambdaEnv]:
    """moto S3 with `bucket` created, and lambda_local serving the real render handler as `function_name`
    (plus `functions`), both reachable from this process and lambda_local's workers."""
    import boto3

    with moto_s3_server() as s3_endpoint, fake_aws_credentials({"AWS_ENDPOINT_URL_S3": s3_endpoint}) as aws_env:
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        all_functions = {function_name: RENDER_HANDLER, **(functions or {})}
        async with lambda_local_process(
            all_functions, env={**aws_env, "RENDER_BUCKET": bucket}, workers=workers, timeouts=timeouts
        ) as lambda_endpoint:
            yield LambdaEnv(s3_endpoint, lambda_endpoint, bucket, function_name)
