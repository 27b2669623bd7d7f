"""Soak: mixed metering traffic against two replicas on one database, with faults injected at random, then
an invariant check of the ledger.

    .venv/bin/python -m bench.soak --seconds 180 --seed 7

Traffic: reserve, complete, fail, cancel, extend (heartbeat) and reads (usage, stats, history) from
`--workers` clients spread over both replicas, for users of the free, pro and unlimited tiers; some
reservations are abandoned to their lease. Faults, one at a time, in a seeded order that cycles through
every kind: a replica SIGKILLed and restarted, the database cut (every connection dropped) and restored,
a replica SIGTERMed (it must drain and exit 0) and restarted. Loopback only; bounded by `--seconds`,
`--max-operations` and `--max-faults`.

Afterwards every answer that was neither OK nor a definite refusal (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED:
the outcome is unknown) is retried with the same idempotency key or outcome until metering settles it, the
leases are left to run out, and the ledger is checked:
  - every acknowledged reservation is in the ledger with its export id, every acknowledged Complete with its
    outcome (and size and URI); nothing refused is there, nothing the clients never asked for either;
  - no reservation expired before the lease its last acknowledged heartbeat promised;
  - no RESERVED export is left with its lease over (the reaper ran);
  - daily and per-project usage, project counts, stats rollups and the render-time histogram equal a recount
    from the ledger; no free or pro user holds more exports than the tier's limit.
Prints a JSON summary; exits 1 when anything acknowledged was lost or any invariant was violated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # before grpc: the embedded PostgreSQL forks

import grpc

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from tests.support.faults import (
    FAST_RECONNECT,
    SERVING,
    MeteringReplica,
    ProcessRegistry,
    ledger_by_key,
    ledger_violations,
    set_tiers,
    until,
)
from tests.support.metering import wait_health
from tests.support.pgproxy import PgProxy

OK = grpc.StatusCode.OK
# The call may or may not have taken effect: settled afterwards by the same request again.
UNKNOWN_OUTCOME = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
FAULT_KINDS = ("replica_kill", "database_cut", "replica_sigterm")
OPERATION_WEIGHTS = {"reserve": 34, "complete": 14, "fail": 7, "cancel": 5, "extend": 16, "read": 24}
LIMITS = {"free": 3, "pro": 50}
CALL_TIMEOUT = 5.0
SHUTDOWN_GRACE_SECONDS = 5.0
EXPIRY_CLOCK_SLACK = timedelta(milliseconds=50)


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 30.0
    seed: int = 1
    workers: int = 8
    lease_seconds: float = 2.0
    fault_interval: tuple[float, float] = (1.5, 4.0)  # quiet time before each fault
    max_faults: int = 1000
    max_operations: int = 10_000_000
    think_seconds: float = 0.004  # mean pause of a client between calls: keeps a shared machine usable
    abandon_ratio: float = 0.08  # reservations left to their lease
    long_render_ratio: float = 0.1  # reservations heartbeated through a few leases before they close


@dataclass
class Tracked:
    """One reservation a client asked for, and what metering acknowledged about it."""

    request: pb.CheckAndReserveRequest
    reserve: str = "unknown"  # "ok", "refused" or "unknown"
    export_id: str = ""
    lease: datetime | None = None  # the latest lease an OK answer promised
    close: pb.CompleteRequest | None = None
    close_state: str = ""  # "", "ok" or "unknown"


@dataclass
class Report:
    operations: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    timeouts: list[dict[str, Any]] = field(default_factory=list)
    settled: int = 0
    settle_calls: int = 0


TIER_WEIGHTS = {"free": 5, "pro": 3, "unlimited": 2}  # how often a reservation is for a user of each tier


def _users(seconds: float) -> dict[str, str]:
    """Users by tier; more of them for longer runs, so that quotas keep admitting as well as refusing."""
    users = {f"soak-free-{n}": "free" for n in range(max(24, int(seconds)))}
    users |= {f"soak-pro-{n}": "pro" for n in range(max(6, int(seconds / 10)))}
    users |= {f"soak-unlimited-{n}": "unlimited" for n in range(3)}
    return users


class Soak:
    def __init__(self, config: SoakConfig, replicas: list[MeteringReplica], proxy: PgProxy) -> None:
        self.config = config
        self.replicas = replicas
        self.proxy = proxy
        self.rng = random.Random(config.seed)
        self.users = _users(config.seconds)
        self._by_tier = {tier: [u for u, t in self.users.items() if t == tier] for tier in TIER_WEIGHTS}
        self.tracked: dict[str, Tracked] = {}
        self.report = Report()
        self._stop = asyncio.Event()
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[metering_pb2_grpc.MeteringStub] = []
        self.started = time.monotonic()
        self._long_renders: set[asyncio.Task[None]] = set()

    # --- set-up -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        self._channels = [grpc.aio.insecure_channel(r.target, options=FAST_RECONNECT) for r in self.replicas]
        self._stubs = [metering_pb2_grpc.MeteringStub(channel) for channel in self._channels]
        await set_tiers(self.replicas[0].target, {u: t for u, t in self.users.items() if t != "free"})

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # --- traffic ------------------------------------------------------------------------------------------

    async def _call(self, kind: str, rng: random.Random, method: str, request: Any) -> tuple[grpc.StatusCode, Any]:
        replica = rng.randrange(len(self._stubs))
        if kind == "settle":
            self.report.settle_calls += 1
        else:
            self.report.operations[kind] += 1
        try:
            answer = await getattr(self._stubs[replica], method)(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            self.report.answers[error.code().name] += 1
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.report.timeouts.append(
                    {"rpc": method, "replica": self.replicas[replica].name, "at_seconds": self._elapsed()}
                )
            if error.code() in UNKNOWN_OUTCOME:
                await asyncio.sleep(rng.uniform(0.02, 0.06))  # a client backs off from a server that is away
            return error.code(), error
        self.report.answers["OK"] += 1
        return OK, answer

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def _unexpected(self, kind: str, code: grpc.StatusCode, answer: Any) -> None:
        detail = answer.details() if isinstance(answer, grpc.aio.AioRpcError) else ""
        self.report.violations.append(f"{kind} answered {code.name}: {detail}")

    async def _worker(self, number: int, deadline: float) -> None:
        rng = random.Random(self.config.seed * 7919 + number)
        open_exports: list[Tracked] = []
        kinds, weights = zip(*OPERATION_WEIGHTS.items(), strict=True)
        for sequence in itertools.count():
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            if sum(self.report.operations.values()) >= self.config.max_operations:
                return
            kind = rng.choices(kinds, weights)[0]
            if kind in ("complete", "fail", "cancel", "extend") and not open_exports:
                kind = "reserve"
            if kind == "reserve":
                await self._reserve(rng, f"soak-{self.config.seed}-{number}-{sequence}", open_exports)
            elif kind == "extend":
                await self._extend(rng, rng.choice(open_exports))
            elif kind == "read":
                await self._read(rng)
            else:
                tracked = open_exports.pop(rng.randrange(len(open_exports)))
                await self._close(rng, kind, tracked)
            await asyncio.sleep(rng.expovariate(1 / self.config.think_seconds) if self.config.think_seconds else 0)

    async def _reserve(self, rng: random.Random, key: str, open_exports: list[Tracked]) -> None:
        tier = rng.choices(list(TIER_WEIGHTS), list(TIER_WEIGHTS.values()))[0]
        user = rng.choice(self._by_tier[tier])
        seconds = rng.choice([1.0, 2.5, 5.0, 12.0, 30.0]) if rng.random() > 0.04 else 45.0
        request = pb.CheckAndReserveRequest(
            idempotency_key=key,
            user_id=user,
            project_id=f"{user}-project-{rng.randrange(3)}",
            render_mode=rng.choice([pb.RENDER_MODE_LOCAL, pb.RENDER_MODE_LAMBDA]),
            format=rng.choice(["mp4", "webm", "gif"]),
            duration_seconds=seconds,
            resolution=rng.choice(["160x120", "1280x720", "1920x1080"]),
        )
        tracked = self.tracked[key] = Tracked(request)
        code, answer = await self._call("reserve", rng, "CheckAndReserve", request)
        if code == OK:
            self._reserved(tracked, answer)
            chance = rng.random()
            if chance < self.config.long_render_ratio:
                task = asyncio.create_task(self._long_render(random.Random(rng.random()), tracked))
                self._long_renders.add(task)
                task.add_done_callback(self._long_renders.discard)
            elif chance < self.config.long_render_ratio + self.config.abandon_ratio:
                pass  # abandoned: the reaper expires it when its lease runs out
            else:
                open_exports.append(tracked)
        elif code in UNKNOWN_OUTCOME:
            tracked.reserve = "unknown"
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and tier in LIMITS:
            tracked.reserve = "refused"
        elif code == grpc.StatusCode.FAILED_PRECONDITION and tier == "free" and seconds > 30:
            tracked.reserve = "refused"
        else:
            tracked.reserve = "refused"
            self._unexpected(f"CheckAndReserve ({tier} user, {seconds:g} s)", code, answer)

    async def _long_render(self, rng: random.Random, tracked: Tracked) -> None:
        """A render that outlives its lease, kept alive by heartbeats at uneven intervals (some late in the
        lease), then closed."""
        lease = self.config.lease_seconds
        ends = time.monotonic() + rng.uniform(1.0, 4.0) * lease
        while time.monotonic() < ends and not self._stop.is_set():
            await asyncio.sleep(rng.uniform(0.2, 0.8) * lease)
            await self._extend(rng, tracked)
        await self._close(rng, rng.choice(["complete", "complete", "fail", "cancel"]), tracked)

    def _reserved(self, tracked: Tracked, answer: pb.CheckAndReserveResponse) -> None:
        tracked.reserve = "ok"
        tracked.export_id = answer.export_id
        lease = answer.lease_expires_at.ToDatetime(tzinfo=UTC)
        tracked.lease = max(tracked.lease, lease) if tracked.lease else lease

    async def _extend(self, rng: random.Random, tracked: Tracked) -> None:
        code, answer = await self._call(
            "extend", rng, "ExtendReservation", pb.ExtendReservationRequest(export_id=tracked.export_id)
        )
        answered = datetime.now(UTC)
        if code == OK:
            lease = answer.lease_expires_at.ToDatetime(tzinfo=UTC)
            tracked.lease = max(tracked.lease, lease) if tracked.lease else lease
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            # The lease ran out first: EXPIRED (a Complete is still recorded, late). But not before the lease
            # an OK answer promised: metering decided before it answered, and this host has one clock.
            if tracked.lease and answered < tracked.lease - EXPIRY_CLOCK_SLACK:
                self.report.violations.append(
                    f"{tracked.request.idempotency_key} was expired before {tracked.lease.isoformat()}, "
                    f"the lease promised to it (answered at {answered.isoformat()})"
                )
        elif code not in UNKNOWN_OUTCOME:
            self._unexpected("ExtendReservation", code, answer)

    async def _close(self, rng: random.Random, kind: str, tracked: Tracked) -> None:
        if kind == "complete":
            length = tracked.request.duration_seconds
            tracked.close = pb.CompleteRequest(
                export_id=tracked.export_id,
                outcome=pb.EXPORT_STATUS_COMPLETED,
                file_size_bytes=rng.randrange(1_000, 5_000_000),
                duration_seconds=rng.choice([0.0, length]),  # 0: not measured, the requested length counts
                output_uri=f"file:///soak/{tracked.export_id}.{tracked.request.format}",
                render_seconds=rng.choice([0.0, rng.uniform(0.1, 60)]),
            )
        elif kind == "fail":
            tracked.close = pb.CompleteRequest(
                export_id=tracked.export_id, outcome=pb.EXPORT_STATUS_FAILED, error="soak: render failed"
            )
        else:
            tracked.close = pb.CompleteRequest(export_id=tracked.export_id, outcome=pb.EXPORT_STATUS_CANCELLED)
        await self._send_close(rng, kind, tracked)

    async def _send_close(self, rng: random.Random, kind: str, tracked: Tracked) -> None:
        assert tracked.close is not None
        code, answer = await self._call(kind, rng, "Complete", tracked.close)
        if code == OK:
            tracked.close_state = "ok"
            if answer.export.status != tracked.close.outcome:
                self.report.violations.append(f"Complete of {tracked.export_id} answered {answer.export.status}")
        elif code in UNKNOWN_OUTCOME:
            tracked.close_state = "unknown"
        else:
            tracked.close_state = "refused"
            self._unexpected(f"Complete ({kind})", code, answer)

    async def _read(self, rng: random.Random) -> None:
        user = rng.choice(list(self.users))
        choice = rng.randrange(4)
        if choice == 0:
            code, answer = await self._call("read", rng, "GetUsage", pb.GetUsageRequest(user_id=user))
        elif choice == 1:
            code, answer = await self._call("read", rng, "GetStats", pb.GetStatsRequest(user_id=user, days=2))
        elif choice == 2:
            code, answer = await self._call("read", rng, "GetStats", pb.GetStatsRequest(days=2))
        else:
            request = pb.ListExportsRequest(user_id=user, page_size=20)
            code, answer = await self._call("read", rng, "ListExports", request)
        if code != OK and code not in UNKNOWN_OUTCOME:
            self._unexpected("read", code, answer)

    # --- faults -------------------------------------------------------------------------------------------

    async def _faults(self, deadline: float) -> None:
        order = list(FAULT_KINDS)
        self.rng.shuffle(order)
        for kind in itertools.cycle(order):
            if sum(self.report.faults.values()) >= self.config.max_faults:
                return
            quiet = self.rng.uniform(*self.config.fault_interval)
            if time.monotonic() + quiet > deadline - 1:
                return
            await asyncio.sleep(quiet)
            started = time.monotonic()
            entry: dict[str, Any] = {"kind": kind, "at_seconds": self._elapsed()}
            try:
                await self._inject(kind, entry)
            except Exception as error:  # a replica that does not come back is a finding, not a crash
                self.report.violations.append(f"fault {kind}: {type(error).__name__}: {error}")
                entry["error"] = str(error)[:500]
            entry["recovered_seconds"] = round(time.monotonic() - started, 2)
            self.report.faults[kind] += 1
            self.report.fault_log.append(entry)

    async def _inject(self, kind: str, entry: dict[str, Any]) -> None:
        if kind == "database_cut":
            outage = self.rng.uniform(0.5, 2.0)
            entry["outage_seconds"] = round(outage, 2)
            await self.proxy.cut()
            await asyncio.sleep(outage)
            self.proxy.restore()
            for replica in self.replicas:
                await wait_health(replica.target, SERVING, timeout=30)
            return
        replica = self.rng.choice(self.replicas)
        entry["replica"] = replica.name
        if kind == "replica_kill":
            replica.kill()
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        else:
            code = await replica.terminate(timeout=SHUTDOWN_GRACE_SECONDS + 15)
            entry["exit_code"] = code
            if code != 0:
                self.report.violations.append(f"{replica.name} exited {code} after SIGTERM")
        await replica.start()

    # --- the run ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.started = time.monotonic()
        deadline = self.started + self.config.seconds
        faults = asyncio.create_task(self._faults(deadline))
        workers = [asyncio.create_task(self._worker(n, deadline)) for n in range(self.config.workers)]
        try:
            await asyncio.gather(*workers)
        finally:
            self._stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*list(self._long_renders))  # each closes its export as it stops
            await faults

    async def settle(self, timeout: float = 60.0) -> None:
        """Retries every call whose outcome is unknown with the same request, until metering answers it."""
        for replica in self.replicas:
            if not replica.running:
                await replica.start()
            await wait_health(replica.target, SERVING, timeout=30)
        rng = random.Random(self.config.seed + 1)
        deadline = time.monotonic() + timeout
        for tracked in list(self.tracked.values()):
            while tracked.reserve == "unknown" and time.monotonic() < deadline:
                code, answer = await self._call("settle", rng, "CheckAndReserve", tracked.request)
                if code == OK:
                    self._reserved(tracked, answer)
                    self.report.settled += 1
                elif code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION):
                    tracked.reserve = "refused"
                    self.report.settled += 1
                elif code not in UNKNOWN_OUTCOME:
                    self._unexpected("CheckAndReserve retried", code, answer)
                    tracked.reserve = "refused"
                else:
                    await asyncio.sleep(0.1)
            while tracked.close_state == "unknown" and time.monotonic() < deadline:
                await self._send_close(rng, "settle", tracked)
                if tracked.close_state == "ok":
                    self.report.settled += 1
                elif tracked.close_state == "unknown":
                    await asyncio.sleep(0.1)
        unsettled = [t for t in self.tracked.values() if "unknown" in (t.reserve, t.close_state)]
        for tracked in unsettled:
            self.report.violations.append(f"never settled: {tracked.request.idempotency_key}")

    async def check(self, database_url: str) -> dict[str, int]:
        """Compares the ledger with what was acknowledged; returns the ledger's exports by status."""
        # Every lease has run out by now (no client heartbeats any more); the reaper must expire them all.
        reaper_slack = self.config.lease_seconds / 4 + 3.0

        async def reaped() -> bool:
            ledger = await ledger_by_key(database_url)
            return not any(row["status"] == "RESERVED" for row in ledger.values())

        with contextlib.suppress(TimeoutError):
            await until(reaped, timeout=self.config.lease_seconds + 15, what="leases to run out", interval=0.25)
        ledger = await ledger_by_key(database_url)
        report = self.report
        for key, tracked in self.tracked.items():
            row = ledger.get(key)
            if tracked.reserve == "refused":
                if row is not None:
                    report.violations.append(f"refused reservation {key} is in the ledger")
                continue
            if tracked.reserve != "ok":
                continue  # unsettled, reported already
            if row is None or str(row["export_id"]) != tracked.export_id:
                report.lost.append(f"acknowledged reservation {key} ({tracked.export_id}) is not in the ledger")
                continue
            if row["expired_at"] is not None and tracked.lease and row["expired_at"] < tracked.lease:
                report.violations.append(f"{key} expired at {row['expired_at']} before its lease {tracked.lease}")
            if tracked.close_state == "ok":
                assert tracked.close is not None
                status = pb.ExportStatus.Name(tracked.close.outcome).removeprefix("EXPORT_STATUS_")
                if row["status"] != status:
                    report.lost.append(f"acknowledged {status} of {key} is {row['status']} in the ledger")
                elif status == "COMPLETED" and (
                    row["file_size_bytes"] != tracked.close.file_size_bytes
                    or row["output_uri"] != tracked.close.output_uri
                ):
                    report.lost.append(f"acknowledged completion of {key} has other figures in the ledger")
            elif row["status"] not in ("RESERVED", "EXPIRED"):
                report.violations.append(f"{key} is {row['status']} though nobody closed it")
        for key in ledger.keys() - self.tracked.keys():
            report.violations.append(f"the ledger holds {key}, which no client asked for")
        limits = {user: LIMITS[tier] for user, tier in self.users.items() if tier in LIMITS}
        report.violations.extend(
            await ledger_violations(database_url, overdue_grace_seconds=reaper_slack, daily_limits=limits)
        )
        for replica in self.replicas:
            for entry in replica.errors_logged():
                report.violations.append(f"{replica.name} logged an error: {json.dumps(entry)[:800]}")
        return dict(Counter(row["status"] for row in ledger.values()))


async def run_soak(database_url: str, config: SoakConfig, *, log_dir: Path) -> dict[str, Any]:
    """Runs the soak against `database_url` (an empty or migrated database of its own); returns the summary."""
    registry = ProcessRegistry()
    try:
        async with PgProxy(database_url) as proxy:
            env = {
                "METERING_SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_SECONDS),
                "METERING_DB_CONNECT_TIMEOUT_SECONDS": "2",
                "METERING_DB_POOL_SIZE": "6",
            }
            replicas = [
                MeteringReplica(
                    registry, proxy.dsn, log_dir=log_dir, name=name, lease_seconds=config.lease_seconds, env=env
                )
                for name in ("replica-a", "replica-b")
            ]
            for replica in replicas:  # one after the other: the first applies the migrations
                await replica.start()
            soak = Soak(config, replicas, proxy)
            await soak.open()
            started = time.monotonic()
            try:
                await soak.run()
                traffic_seconds = time.monotonic() - started
                await soak.settle()
            finally:
                await soak.close()
            by_status = await soak.check(database_url)
            for replica in replicas:
                code = await replica.terminate(timeout=SHUTDOWN_GRACE_SECONDS + 15)
                if code != 0:
                    soak.report.violations.append(f"{replica.name} exited {code} at the end")
    finally:
        registry.close()
    report = soak.report
    acknowledged = sum(t.reserve == "ok" for t in soak.tracked.values()) + sum(
        t.close_state == "ok" for t in soak.tracked.values()
    )
    return {
        "seconds": round(traffic_seconds, 1),
        "seed": config.seed,
        "workers": config.workers,
        "replicas": len(replicas),
        "lease_seconds": config.lease_seconds,
        "operations": dict(sorted(report.operations.items())),
        "answers": dict(sorted(report.answers.items())),
        "faults": {kind: report.faults[kind] for kind in FAULT_KINDS},
        "fault_recovery_seconds_max": max((f["recovered_seconds"] for f in report.fault_log), default=0.0),
        "acknowledged": acknowledged,
        "refused": sum(t.reserve == "refused" for t in soak.tracked.values()),
        "settled_by_retry": report.settled,
        "settle_calls": report.settle_calls,
        "deadline_exceeded": report.timeouts[:20],
        "ledger": by_status,
        "lost": len(report.lost),
        "invariant_violations": len(report.violations),
        "problems": (report.lost + report.violations)[:30],
        "fault_log": report.fault_log,
    }


async def _standalone(config: SoakConfig, admin_dsn: str) -> dict[str, Any]:
    from tests.support.postgres import create_database, drop_database

    database_url = await create_database(admin_dsn)
    try:
        with tempfile.TemporaryDirectory(prefix="soak-") as log_dir:
            return await run_soak(database_url, config, log_dir=Path(log_dir))
    finally:
        await drop_database(admin_dsn, database_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the traffic (default 180)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--max-operations", type=int, default=10_000_000)
    parser.add_argument("--max-faults", type=int, default=1000)
    parser.add_argument("--lease-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        seed=args.seed,
        workers=args.workers,
        max_operations=args.max_operations,
        max_faults=args.max_faults,
        lease_seconds=args.lease_seconds,
    )
    # DATABASE_URL (a server that allows CREATE DATABASE) or an embedded PostgreSQL, started before any
    # gRPC object exists in this process.
    from tests.support.postgres import admin_dsn

    summary = asyncio.run(_standalone(config, admin_dsn()))
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary["lost"] or summary["invariant_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())

