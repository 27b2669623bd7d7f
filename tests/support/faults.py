"""Fault-injection helpers: metering and renderer servers as restartable subprocesses, a dedicated
PostgreSQL that can be stopped abruptly, a reservation load that records every answer, and the ledger
checks that run on the database afterwards.

    registry = ProcessRegistry()                 # kills whatever is still running in `close()`
    replica = MeteringReplica(registry, database_url, log_dir=tmp_path, lease_seconds=2)
    await replica.start()                        # port 0 the first time, the same port on a restart
    replica.kill()                               # SIGKILL
    await replica.start()                        # back on the same target
    violations = await ledger_violations(database_url)

Used by tests/test_faults_*.py and bench/soak.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import psutil
from grpc_health.v1 import health_pb2

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from tests.support.metering import REPO_ROOT, TEST_DEFAULTS, read_log, reserve_request, wait_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A restarted server comes back on the same port: clients retry the connection quickly instead of
# backing off for up to two minutes (gRPC's default).
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


async def until(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05) -> None:
    """Waits until `predicate()` (sync or async) is truthy; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# --- processes -----------------------------------------------------------------------------------------


class ProcessRegistry:
    """Every subprocess a test starts (and their children it knows of); `close()` SIGKILLs what is left."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []
        self._strays: list[psutil.Process] = []

    def spawn(self, argv: Sequence[str], *, env: dict[str, str], log_path: Path, **kwargs: object):
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                list(argv),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **kwargs,  # type: ignore[arg-type]
            )
        self._processes.append(process)
        return process

    def adopt(self, processes: Iterable[psutil.Process]) -> None:
        """Children of a killed process (an orphaned ffmpeg): killed in `close()` too."""
        self._strays.extend(processes)

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        for stray in self._strays:
            with contextlib.suppress(psutil.Error):
                stray.kill()
        self._processes.clear()
        self._strays.clear()


def child_env(**settings: str) -> dict[str, str]:
    """The test's environment without any metering/renderer setting of the developer, plus `settings`."""
    prefixes = ("METERING_", "RENDER_", "RENDERER_", "LAMBDA_", "AWS_ENDPOINT_URL")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.pop("DATABASE_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Server:
    """A restartable `python -m <module>` child with one log file per incarnation."""

    module = ""

    def __init__(self, registry: ProcessRegistry, name: str, log_dir: Path) -> None:
        self.registry = registry
        self.name = name
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.incarnation}.log"

    def log(self) -> list[dict]:
        """This incarnation's log, one dict per line (non-JSON lines as {"raw": ...})."""
        return read_log(self.log_path) if self.log_path.exists() else []

    def all_logs(self) -> list[dict]:
        return [entry for n in range(1, self.incarnation + 1) for entry in read_log(self._log_of(n))]

    def _log_of(self, incarnation: int) -> Path:
        return self.log_dir / f"{self.name}-{incarnation}.log"

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert not self.running, f"{self.name} is already running"
        self.incarnation += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.process = self.registry.spawn(
            [sys.executable, "-m", self.module], env=env, log_path=self.log_path
        )
        return self.process

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_path.read_text(errors='replace')}"
            )

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would; returns once the process is gone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM; returns the exit code (the process is SIGKILLed if it outlives `timeout`)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
            raise


class MeteringReplica(_Server):
    """`python -m metering` on a fixed loopback port (chosen at the first start), restartable."""

    module = "metering"

    def __init__(
        self,
        registry: ProcessRegistry,
        database_url: str,
        *,
        log_dir: Path,
        name: str = "metering",
        lease_seconds: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(registry, name, log_dir)
        self.database_url = database_url
        self.lease_seconds = lease_seconds
        self.env = dict(env or {})

    async def start(self, timeout: float = 60.0) -> None:
        """Starts (or restarts on the same port) and returns once health says SERVING."""
        settings = {
            **TEST_DEFAULTS,
            "DATABASE_URL": self.database_url,
            "METERING_LISTEN": self.target,
            "METERING_LEASE_SECONDS": str(self.lease_seconds),
            **self.env,
        }
        self._spawn(child_env(**settings))
        deadline = time.monotonic() + timeout
        target = None
        while target is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start in {timeout} s:\n{self.log_path.read_text()}")
            target = next((e["target"] for e in self.log() if e.get("msg") == "serving"), None)
            if target is None:
                await asyncio.sleep(0.05)
        self.port = int(target.rsplit(":", 1)[1])
        await wait_health(self.target, SERVING, timeout=max(1.0, deadline - time.monotonic()))

    def errors_logged(self) -> list[dict]:
        """Log lines of every incarnation at level error (a traceback means a bug, not a fault)."""
        return [entry for entry in self.all_logs() if entry.get("level") in ("error", "critical")]


class RendererProcess(_Server):
    """`python -m renderer` on a loopback port, with its state (outbox) and outputs under `root`."""

    module = "renderer"

    def __init__(
        self,
        registry: ProcessRegistry,
        metering_target: str,
        root: Path,
        *,
        name: str = "renderer",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(registry, name, root / "logs")
        self.metering_target = metering_target
        self.root = root
        self.env = dict(env or {})

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def output_dir(self) -> Path:
        return self.root / "renders"

    async def start(self, timeout: float = 60.0) -> None:
        """Starts and returns once it listens and says SERVING (so metering must be up)."""
        (self.root / "assets").mkdir(parents=True, exist_ok=True)
        settings = {
            "RENDERER_LISTEN": "127.0.0.1:0",
            "METERING_TARGET": self.metering_target,
            "RENDER_OUTPUT_DIR": str(self.output_dir),
            "RENDER_STATE_DIR": str(self.state_dir),
            "RENDER_ASSET_ROOTS": str(self.root / "assets"),
            "RENDER_CONCURRENCY": "1",
            "METERING_TIMEOUT_SECONDS": "2",
            **self.env,
        }
        self._spawn(child_env(**settings))
        deadline = time.monotonic() + timeout
        prefix = "renderer listening on "
        port = None
        while port is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start in {timeout} s:\n{self.log_path.read_text()}")
            lines = [e["raw"] for e in self.log() if str(e.get("raw", "")).startswith(prefix)]
            if lines:
                port = int(lines[-1].rsplit(":", 1)[1])
            else:
                await asyncio.sleep(0.05)
        self.port = port
        await wait_health(self.target, SERVING, timeout=max(1.0, deadline - time.monotonic()))

    def children(self) -> list[psutil.Process]:
        """Its child processes right now (ffmpeg while a render runs)."""
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def pending_completions(self) -> list[tuple[str, str]]:
        """(export_id, payload) of the outbox rows waiting for metering, read from its SQLite file."""
        import sqlite3

        path = self.state_dir / "outbox.sqlite3"
        if not path.exists():
            return []
        connection = sqlite3.connect(path)
        try:
            return connection.execute("SELECT export_id, payload FROM pending_completions").fetchall()
        finally:
            connection.close()


# --- a PostgreSQL of one's own, to stop abruptly ----------------------------------------------------------


def _postgres_bin() -> Path:
    """pgserver's bundled binaries: the same on every machine that has the project installed."""
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class DedicatedPostgres:
    """A throw-away PostgreSQL cluster on a loopback TCP port that a test may crash (`pg_ctl stop -m
    immediate`: every backend is killed without a checkpoint, as in a power cut of the database alone)
    and start again (crash recovery replays the WAL).

    As root, the cluster runs as the `pgserver` system user (PostgreSQL refuses to run as root), which
    pgserver itself creates; synchronous_commit stays on so that an acknowledged commit survives the crash.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix="metering-fault-pg-"))
        self._user: str | None = None
        if os.geteuid() == 0:
            import pwd

            from pgserver.utils import ensure_user_exists

            self._user = "pgserver"
            ensure_user_exists(self._user)
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.log_path = self.data_dir / "server.log"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [str(_postgres_bin() / tool), *args]
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            user=self._user,
        )

    async def init(self) -> None:
        await asyncio.to_thread(
            self._run, "initdb", "-D", str(self.data_dir / "pg"), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )

    async def start(self) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c full_page_writes=off "
            "-c max_connections=50 -c shared_buffers=16MB"
        )
        await asyncio.to_thread(
            self._run, "pg_ctl", "-D", str(self.data_dir / "pg"), "-l", str(self.log_path), "-o", options,
            "-w", "-t", "60", "start", timeout=90,
        )

    async def crash(self) -> None:
        """Stops the server at once: no checkpoint, connections cut, a crash recovery at the next start."""
        await asyncio.to_thread(self._run, "pg_ctl", "-D", str(self.data_dir / "pg"), "-m", "immediate", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data_dir / "pg"), "-m", "immediate", "stop", timeout=30)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- load --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One CheckAndReserve and its answer; times are time.monotonic()."""

    key: str
    user: str
    target: str
    started: float
    ended: float
    code: grpc.StatusCode
    export_id: str = ""
    used: int = 0
    detail: str = ""


@dataclass
class ReserveLoad:
    """`workers` loops of CheckAndReserve, each with a new idempotency key, spread over `targets`, until
    stopped. Every answer is kept in `attempts`."""

    targets: Sequence[str]
    pick_user: Callable[[random.Random], str]
    workers: int = 6
    seed: int = 0
    timeout: float = 10.0
    pause: float = 0.0
    key_prefix: str = "load"
    attempts: list[Attempt] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def __aenter__(self) -> ReserveLoad:
        self._channels = [grpc.aio.insecure_channel(t, options=FAST_RECONNECT) for t in self.targets]
        stubs = [metering_pb2_grpc.MeteringStub(channel) for channel in self._channels]
        self._tasks = [
            asyncio.create_task(self._work(n, stubs, random.Random(self.seed * 1000 + n)))
            for n in range(self.workers)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for channel in self._channels:
            await channel.close()
        self._channels = []

    async def _work(self, worker: int, stubs: list[metering_pb2_grpc.MeteringStub], rng: random.Random) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            index = (worker + n) % len(stubs)
            key = f"{self.key_prefix}-{worker}-{n}"
            user = self.pick_user(rng)
            started = time.monotonic()
            try:
                answer = await stubs[index].CheckAndReserve(reserve_request(key, user=user), timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                self.attempts.append(
                    Attempt(
                        key, user, self.targets[index], started, time.monotonic(), error.code(),
                        detail=error.details() or "",
                    )
                )
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.02)  # do not spin on a server that is down
            else:
                self.attempts.append(
                    Attempt(
                        key, user, self.targets[index], started, time.monotonic(), grpc.StatusCode.OK,
                        answer.export_id, answer.usage.used,
                    )
                )
            if self.pause:
                await asyncio.sleep(self.pause)

    def with_code(self, code: grpc.StatusCode) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.code == code]

    def codes(self) -> set[grpc.StatusCode]:
        return {attempt.code for attempt in self.attempts}


async def set_tiers(target: str, tiers: dict[str, str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = metering_pb2_grpc.MeteringStub(channel)
        for user, tier in tiers.items():
            await stub.SetAccountTier(metering_pb2.SetAccountTierRequest(user_id=user, tier=tier), timeout=10)


# --- the ledger --------------------------------------------------------------------------------------------


async def ledger_by_key(database_url: str) -> dict[str, asyncpg.Record]:
    """Every export of the ledger by idempotency key (keys are unique per user; tests make them global)."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT * FROM exports")
    finally:
        await connection.close()
    return {row["idempotency_key"]: row for row in rows}


# Each query returns the rows where a derived table disagrees with a recount from the ledger.
_CONSISTENCY_CHECKS = {
    "daily_usage differs from the RESERVED + COMPLETED exports of the user and day": """
        SELECT coalesce(d.user_id, e.user_id) AS user_id, coalesce(d.day, e.usage_day) AS day,
               d.used AS stored, coalesce(e.held, 0) AS recount
        FROM daily_usage d
        FULL JOIN (SELECT user_id, usage_day, count(*) AS held FROM exports
                   WHERE status IN ('RESERVED', 'COMPLETED') GROUP BY user_id, usage_day) e
          ON e.user_id = d.user_id AND e.usage_day = d.day
        WHERE d.used IS DISTINCT FROM coalesce(e.held, 0)
    """,
    "project_daily_usage differs from the RESERVED + COMPLETED exports of the project and day": """
        SELECT coalesce(p.project_id, e.project_id) AS project_id, coalesce(p.day, e.usage_day) AS day,
               p.used AS stored, coalesce(e.held, 0) AS recount
        FROM project_daily_usage p
        FULL JOIN (SELECT project_id, usage_day, count(*) AS held FROM exports
                   WHERE status IN ('RESERVED', 'COMPLETED') GROUP BY project_id, usage_day) e
          ON e.project_id = p.project_id AND e.usage_day = p.day
        WHERE p.used IS DISTINCT FROM coalesce(e.held, 0)
    """,
    "a project's running export count differs from its exports, or it has no owner row": """
        SELECT coalesce(c.id, e.project_id) AS project_id, c.exports AS stored, e.n AS recount, p.user_id AS owner
        FROM (SELECT id, exports FROM export_counters WHERE kind = 'project' AND exports <> 0) c
        FULL JOIN (SELECT project_id, count(*) AS n FROM exports GROUP BY project_id) e ON e.project_id = c.id
        LEFT JOIN projects p ON p.project_id = coalesce(c.id, e.project_id)
        WHERE c.exports IS DISTINCT FROM e.n OR p.project_id IS NULL
    """,
    "export_rollups differ from the ledger": """
        WITH recount AS (
            SELECT usage_day AS day, user_id, project_id, format, render_mode,
                   count(*) AS exports,
                   count(*) FILTER (WHERE status = 'RESERVED') AS reserved,
                   count(*) FILTER (WHERE status = 'COMPLETED') AS completed,
                   count(*) FILTER (WHERE status = 'FAILED') AS failed,
                   count(*) FILTER (WHERE status = 'CANCELLED') AS cancelled,
                   count(*) FILTER (WHERE status = 'EXPIRED') AS expired,
                   coalesce(sum(file_size_bytes) FILTER (WHERE status = 'COMPLETED'), 0) AS completed_bytes,
                   coalesce(sum(coalesce(duration_seconds, requested_duration_seconds))
                            FILTER (WHERE status = 'COMPLETED'), 0) AS completed_seconds
            FROM exports GROUP BY 1, 2, 3, 4, 5
        )
        SELECT coalesce(r.day, c.day) AS day, coalesce(r.user_id, c.user_id) AS user_id,
               coalesce(r.project_id, c.project_id) AS project_id,
               (r.exports, r.reserved, r.completed, r.failed, r.cancelled, r.expired, r.completed_bytes)::text
                   AS stored,
               (c.exports, c.reserved, c.completed, c.failed, c.cancelled, c.expired, c.completed_bytes)::text
                   AS recount
        FROM export_rollups r
        FULL JOIN recount c USING (day, user_id, project_id, format, render_mode)
        WHERE (r.exports, r.reserved, r.completed, r.failed, r.cancelled, r.expired, r.completed_bytes)
              IS DISTINCT FROM
              (c.exports, c.reserved, c.completed, c.failed, c.cancelled, c.expired, c.completed_bytes)
           OR abs(coalesce(r.completed_duration_seconds, 0) - coalesce(c.completed_seconds, 0)) > 1e-6
    """,
    "render_time_histogram counts differ from the completed exports with a render time": """
        SELECT h.total AS stored, e.total AS recount
        FROM (SELECT coalesce(sum(count), 0) AS total FROM render_time_histogram) h,
             (SELECT count(*) AS total FROM exports WHERE status = 'COMPLETED' AND render_seconds > 0) e
        WHERE h.total <> e.total
    """,
    "an export's timestamps disagree with its status": """
        SELECT export_id, status FROM exports
        WHERE (status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND completed_at IS NULL)
           OR (status = 'EXPIRED' AND expired_at IS NULL)
           OR (status = 'RESERVED' AND (completed_at IS NOT NULL OR expired_at IS NOT NULL))
    """,
}

# The system summaries (migrations/0003) against the rollups, which the checks above hold to the ledger.
SUMMARY_CHECKS = {
    "system_rollups differ from export_rollups": """
        WITH recount AS (
            SELECT day, format, render_mode, sum(exports) AS exports,
                   sum(reserved) AS reserved, sum(completed) AS completed, sum(failed) AS failed,
                   sum(cancelled) AS cancelled, sum(expired) AS expired, sum(completed_bytes) AS completed_bytes,
                   sum(completed_duration_seconds) AS completed_seconds, max(last_export_at) AS last_export_at
            FROM export_rollups GROUP BY 1, 2, 3
        ), kept AS (
            SELECT day, format, render_mode, sum(exports) AS exports, sum(reserved) AS reserved,
                   sum(completed) AS completed, sum(failed) AS failed, sum(cancelled) AS cancelled,
                   sum(expired) AS expired, sum(completed_bytes) AS completed_bytes,
                   sum(completed_duration_seconds) AS completed_duration_seconds, max(last_export_at) AS last_export_at
            FROM (SELECT * FROM system_rollups UNION ALL SELECT * FROM system_rollup_deltas) AS folded_or_not
            GROUP BY 1, 2, 3
        )
        SELECT day, format, render_mode,
               (s.exports, s.reserved, s.completed, s.failed, s.cancelled, s.expired, s.completed_bytes,
                s.last_export_at)::text AS stored,
               (r.exports, r.reserved, r.completed, r.failed, r.cancelled, r.expired, r.completed_bytes,
                r.last_export_at)::text AS recount
        FROM kept s FULL JOIN recount r USING (day, format, render_mode)
        WHERE (s.exports, s.reserved, s.completed, s.failed, s.cancelled, s.expired, s.completed_bytes,
               s.last_export_at)
              IS DISTINCT FROM
              (r.exports, r.reserved, r.completed, r.failed, r.cancelled, r.expired, r.completed_bytes,
               r.last_export_at)
           OR abs(coalesce(s.completed_duration_seconds, 0) - coalesce(r.completed_seconds, 0)) > 1e-6
    """,
    "system_render_time_histogram differs from render_time_histogram": """
        SELECT day, bucket, s.count AS stored, r.count AS recount
        FROM (
            SELECT day, bucket, sum(count) AS count
            FROM (SELECT day, bucket, count FROM system_render_time_histogram
                  UNION ALL SELECT day, bucket, count FROM system_render_time_deltas) AS folded_or_not
            GROUP BY 1, 2
        ) s
        FULL JOIN (SELECT day, bucket, sum(count) AS count FROM render_time_histogram GROUP BY 1, 2) r
          USING (day, bucket)
        WHERE s.count IS DISTINCT FROM r.count
    """,
    "export_counters or export_counter_history differ from export_rollups": """
        WITH per_day AS (
            SELECT k.kind, k.id, r.day, sum(r.exports) AS exports,
                   sum(r.exports) FILTER (WHERE r.format = 'mp4') AS mp4,
                   sum(r.exports) FILTER (WHERE r.format = 'webm') AS webm,
                   sum(r.exports) FILTER (WHERE r.format = 'gif') AS gif,
                   max(r.last_export_at) AS last_export_at
            FROM export_rollups r
            CROSS JOIN LATERAL (VALUES ('user', r.user_id), ('project', r.project_id)) AS k(kind, id)
            GROUP BY 1, 2, 3
        ), running AS (
            SELECT kind, id, day, sum(exports) OVER w AS exports, coalesce(sum(mp4) OVER w, 0) AS mp4,
                   coalesce(sum(webm) OVER w, 0) AS webm, coalesce(sum(gif) OVER w, 0) AS gif,
                   max(last_export_at) OVER w AS last_export_at, max(day) OVER (PARTITION BY kind, id) AS current_day
            FROM per_day WINDOW w AS (PARTITION BY kind, id ORDER BY day)
        ), expected AS (
            SELECT kind, id, day, exports, mp4, webm, gif,
                   CASE WHEN day = current_day THEN last_export_at END AS last_export_at,
                   day = current_day AS is_counter
            FROM running
        ), kept AS (
            -- Counters and history rows with no exports yet are created for reservations that were refused.
            SELECT kind, id, current_day AS day, exports, mp4, webm, gif, last_export_at, true AS is_counter
            FROM export_counters WHERE exports <> 0
            UNION ALL
            SELECT kind, id, day, exports, mp4, webm, gif, NULL, false FROM export_counter_history WHERE exports <> 0
        )
        SELECT kind, id, day, is_counter, (k.exports, k.mp4, k.webm, k.gif, k.last_export_at)::text AS stored,
               (e.exports, e.mp4, e.webm, e.gif, e.last_export_at)::text AS recount
        FROM kept k FULL JOIN expected e USING (kind, id, day, is_counter)
        WHERE (k.exports, k.mp4, k.webm, k.gif, k.last_export_at)
              IS DISTINCT FROM (e.exports, e.mp4, e.webm, e.gif, e.last_export_at)
    """,
}
_CONSISTENCY_CHECKS.update(SUMMARY_CHECKS)

_OVERDUE = """
    SELECT export_id, user_id, lease_expires_at FROM exports
    WHERE status = 'RESERVED' AND lease_expires_at < now() - make_interval(secs => $1)
"""

# Over-admission: the exports that held a slot from their admission to now (never released) cannot
# outnumber the limit, whatever late completions added afterwards.
_HELD_SINCE_ADMISSION = """
    SELECT user_id, usage_day, count(*) AS held FROM exports
    WHERE status IN ('RESERVED', 'COMPLETED') AND expired_at IS NULL
    GROUP BY user_id, usage_day
"""


async def ledger_violations(
    database_url: str,
    *,
    overdue_grace_seconds: float | None = None,
    daily_limits: dict[str, int] | None = None,
) -> list[str]:
    """What disagrees with the ledger: derived tables against a recount, RESERVED exports whose lease is
    over by more than `overdue_grace_seconds` (the reaper's job), and users of `daily_limits` ({user: limit})
    holding more exports than their limit. Empty when everything adds up."""
    found: list[str] = []
    connection = await asyncpg.connect(database_url)
    try:
        for what, query in _CONSISTENCY_CHECKS.items():
            for row in await connection.fetch(query):
                found.append(f"{what}: {dict(row)}")
        if overdue_grace_seconds is not None:
            for row in await connection.fetch(_OVERDUE, overdue_grace_seconds):
                found.append(f"RESERVED export whose lease is over and was not reaped: {dict(row)}")
        if daily_limits:
            for row in await connection.fetch(_HELD_SINCE_ADMISSION):
                limit = daily_limits.get(row["user_id"])
                if limit is not None and row["held"] > limit:
                    found.append(f"over-admission: {dict(row)} with a limit of {limit}")
    finally:
        await connection.close()
    return found
