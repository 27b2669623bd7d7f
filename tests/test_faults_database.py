"""The database goes away abruptly under load and comes back: metering answers UNAVAILABLE meanwhile,
recovers by itself, and the ledger holds exactly what was acknowledged.

Two ways to lose the database: a TCP proxy in front of it cut (every connection dropped, new ones
refused), and a PostgreSQL of the test's own stopped with `pg_ctl stop -m immediate` (backends killed,
no checkpoint, crash recovery on the next start).
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from tests.support.faults import (
    NOT_SERVING,
    SERVING,
    Attempt,
    DedicatedPostgres,
    MeteringReplica,
    ProcessRegistry,
    ReserveLoad,
    free_port,
    ledger_by_key,
    ledger_violations,
    until,
)
from tests.support.metering import http_health, metering_stub, reserve_request, wait_health
from tests.support.pgproxy import PgProxy

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Outage:
    database_url: str  # what metering connects to
    ledger_url: str  # what the test reads the ledger from, around any fault
    stop: Callable[[], Awaitable[None]]
    start: Callable[[], Awaitable[None]]


@pytest.fixture
def processes() -> Iterator[ProcessRegistry]:
    registry = ProcessRegistry()
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture(params=["proxy-cut", "postgres-crash"])
async def outage(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Outage]:
    if request.param == "proxy-cut":
        async with PgProxy(database_url) as proxy:

            async def restore() -> None:
                proxy.restore()

            yield Outage(proxy.dsn, database_url, proxy.cut, restore)
        return
    postgres = DedicatedPostgres()
    try:
        await postgres.init()
        await postgres.start()
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            await admin.execute("CREATE DATABASE metering")
        finally:
            await admin.close()
        dsn = postgres.dsn("metering")
        yield Outage(dsn, dsn, postgres.crash, postgres.start)
    finally:
        postgres.close()


def some_user(rng: random.Random) -> str:
    # Mostly users of their own, so reservations keep passing after the outage; a few busy ones that meet
    # each other in the same day rows and reach the free tier's limit of 3.
    return f"db-busy-{rng.randrange(20)}" if rng.random() < 0.2 else f"db-user-{rng.getrandbits(48):x}"


async def test_database_lost_under_load_unavailable_then_recovered_without_restart_ledger_exact(
    outage: Outage, tmp_path: Path, processes: ProcessRegistry
) -> None:
    metrics_port = free_port()
    metering = MeteringReplica(
        processes,
        outage.database_url,
        log_dir=tmp_path,
        env={"METERING_DB_CONNECT_TIMEOUT_SECONDS": "2", "METERING_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"},
    )
    await metering.start()
    pid = metering.process.pid

    def answered(predicate: Callable[[Attempt], bool], count: int) -> Callable[[], bool]:
        return lambda: sum(1 for a in load.attempts if predicate(a)) >= count

    async with ReserveLoad([metering.target], some_user, workers=6) as load:
        await until(answered(lambda a: a.code == OK, 30), timeout=30, what="reservations before the outage")
        cut_started = time.monotonic()
        await outage.stop()
        cut_done = time.monotonic()
        await wait_health(metering.target, NOT_SERVING, timeout=15)
        health_during = http_health(metrics_port)  # what a Kubernetes probe (plaintext HTTP) sees
        await until(
            answered(lambda a: a.started > cut_done, 20), timeout=30, what="calls answered during the outage"
        )
        restore_started = time.monotonic()
        await outage.start()
        await wait_health(metering.target, SERVING, timeout=30)
        recovered = time.monotonic()
        health_after = http_health(metrics_port)
        await until(
            answered(lambda a: a.started > recovered and a.code == OK, 30),
            timeout=30,
            what="reservations after the database came back",
        )
    attempts = list(load.attempts)

    during = [a for a in attempts if a.started > cut_done and a.ended < restore_started]
    # In flight when the connections dropped: the commit may have happened with its answer lost.
    # The caller's remedy is the same idempotency key again, which must settle it either way.
    straddling = [a for a in attempts if a.code == UNAVAILABLE and a.started < cut_done and a.ended >= cut_started]
    ledger_before_retry = await ledger_by_key(outage.ledger_url)
    retried = {}
    async with metering_stub(metering.target) as stub:
        for a in straddling:
            try:
                retried[a.key] = await stub.CheckAndReserve(reserve_request(a.key, user=a.user), timeout=10)
            except grpc.aio.AioRpcError as error:
                assert error.code() == RESOURCE_EXHAUSTED  # the user's day filled up meanwhile
                assert a.key not in ledger_before_retry
    ledger = await ledger_by_key(outage.ledger_url)
    violations = await ledger_violations(outage.ledger_url, daily_limits={a.user: 3 for a in attempts})

    assert {a.code for a in attempts} <= {OK, UNAVAILABLE, RESOURCE_EXHAUSTED}  # never UNKNOWN or INTERNAL
    assert during and all(a.code == UNAVAILABLE for a in during)
    assert health_during == (503, "NOT_SERVING") and health_after == (200, "SERVING")
    assert metering.process.pid == pid and metering.running and metering.incarnation == 1  # no restart
    acknowledged = [a for a in attempts if a.code == OK]
    assert all(a.key in ledger and str(ledger[a.key]["export_id"]) == a.export_id for a in acknowledged)
    straddling_keys = {a.key for a in straddling}
    refused = [a for a in attempts if a.code != OK and a.key not in straddling_keys]
    assert [a.key for a in refused if a.key in ledger_before_retry] == []
    for key, answer in retried.items():
        if key in ledger_before_retry:  # committed although answered UNAVAILABLE: the retry finds it
            assert answer.replayed and answer.export_id == str(ledger_before_retry[key]["export_id"])
        assert str(ledger[key]["export_id"]) == answer.export_id
    assert set(ledger) == {a.key for a in acknowledged} | set(retried)  # nothing else
    assert violations == []
    assert metering.errors_logged() == []
