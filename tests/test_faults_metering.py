"""Metering processes stopped under load: SIGTERM drains, SIGKILL of one of two replicas on one database.
Each test ends with the ledger: everything acknowledged is there, nothing refused is, no over-admission."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from exportapi.metering.v1 import metering_pb2
from exportapi.renderer.v1 import renderer_pb2
from renderer.domain import Composition, OutputFormat, RenderMode
from renderer.metering_client import GrpcMeteringClient
from renderer.metering_port import MeteringUnavailable, ReserveRequest
from tests.support.faults import (
    Attempt,
    MeteringReplica,
    ProcessRegistry,
    ReserveLoad,
    ledger_by_key,
    ledger_violations,
    set_tiers,
    until,
)
from tests.support.metering import metering_stub, reserve_request
from tests.support.renderer import renderer_stub, start_renderer, tiny_composition

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CANCELLED = grpc.StatusCode.CANCELLED


@pytest.fixture
def processes() -> Iterator[ProcessRegistry]:
    registry = ProcessRegistry()
    try:
        yield registry
    finally:
        registry.close()


def count(attempts: list[Attempt], predicate: Callable[[Attempt], bool], at_least: int) -> Callable[[], bool]:
    return lambda: sum(1 for attempt in attempts if predicate(attempt)) >= at_least


async def lock_waits(connection: asyncpg.Connection, *, at_least: int) -> bool:
    # Inside a transaction pg_stat_activity is a snapshot taken at its first read: clear it to see now.
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    waiting = await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'metering' AND wait_event_type = 'Lock'"
    )
    return waiting >= at_least


async def test_sigterm_under_load_finishes_in_flight_calls_refuses_new_ones_and_exits_zero(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    metering = MeteringReplica(
        processes, database_url, log_dir=tmp_path, env={"METERING_SHUTDOWN_GRACE_SECONDS": "20"}
    )
    await metering.start()
    await set_tiers(metering.target, {"held": "unlimited"})
    blocker = await asyncpg.connect(database_url)
    held: list[asyncio.Future] = []
    # Users of their own (one reservation each): no quota refusals in the background load.
    background = ReserveLoad([metering.target], lambda rng: f"bg-{rng.getrandbits(48):x}", workers=4)
    probes = ReserveLoad([metering.target], lambda rng: f"late-{rng.getrandbits(48):x}", workers=4, key_prefix="late")
    try:
        async with metering_stub(metering.target) as stub, background:
            await stub.CheckAndReserve(reserve_request("held-0", user="held"))
            await until(count(background.attempts, lambda a: a.code == OK, 20), timeout=30, what="background load")
            # Hold the user's day row: these reservations stay in flight until the test lets them go.
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("SELECT * FROM daily_usage WHERE user_id = 'held' FOR UPDATE")
            for n in (1, 2):  # one at a time, each seen waiting on the lock: in a handler, not queued in gRPC
                held.append(
                    asyncio.ensure_future(stub.CheckAndReserve(reserve_request(f"held-{n}", user="held"), timeout=60))
                )
                await until(
                    lambda n=n: lock_waits(blocker, at_least=n), timeout=15, what=f"held reservation {n} at the lock"
                )
            metering.process.send_signal(signal.SIGTERM)
            await until(lambda: any(e.get("msg") == "draining" for e in metering.log()), timeout=10, what="drain")
            async with probes:  # new clients, new connections, once the drain has begun
                await until(count(probes.attempts, lambda a: a.code == UNAVAILABLE, 10), timeout=15, what="refusals")
            # Still draining: the held calls keep the server alive.
            still_running = metering.running and not any(call.done() for call in held)
            await transaction.rollback()
            answers = await asyncio.gather(*held)
            returncode = await metering.wait_exit(30)
    finally:
        for call in held:
            call.cancel()
        await blocker.close()
    attempts = background.attempts + probes.attempts
    ledger = await ledger_by_key(database_url)
    violations = await ledger_violations(database_url)

    first_refusal = min(a.ended for a in attempts if a.code == UNAVAILABLE)
    # CANCELLED: a call that reached the server as it stopped, before a handler took it; gRPC cancels
    # those instead of refusing them (grpc/grpc#41785). Never run, so never in the ledger (checked below).
    assert {a.code for a in attempts} <= {OK, UNAVAILABLE, CANCELLED}
    assert all(a.code == UNAVAILABLE for a in attempts if a.started > first_refusal)  # refused from then on
    assert still_running
    assert sorted(answer.usage.used for answer in answers) == [2, 3]  # every held call finished OK
    assert returncode == 0
    messages = [entry.get("msg") for entry in metering.log()]
    assert messages.index("draining") < messages.index("stopped")
    for attempt in attempts:
        if attempt.code == OK:
            assert str(ledger[attempt.key]["export_id"]) == attempt.export_id
        else:
            assert attempt.key not in ledger  # refused before it reached the ledger
    assert set(ledger) == {a.key for a in attempts if a.code == OK} | {f"held-{n}" for n in range(3)}
    assert violations == []
    assert metering.errors_logged() == []


async def test_two_replicas_one_killed_under_load_admit_no_more_than_the_limit_and_lose_nothing(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    first = MeteringReplica(processes, database_url, log_dir=tmp_path, name="replica-a")
    second = MeteringReplica(processes, database_url, log_dir=tmp_path, name="replica-b")
    await asyncio.gather(first.start(), second.start())
    users = [f"free-{n}" for n in range(40)]  # free tier: 3 a day each

    def pick(rng: random.Random) -> str:
        return rng.choice(users)

    async with ReserveLoad([first.target, second.target], pick, workers=8) as load:
        attempts = load.attempts
        await until(count(attempts, lambda a: a.code == OK, 30), timeout=30, what="reservations before the kill")
        kill_started = time.monotonic()
        first.kill()
        killed = time.monotonic()
        await until(
            count(attempts, lambda a: a.started > killed and a.target == first.target, 10),
            timeout=15,
            what="calls to the killed replica",
        )
        await until(
            count(attempts, lambda a: a.started > killed and a.target == second.target, 60),
            timeout=30,
            what="calls to the surviving replica",
        )
        restarting = time.monotonic()
        await first.start()
        await until(
            count(attempts, lambda a: a.started > restarting and a.target == first.target and a.code != UNAVAILABLE, 5),
            timeout=30,
            what="the restarted replica to answer",
        )
    attempts = list(load.attempts)
    ledger = await ledger_by_key(database_url)
    violations = await ledger_violations(database_url, daily_limits=dict.fromkeys(users, 3))

    acknowledged: dict[str, set[str]] = defaultdict(set)
    for attempt in attempts:
        if attempt.code == OK:
            acknowledged[attempt.user].add(attempt.export_id)
    assert {a.code for a in attempts} <= {OK, UNAVAILABLE, RESOURCE_EXHAUSTED}
    while_down = [a for a in attempts if a.target == first.target and killed < a.started and a.ended < restarting]
    assert while_down and all(a.code == UNAVAILABLE for a in while_down)
    assert all(a.code != UNAVAILABLE for a in attempts if a.target == second.target)  # the survivor never failed
    assert max(len(exports) for exports in acknowledged.values()) == 3  # the limit was reached...
    assert all(len(exports) <= 3 for exports in acknowledged.values())  # ...and never passed
    for attempt in attempts:
        if attempt.code == OK:
            assert str(ledger[attempt.key]["export_id"]) == attempt.export_id  # nothing acknowledged is lost
        elif attempt.code == RESOURCE_EXHAUSTED or not (attempt.started < killed and attempt.ended >= kill_started):
            assert attempt.key not in ledger  # refused, and not in flight on the replica when it died
    assert violations == []  # counters equal a recount; no user holds more than 3 exports
    assert first.errors_logged() == [] and second.errors_logged() == []


@contextlib.asynccontextmanager
async def faulty_front(metering_target: str, faults: list[str]) -> AsyncIterator[tuple[str, list[str]]]:
    """A gRPC server in front of a real metering whose CheckAndReserve calls take the next of `faults` first:
    "cancel" answers CANCELLED without passing the call on (a stopping replica, grpc/grpc#41785), "lose" passes
    it on and then answers UNAVAILABLE (the reservation made, its answer lost), "" passes it on. Yields the
    front's target and the list of what each call met."""
    met: list[str] = []
    upstream = grpc.aio.insecure_channel(metering_target)
    forward = upstream.unary_unary(
        "/exportapi.metering.v1.Metering/CheckAndReserve",
        request_serializer=metering_pb2.CheckAndReserveRequest.SerializeToString,
        response_deserializer=metering_pb2.CheckAndReserveResponse.FromString,
    )

    async def check_and_reserve(
        request: metering_pb2.CheckAndReserveRequest, context: grpc.aio.ServicerContext
    ) -> metering_pb2.CheckAndReserveResponse:
        fault = faults.pop(0) if faults else ""
        met.append(fault)
        if fault == "cancel":
            await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        answer = await forward(request)
        if fault == "lose":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return answer

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "exportapi.metering.v1.Metering",
                {
                    "CheckAndReserve": grpc.unary_unary_rpc_method_handler(
                        check_and_reserve,
                        request_deserializer=metering_pb2.CheckAndReserveRequest.FromString,
                        response_serializer=metering_pb2.CheckAndReserveResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", met
    finally:
        await server.stop(None)
        await upstream.close()


async def test_a_call_cancelled_by_a_stopping_metering_reaches_the_renderers_caller_as_unavailable(
    tmp_path: Path,
) -> None:
    """What the SIGTERM test above sees now and then: a call that reached metering as it stopped comes
    back CANCELLED (grpc/grpc#41785). The renderer must not pass that on as if its caller had cancelled."""

    # Every try is cancelled: the front never passes a call on, so its upstream is never dialled.
    async with faulty_front("127.0.0.1:1", ["cancel", "cancel"]) as (front, met):
        async with start_renderer(front, tmp_path) as running, renderer_stub(running.target) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartRender(
                    renderer_pb2.StartRenderRequest(
                        idempotency_key="k", user_id="u", project_id="p", composition=tiny_composition(), format="mp4"
                    )
                )
    assert met == ["cancel", "cancel"]  # tried once more, then given up
    assert refused.value.code() == UNAVAILABLE
    assert not (tmp_path / "renders").exists() or not any((tmp_path / "renders").iterdir())


def render_reservation(key: str) -> ReserveRequest:
    return ReserveRequest(
        idempotency_key=key,
        user_id="roll",
        project_id="p",
        mode=RenderMode.LOCAL,
        format=OutputFormat.MP4,
        composition=Composition(width=320, height=240, fps=10, duration_seconds=1.0),
    )


@pytest.mark.parametrize("fault", ["cancel", "lose"])
async def test_a_reservation_refused_by_a_stopping_replica_is_tried_once_more_and_recorded_once(
    metering_target: str, database_url: str, fault: str
) -> None:
    """A rolling update of metering must not fail users' exports: the renderer tries a reservation refused
    UNAVAILABLE or CANCELLED once more. If the first had reserved and only its answer was lost, the second
    replays the same export: one export in the ledger, counted once."""
    async with faulty_front(metering_target, [fault]) as (front, met):
        client = GrpcMeteringClient(front)
        try:
            reservation = await client.reserve(render_reservation("roll-1"))
        finally:
            await client.close()
    ledger = await ledger_by_key(database_url)
    assert met == [fault, ""]
    assert set(ledger) == {"roll-1"} and str(ledger["roll-1"]["export_id"]) == reservation.export_id
    async with metering_stub(metering_target) as stub:
        usage = await stub.GetUsage(metering_pb2.GetUsageRequest(user_id="roll"))
    assert usage.usage.used == 1


async def test_a_reservation_refused_twice_reaches_the_caller_as_metering_unavailable(
    metering_target: str, database_url: str
) -> None:
    async with faulty_front(metering_target, ["cancel", "cancel", "cancel"]) as (front, met):
        client = GrpcMeteringClient(front)
        try:
            with pytest.raises(MeteringUnavailable):
                await client.reserve(render_reservation("roll-2"))
        finally:
            await client.close()
    assert met == ["cancel", "cancel"]  # one more try, not a retry loop
    assert await ledger_by_key(database_url) == {}


async def test_a_stuck_lock_on_one_users_day_stalls_only_that_users_reservations(
    database_url: str, tmp_path: Path, processes: ProcessRegistry
) -> None:
    """A transaction left holding one user's day row (a replica cut off mid-transaction, an operator's open
    psql session) delays that user's reservations, and nobody else's."""
    metering = MeteringReplica(processes, database_url, log_dir=tmp_path)
    await metering.start()
    blocker = await asyncpg.connect(database_url)
    held: list[asyncio.Future] = []
    try:
        async with metering_stub(metering.target) as stub:
            await stub.CheckAndReserve(reserve_request("stuck-0", user="stuck"))
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("SELECT * FROM daily_usage WHERE user_id = 'stuck' FOR UPDATE")
            for n in (1, 2):
                held.append(
                    asyncio.ensure_future(stub.CheckAndReserve(reserve_request(f"stuck-{n}", user="stuck"), timeout=60))
                )
                await until(lambda n=n: lock_waits(blocker, at_least=n), timeout=15, what=f"stuck call {n} at the lock")
            others = await asyncio.gather(
                *(stub.CheckAndReserve(reserve_request(f"free-{n}", user=f"other-{n}"), timeout=3) for n in range(5)),
                return_exceptions=True,
            )
            await transaction.rollback()
            stuck = await asyncio.gather(*held)
    finally:
        for call in held:
            call.cancel()
        await blocker.close()

    assert [type(answer).__name__ for answer in others] == ["CheckAndReserveResponse"] * 5
    assert sorted(answer.usage.used for answer in stuck) == [2, 3]  # the stuck user's calls went through after
