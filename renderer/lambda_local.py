"""A local endpoint speaking the AWS Lambda Invoke HTTP API, running real handlers in worker processes.

`python -m renderer.lambda_local` is to this project what `sam local start-lambda` is to SAM, without
containers: `POST /2015-03-31/functions/{name}/invocations` with InvocationType RequestResponse (200 + the
handler's JSON), Event (202, run in the background) or DryRun (204). A handler exception comes back the way
Lambda sends it: 200, `X-Amz-Function-Error: Unhandled`, body `{"errorMessage", "errorType", "stackTrace"}`.
An unknown function is 404 ResourceNotFoundException.

Handlers run in a pool of worker processes that inherit this process's environment (so AWS_ENDPOINT_URL_S3
reaches moto). A worker that outlives its function's timeout is killed with its process group (ffmpeg
included) and replaced; the caller gets Lambda's "Task timed out after X seconds" function error.

For tests it can misbehave on purpose, through environment variables at start-up or `POST /_local/state`:
- throttle the next N invocations (429 TooManyRequestsException), or every invocation that would make more
  than K run at once (like reserved concurrency);
- a per-function timeout.
`GET /_local/state` returns that configuration and counters (invocations, throttled, timed out, peak
concurrency).

Environment:
- LAMBDA_LOCAL_LISTEN            host:port (127.0.0.1:9001); port 0 picks a free one. The bound address is
                                 printed on stdout as `lambda_local listening on http://HOST:PORT`.
- LAMBDA_LOCAL_FUNCTIONS         comma-separated `name=module:callable`
                                 (`$LAMBDA_FUNCTION_NAME or export-render` = renderer.lambda_handler:handler)
- LAMBDA_LOCAL_WORKERS           worker processes (2)
- LAMBDA_LOCAL_TIMEOUT_SECONDS   default function timeout (900)
- LAMBDA_LOCAL_TIMEOUTS          per-function timeouts, comma-separated `name=seconds`
- LAMBDA_LOCAL_THROTTLE_NEXT     answer 429 to the next N invocations (0)
- LAMBDA_LOCAL_MAX_CONCURRENCY   answer 429 when more than K would run at once (unset: no limit)
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger("renderer.lambda_local")

DEFAULT_LISTEN = "127.0.0.1:9001"
DEFAULT_HANDLER = "renderer.lambda_handler:handler"
DEFAULT_FUNCTION_NAME = "export-render"
DEFAULT_TIMEOUT_SECONDS = 900.0
INVOKE_PATH_PREFIX = "/2015-03-31/functions/"
INVOKE_PATH_SUFFIX = "/invocations"
ADMIN_PATH = "/_local/state"
REGION = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
ACCOUNT_ID = "123456789012"
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # Lambda's synchronous payload limit
_PIPE_LIMIT = 16 * 1024 * 1024  # one JSON line between server and worker


# --------------------------------------------------------------------------------------------- worker side


class LocalContext:
    """The parts of Lambda's context object a handler uses."""

    def __init__(self, function_name: str, request_id: str, timeout_seconds: float) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function_name}"
        self.memory_limit_in_mb = "3008"
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def _load_handler(spec: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    if spec not in cache:
        module_name, _, attr = spec.partition(":")
        cache[spec] = getattr(importlib.import_module(module_name), attr or "handler")
    return cache[spec]


def _worker_main() -> None:
    """One warm "execution environment": reads a JSON request per line on the original stdin, answers on the
    original stdout. What the handler prints (or its ffmpeg children write to fd 1) goes to stderr."""
    protocol_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    # Children (ffmpeg) inherit fds 0 and 1: keep them off the protocol pipes.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, encoding="utf-8")
    sys.stdout = sys.stderr
    handlers: dict[str, Callable[..., Any]] = {}
    for line in protocol_in:
        request = json.loads(line)
        function_name = request["function"]
        os.environ["AWS_LAMBDA_FUNCTION_NAME"] = function_name
        os.environ["AWS_LAMBDA_FUNCTION_TIMEOUT"] = str(int(request["timeout"]))
        context = LocalContext(function_name, request["request_id"], request["timeout"])
        try:
            try:
                handler = _load_handler(request["handler"], handlers)
            except Exception as exc:
                raise _ImportModuleError(f"Unable to import module '{request['handler']}': {exc}") from exc
            result = handler(json.loads(request["payload"]) if request["payload"] else {}, context)
            answer: dict[str, Any] = {"ok": True, "payload": json.dumps(result)}
        except Exception as exc:
            error_type = "Runtime.ImportModuleError" if isinstance(exc, _ImportModuleError) else type(exc).__name__
            answer = {
                "ok": False,
                "error": {
                    "errorMessage": str(exc),
                    "errorType": error_type,
                    "requestId": request["request_id"],
                    "stackTrace": traceback.format_tb(exc.__traceback__),
                },
            }
        protocol_out.write(json.dumps(answer) + "\n")
        protocol_out.flush()


class _ImportModuleError(Exception):
    pass


# --------------------------------------------------------------------------------------------- server side


class WorkerTimedOut(Exception):
    pass


class WorkerDied(Exception):
    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"Runtime exited with error: exit status {returncode}")
        self.returncode = returncode


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "renderer.lambda_local",
            "--worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills ffmpeg children too
            limit=_PIPE_LIMIT,
        )
        return cls(proc)

    async def run(self, request: dict[str, Any], timeout_seconds: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        try:
            async with asyncio.timeout(timeout_seconds):
                await self.proc.stdin.drain()
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise WorkerTimedOut() from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:
            await self.proc.wait()
            raise WorkerDied(self.proc.returncode)
        return json.loads(line)

    async def kill(self) -> None:
        """Like Lambda ending a sandbox: the worker and everything it started, including children that
        made their own session (the ffmpeg runner does), so no render outlives its invocation."""
        if self.proc.returncode is None:
            doomed = _descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        await self.proc.wait()

    async def close(self) -> None:
        if self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(2):
                    await self.proc.wait()
            except TimeoutError:
                pass
        await self.kill()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; elsewhere only the process group is killed)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


class WorkerPool:
    """Warm worker processes; a killed or dead worker is replaced in the background."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("LAMBDA_LOCAL_WORKERS must be at least 1")
        self.size = size
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        workers = await asyncio.gather(*(_Worker.spawn() for _ in range(self.size)))
        for worker in workers:
            self._all.add(worker)
            self._idle.put_nowait(worker)

    def _replace(self) -> None:
        async def spawn() -> None:
            worker = await _Worker.spawn()
            if self._closed:
                await worker.close()
                return
            self._all.add(worker)
            self._idle.put_nowait(worker)

        task = asyncio.create_task(spawn())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def run(self, request: dict[str, Any], timeout_seconds: float) -> dict[str, Any]:
        worker = await self._idle.get()
        healthy = False
        try:
            answer = await worker.run(request, timeout_seconds)
            healthy = True
            return answer
        finally:
            if healthy:
                self._idle.put_nowait(worker)
            else:
                # Timed out, died, or the server is shutting down mid-request: never reuse it.
                self._all.discard(worker)
                await asyncio.shield(worker.kill())
                if not self._closed:
                    self._replace()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        await asyncio.gather(*self._spawning, return_exceptions=True)
        await asyncio.gather(*(worker.close() for worker in self._all), return_exceptions=True)
        self._all.clear()


@dataclass
class FunctionSpec:
    name: str
    handler: str
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS


@dataclass
class Stats:
    invocations: dict[str, int] = field(default_factory=dict)  # accepted (not throttled) invocations
    throttled: int = 0
    timed_out: int = 0
    function_errors: int = 0
    running: int = 0
    peak_running: int = 0


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def _aws_error(status: int, error_type: str, message: str, **extra: Any) -> Response:
    return _json_response(
        status,
        {"Type": "User", "message": message, **extra},
        {"x-amzn-ErrorType": error_type},
    )


class LocalLambda:
    """The Invoke API over a worker pool, with switches to throttle and time out."""

    def __init__(
        self,
        functions: list[FunctionSpec],
        workers: int = 2,
        throttle_next: int = 0,
        max_concurrency: int | None = None,
    ) -> None:
        self.functions = {spec.name: spec for spec in functions}
        self.pool = WorkerPool(workers)
        self.throttle_next = throttle_next
        self.max_concurrency = max_concurrency
        self.stats = Stats()
        self._background: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    # ----- lifecycle

    async def start(self, host: str, port: int) -> tuple[str, int]:
        await self.pool.start()
        self._server = await asyncio.start_server(self._serve_connection, host, port, limit=_PIPE_LIMIT)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return bound_host, bound_port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections) + list(self._background):
            task.cancel()
        await asyncio.gather(*self._connections, *self._background, return_exceptions=True)
        await self.pool.close()

    # ----- invoke

    def _throttle_reason(self) -> str | None:
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return "CallerRateLimitExceeded"
        if self.max_concurrency is not None and self.stats.running >= self.max_concurrency:
            return "ReservedFunctionConcurrentInvocationLimitExceeded"
        return None

    async def invoke(self, function: str, payload: bytes, invocation_type: str) -> Response:
        spec = self.functions.get(function)
        if spec is None:
            arn = f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function}"
            return _aws_error(404, "ResourceNotFoundException", f"Function not found: {arn}")
        if invocation_type not in ("RequestResponse", "Event", "DryRun"):
            return _aws_error(400, "InvalidParameterValueException", f"Invalid InvocationType: {invocation_type}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            return _aws_error(413, "RequestTooLargeException", "Request must be smaller than 6291456 bytes")
        if payload:
            try:
                json.loads(payload)
            except ValueError:
                return _aws_error(400, "InvalidRequestContentException", "Could not parse request body into json")
        if invocation_type == "DryRun":
            return Response(204)
        reason = self._throttle_reason()
        if reason is not None:
            self.stats.throttled += 1
            return _aws_error(429, "TooManyRequestsException", "Rate Exceeded.", Reason=reason)

        request_id = str(uuid.uuid4())
        self.stats.invocations[function] = self.stats.invocations.get(function, 0) + 1
        self.stats.running += 1
        self.stats.peak_running = max(self.stats.peak_running, self.stats.running)
        run = self._run(spec, payload, request_id)
        if invocation_type == "Event":
            task = asyncio.create_task(run)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return Response(202, headers={"x-amzn-RequestId": request_id})
        return await run

    async def _run(self, spec: FunctionSpec, payload: bytes, request_id: str) -> Response:
        headers = {"x-amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        request = {
            "function": spec.name,
            "handler": spec.handler,
            "payload": payload.decode(),
            "request_id": request_id,
            "timeout": spec.timeout_seconds,
        }
        try:
            answer = await self.pool.run(request, spec.timeout_seconds)
        except WorkerTimedOut:
            self.stats.timed_out += 1
            self.stats.function_errors += 1
            message = f"RequestId: {request_id} Error: Task timed out after {spec.timeout_seconds:.2f} seconds"
            log.warning("%s: %s", spec.name, message)
            return _json_response(
                200,
                {"errorType": "Sandbox.Timedout", "errorMessage": message},
                {**headers, "X-Amz-Function-Error": "Unhandled"},
            )
        except WorkerDied as exc:
            self.stats.function_errors += 1
            message = f"RequestId: {request_id} Error: {exc}"
            return _json_response(
                200,
                {"errorType": "Runtime.ExitError", "errorMessage": message},
                {**headers, "X-Amz-Function-Error": "Unhandled"},
            )
        finally:
            self.stats.running -= 1
        if answer["ok"]:
            return Response(200, answer["payload"].encode(), {**headers, "Content-Type": "application/json"})
        self.stats.function_errors += 1
        log.info("%s raised %s: %s", spec.name, answer["error"]["errorType"], answer["error"]["errorMessage"])
        return _json_response(200, answer["error"], {**headers, "X-Amz-Function-Error": "Unhandled"})

    # ----- admin

    def state(self) -> dict[str, Any]:
        return {
            "functions": {name: {"handler": s.handler, "timeout_seconds": s.timeout_seconds}
                          for name, s in self.functions.items()},
            "workers": self.pool.size,
            "throttle_next": self.throttle_next,
            "max_concurrency": self.max_concurrency,
            "stats": {
                "invocations": dict(self.stats.invocations),
                "throttled": self.stats.throttled,
                "timed_out": self.stats.timed_out,
                "function_errors": self.stats.function_errors,
                "running": self.stats.running,
                "peak_running": self.stats.peak_running,
            },
        }

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply `{"throttle_next": N, "max_concurrency": K|null, "timeouts": {name: s}, "reset_stats": true}`.
        Validates everything before changing anything."""
        unknown = set(changes) - {"throttle_next", "max_concurrency", "timeouts", "reset_stats"}
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        throttle_next = changes.get("throttle_next", self.throttle_next)
        if not isinstance(throttle_next, int) or throttle_next < 0:
            raise ValueError("throttle_next must be a non-negative integer")
        max_concurrency = changes.get("max_concurrency", self.max_concurrency)
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 0):
            raise ValueError("max_concurrency must be a non-negative integer or null")
        timeouts = changes.get("timeouts", {})
        for name, seconds in timeouts.items():
            if name not in self.functions:
                raise ValueError(f"unknown function: {name}")
            if not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(f"timeout of {name} must be positive")
        self.throttle_next = throttle_next
        self.max_concurrency = max_concurrency
        for name, seconds in timeouts.items():
            self.functions[name].timeout_seconds = float(seconds)
        if changes.get("reset_stats"):
            self.stats = Stats(running=self.stats.running, peak_running=self.stats.running)

    # ----- HTTP

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._serve_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down; asyncio's streams would log a cancelled connection task as an error
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request_line = await reader.readline()
        if not request_line.strip():
            return False
        method, target, version = request_line.decode("latin-1").split()
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers)
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        response = await self._route(method, target, headers, body)
        _write_response(writer, response, keep_alive)
        await writer.drain()
        return keep_alive

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        path = urlsplit(target).path
        if path == ADMIN_PATH:
            if method == "GET":
                return _json_response(200, self.state())
            if method == "POST":
                try:
                    self.configure(json.loads(body or b"{}"))
                except (ValueError, TypeError, AttributeError) as exc:
                    return _json_response(400, {"message": str(exc)})
                return _json_response(200, self.state())
            return _json_response(405, {"message": "GET or POST"})
        if path.startswith(INVOKE_PATH_PREFIX) and path.endswith(INVOKE_PATH_SUFFIX):
            if method != "POST":
                return _json_response(405, {"message": "POST"})
            function = function_name_from(unquote(path[len(INVOKE_PATH_PREFIX) : -len(INVOKE_PATH_SUFFIX)]))
            invocation_type = headers.get("x-amz-invocation-type", "RequestResponse")
            return await self.invoke(function, body, invocation_type)
        return _aws_error(404, "UnknownOperationException", f"Unknown operation {method} {path}")


def function_name_from(name_or_arn: str) -> str:
    """`name`, `name:qualifier`, `arn:aws:lambda:region:account:function:name[:qualifier]` -> `name`."""
    if name_or_arn.startswith("arn:"):
        parts = name_or_arn.split(":")
        return parts[6] if len(parts) > 6 else ""
    return name_or_arn.split(":", 1)[0]


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_PAYLOAD_BYTES + 1024:
        raise ValueError("request too large")
    return await reader.readexactly(length) if length else b""


_REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 413: "Request Entity Too Large", 429: "Too Many Requests"}


def _write_response(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
    head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}"]
    for name, value in response.headers.items():
        head.append(f"{name}: {value}")
    head.append(f"Content-Length: {len(response.body)}")
    head.append("Connection: keep-alive" if keep_alive else "Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)


# --------------------------------------------------------------------------------------------- configuration


def _pairs(raw: str, variable: str) -> list[tuple[str, str]]:
    pairs = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{variable}: expected name=value, got {item!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _positive_number(raw: str, variable: str, kind: type[int] | type[float] = float) -> Any:
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{variable} must be a number, got {raw!r}") from None
    if value < 0 or (kind is float and value == 0):
        raise ValueError(f"{variable} must be positive, got {raw!r}")
    return value


@dataclass
class LocalLambdaSettings:
    host: str
    port: int
    functions: list[FunctionSpec]
    workers: int
    throttle_next: int
    max_concurrency: int | None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> LocalLambdaSettings:
        listen = env.get("LAMBDA_LOCAL_LISTEN") or DEFAULT_LISTEN
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"LAMBDA_LOCAL_LISTEN must be host:port, got {listen!r}")
        default_timeout = _positive_number(
            env.get("LAMBDA_LOCAL_TIMEOUT_SECONDS") or str(DEFAULT_TIMEOUT_SECONDS), "LAMBDA_LOCAL_TIMEOUT_SECONDS"
        )
        default_name = env.get("LAMBDA_FUNCTION_NAME") or DEFAULT_FUNCTION_NAME
        raw_functions = env.get("LAMBDA_LOCAL_FUNCTIONS") or f"{default_name}={DEFAULT_HANDLER}"
        functions = [FunctionSpec(name, handler, default_timeout)
                     for name, handler in _pairs(raw_functions, "LAMBDA_LOCAL_FUNCTIONS")]
        by_name = {spec.name: spec for spec in functions}
        for name, seconds in _pairs(env.get("LAMBDA_LOCAL_TIMEOUTS", ""), "LAMBDA_LOCAL_TIMEOUTS"):
            if name not in by_name:
                raise ValueError(f"LAMBDA_LOCAL_TIMEOUTS names an unknown function {name!r}")
            by_name[name].timeout_seconds = _positive_number(seconds, "LAMBDA_LOCAL_TIMEOUTS")
        workers = _positive_number(env.get("LAMBDA_LOCAL_WORKERS") or "2", "LAMBDA_LOCAL_WORKERS", int)
        if workers < 1:
            raise ValueError("LAMBDA_LOCAL_WORKERS must be at least 1")
        throttle_next = _positive_number(
            env.get("LAMBDA_LOCAL_THROTTLE_NEXT") or "0", "LAMBDA_LOCAL_THROTTLE_NEXT", int
        )
        raw_max = env.get("LAMBDA_LOCAL_MAX_CONCURRENCY")
        max_concurrency = _positive_number(raw_max, "LAMBDA_LOCAL_MAX_CONCURRENCY", int) if raw_max else None
        return cls(host, int(port_text), functions, workers, throttle_next, max_concurrency)


async def serve(settings: LocalLambdaSettings) -> None:
    local = LocalLambda(settings.functions, settings.workers, settings.throttle_next, settings.max_concurrency)
    host, port = await local.start(settings.host, settings.port)
    print(f"lambda_local listening on http://{host}:{port}", flush=True)
    for spec in settings.functions:
        log.info("function %s -> %s (timeout %ss)", spec.name, spec.handler, spec.timeout_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await local.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `kill -USR1 <pid>` prints every thread's stack to stderr: a stuck handler shows where it waits.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if argv == ["--worker"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
        _worker_main()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = LocalLambdaSettings.from_env()
    except ValueError as exc:
        print(f"renderer.lambda_local: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
