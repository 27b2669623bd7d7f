"""Metering: CheckAndReserve + Complete pairs per second and latency, against the real service, the no-op
server (the gRPC ceiling) and pgbench on the same SQL (the database ceiling), for two shapes of load.

The service and pgbench each run on a ledger with history (seeded in bulk, then analyzed), as a database in
production is: on an empty, never-analyzed one, PostgreSQL plans the prepared statements for tables of a
few rows (sequential scans) and keeps those plans while the tables grow, until autovacuum first analyzes
them (a minute or more later), so every run would measure that first minute instead.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile
from bench.consistency import check_ledger
from bench.database import BenchPostgres, settle
from bench.load import LoadResult, LoadSpec, run_load
from bench.machine import peak_rss_mib
from bench.pgbench import run_pgbench
from bench.services import metering_process, noop_process
from bench.stats_bench import seed

TARGET_RATIO_VS_NOOP = 0.6
TARGET_OPEN_LOOP_P99_MS = 25.0


@dataclass(frozen=True, slots=True)
class MeteringSettings:
    seconds: float = 8.0
    warmup_seconds: float = 2.0
    in_flight: int = 64
    processes: int = 2
    users: int = 10_000
    history_exports: int = 50_000  # seeded over the spread's users before each run
    pgbench_clients: int = 10  # metering's default pool size
    # Rounds of (no-op run, service run), one right after the other; the round with the median ratio is
    # reported. A single pair of runs moved 5-20 % with the machine's other work (see the README).
    rounds: int = 3
    shapes: tuple[str, ...] = ("spread", "hot")
    profile_dir: Path | None = None

    @classmethod
    def quick(cls, **changes: Any) -> MeteringSettings:
        return cls(
            **{"seconds": 0.8, "warmup_seconds": 0.3, "users": 1000, "history_exports": 2000, "rounds": 1, **changes}
        )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat less idle and iowait)."""
    try:
        fields = [int(value) for value in open("/proc/stat").readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds() -> dict[int, float]:
    """CPU time so far of every PostgreSQL process on the machine (the bench's cluster is the only busy one)."""
    seconds: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as comm:
                    if comm.read().strip() != "postgres":
                        continue
            except OSError:
                continue
            seconds[int(entry.name)] = _cpu_seconds(int(entry.name))
    return seconds


def _postgres_cpu_since(before: dict[int, float]) -> float:
    # A backend that started meanwhile counts whole; one that ended meanwhile is lost (pools keep theirs).
    return sum(max(spent - before.get(pid, 0.0), 0.0) for pid, spent in _postgres_cpu_seconds().items())


@dataclass(frozen=True, slots=True)
class _CpuUse:
    server_cores: float  # the measured server process
    postgres_cores: float  # every PostgreSQL process
    machine_cores: float  # everything: server, load clients, PostgreSQL, and anything else running


Measured = tuple[LoadResult, _CpuUse]


async def _measure(spec: LoadSpec, pid: int) -> Measured:
    """The load, and the CPU used meanwhile, in cores busy (e.g. 0.9)."""
    cpu_before, postgres_before = _cpu_seconds(pid), _postgres_cpu_seconds()
    machine_before, started = _machine_busy_seconds(), time.monotonic()
    result = await asyncio.to_thread(run_load, spec)
    elapsed = max(time.monotonic() - started, 1e-9)
    return result, _CpuUse(
        round((_cpu_seconds(pid) - cpu_before) / elapsed, 2),
        round(_postgres_cpu_since(postgres_before) / elapsed, 2),
        round((_machine_busy_seconds() - machine_before) / elapsed, 2),
    )


@dataclass(frozen=True, slots=True)
class _Round:
    """A no-op run and a service run, one right after the other: their ratio is the least disturbed by
    whatever else the machine did over the minutes the whole benchmark takes."""

    noop: Measured
    service: Measured

    @property
    def ratio(self) -> float:
        return _ratio(self.service[0].pairs_per_second, self.noop[0].pairs_per_second) or 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "noop_pairs_per_second": self.noop[0].pairs_per_second,
            "service_pairs_per_second": self.service[0].pairs_per_second,
            "ratio_vs_noop": self.ratio,
        }


def _median_round(rounds: list[_Round]) -> _Round:
    """The round whose ratio is the median (the lower middle one of an even number)."""
    ordered = sorted(rounds, key=lambda measured: measured.ratio)
    return ordered[(len(ordered) - 1) // 2]


def _load_figures(result: LoadResult, cpu: _CpuUse) -> dict[str, Any]:
    figures = result.as_dict()
    figures["server_cpu_cores"] = cpu.server_cores
    figures["postgres_cpu_cores"] = cpu.postgres_cores
    figures["machine_busy_cores"] = cpu.machine_cores
    if result.pairs_per_second:
        # Where a pair's CPU goes: the server, PostgreSQL, and everything else (mostly the load clients).
        figures["server_cpu_ms_per_pair"] = round(1000 * cpu.server_cores / result.pairs_per_second, 3)
        figures["postgres_cpu_ms_per_pair"] = round(1000 * cpu.postgres_cores / result.pairs_per_second, 3)
        figures["other_cpu_ms_per_pair"] = round(
            1000 * max(cpu.machine_cores - cpu.server_cores - cpu.postgres_cores, 0) / result.pairs_per_second, 3
        )
    return figures


async def run_metering(pg: BenchPostgres, settings: MeteringSettings) -> dict[str, Any]:
    results: dict[str, Any] = {
        "settings": {
            "seconds": settings.seconds,
            "warmup_seconds": settings.warmup_seconds,
            "in_flight": settings.in_flight,
            "client_processes": settings.processes,
            "users_in_spread": settings.users,
            "history_exports": settings.history_exports,
            "pgbench_clients": settings.pgbench_clients,
        },
        "targets": {"ratio_vs_noop": TARGET_RATIO_VS_NOOP, "open_loop_p99_ms": TARGET_OPEN_LOOP_P99_MS},
    }
    for shape in settings.shapes:
        results[shape] = await _run_shape(pg, settings, shape)
    return results


async def _run_shape(pg: BenchPostgres, settings: MeteringSettings, shape: str) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]

    def spec(target: str, rate: float | None = None, label: str = "") -> LoadSpec:
        return LoadSpec(
            target=target,
            shape=shape,
            in_flight=settings.in_flight,
            processes=settings.processes,
            seconds=settings.seconds,
            warmup_seconds=settings.warmup_seconds,
            rate=rate,
            users=settings.users,
            run_id=f"{run_id}-{label}",
        )

    database = await pg.create_database(f"bench_metering_{shape}")
    try:
        await seed(database, settings.history_exports, settings.users)  # settled by the seeding
        async with noop_process() as noop, metering_process(database) as service:
            rounds: list[_Round] = []
            profile_error = ""
            for number in range(settings.rounds):
                if number:
                    await settle(database, vacuum=True)  # the last round's dead rows, before this round's runs
                noop_run = await _measure(spec(noop.target, label=f"noop{number}"), noop.pid)
                recording = None
                if settings.profile_dir is not None and number == 0:
                    recording = profile.start_recording(
                        service.pid, settings.warmup_seconds + settings.seconds,
                        settings.profile_dir / f"metering-{shape}.collapsed",
                    )
                service_run = await _measure(spec(service.target, label=f"closed{number}"), service.pid)
                if recording is not None:
                    profile_error = profile.finish_recording(recording)
                rounds.append(_Round(noop_run, service_run))
            middle = _median_round(rounds)
            (noop_result, noop_cpu), (closed, service_cpu) = middle.noop, middle.service
            rate = max(1.0, closed.pairs_per_second / 2)
            await settle(database, vacuum=True)  # the saturated runs' leftovers are not the half load's to pay
            open_loop, open_cpu = await _measure(spec(service.target, rate=rate, label="open"), service.pid)
            peak_rss = peak_rss_mib(service.pid)
        ledger = await check_ledger(database)
    finally:
        await pg.drop_database(database)

    database = await pg.create_database(f"bench_pgbench_{shape}")
    try:
        await seed(database, settings.history_exports, settings.users)
        pgbench = await asyncio.to_thread(
            run_pgbench, database, shape=shape, clients=settings.pgbench_clients,
            seconds=settings.seconds, users=settings.users,
        )
    finally:
        await pg.drop_database(database)

    figures: dict[str, Any] = {
        "service": _load_figures(closed, service_cpu),
        "noop": _load_figures(noop_result, noop_cpu),
        "pgbench": pgbench.as_dict(),
        "open_loop": _load_figures(open_loop, open_cpu),
        "ledger": ledger,
        "server_peak_rss_mib": peak_rss,
        "ratio_vs_noop": middle.ratio,
        "rounds": [measured.as_dict() for measured in rounds],
        "ratio_vs_pgbench": _ratio(closed.pairs_per_second, pgbench.pairs_per_second),
        # At saturation latency is queueing: in flight / throughput, for comparison with the measured p50.
        "queueing_latency_ms": round(1000 * settings.in_flight / closed.pairs_per_second, 2)
        if closed.pairs_per_second
        else None,
    }
    if settings.profile_dir is not None:
        collapsed = settings.profile_dir / f"metering-{shape}.collapsed"
        if collapsed.exists():
            summary = profile.summarize(collapsed)
            (settings.profile_dir / f"metering-{shape}.txt").write_text(summary + "\n")
            figures["profile"] = str(collapsed)
        else:
            figures["profile"] = f"not recorded: {profile_error.strip() or 'py-spy missing'}"
    return figures


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline else None
