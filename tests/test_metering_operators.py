"""The operator's question, "how many exports yesterday, by format, and who is near the limit", answered three
ways from one hand-made ledger: GetStats, the command line (text and JSON), and the /metrics gauge.

The ledger (FakeClock, so "yesterday" is 2032-06-14 and "today" 2032-06-15, UTC):

    yesterday  ann (free): mp4 completed, gif failed;  ben (pro): mp4, mp4 cancelled, webm
               -> 5 exports: mp4 3, gif 1, webm 1 (every status counts in stats)
    today      ann (free)          3 of 3, project alpha     near (at the limit)
               cat (free)          2 of 3, project beta      near (1 left = max(1, 20% of 3))
               dan (free)          1 of 3                    not near (2 left)
               eve (free)          2 made, 1 failed: 1 of 3  not near (a failed export gives its slot back)
               fay (team, 10)      8 of 10                   near (2 left = 20% of 10)
               gus (team, 10)      7 of 10                   not near (3 left)
               ivy ("gold": a tier no longer configured, so free)  3 of 3   near, as free
               hal (unlimited)     12                        never near
               ben (pro, 50)       1 of 50                   not near
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exportapi.metering.v1 import metering_pb2 as pb
from metering import cli, metrics, stats
from metering.tiers import Tier, TierTable
from tests.support.metering import FakeClock, metering_stub, reserve_request, start_metering
from tests.support.postgres import run_sql

TODAY = date(2032, 6, 15)
YESTERDAY = TODAY - timedelta(days=1)
TIERS_FILE = """
[tiers.team]
daily_limit = 10
"""
YESTERDAY_BY_FORMAT = {"mp4": 3, "gif": 1, "webm": 1}
TODAY_BY_FORMAT = {"mp4": 36, "webm": 2, "gif": 1}
# Most used first; ties by user id.
NEAR_LIMIT = [("fay", "team", 8, 10), ("ann", "free", 3, 3), ("ivy", "free", 3, 3), ("cat", "free", 2, 3)]
NEAR_LIMIT_BY_TIER = {"free": 3, "team": 1, "pro": 0, "unlimited": 0}


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Ledger:
    target: str
    metrics_port: int
    clock: FakeClock
    database_url: str


@pytest.fixture
async def ledger(database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    tiers_file = tmp_path / "tiers.toml"
    tiers_file.write_text(TIERS_FILE)
    port = free_port()
    clock = FakeClock(at(YESTERDAY, 10))
    env = {"METERING_TIERS_FILE": str(tiers_file), "METERING_METRICS_LISTEN": f"127.0.0.1:{port}"}
    await run_sql(database_url, "INSERT INTO accounts VALUES ('ivy', 'gold', now(), now())")
    async with start_metering(database_url, env=env, clock=clock) as metering, metering_stub(metering.target) as stub:
        made = 0

        async def export(user: str, fmt: str = "mp4", project: str = "p", outcome: int | None = None) -> None:
            nonlocal made
            made += 1
            request = reserve_request(f"k{made}", user=user, project=project, format=fmt)
            export_id = (await stub.CheckAndReserve(request)).export_id
            if outcome is not None:
                await stub.Complete(pb.CompleteRequest(export_id=export_id, outcome=outcome))

        for user, tier in (("ben", "pro"), ("fay", "team"), ("gus", "team"), ("hal", "unlimited")):
            await stub.SetAccountTier(pb.SetAccountTierRequest(user_id=user, tier=tier))
        await export("ann", "mp4", outcome=pb.EXPORT_STATUS_COMPLETED)
        await export("ann", "gif", outcome=pb.EXPORT_STATUS_FAILED)
        await export("ben", "mp4")
        await export("ben", "mp4", outcome=pb.EXPORT_STATUS_CANCELLED)
        await export("ben", "webm")

        clock.moment = at(TODAY, 9)
        for _ in range(3):
            await export("ann", project="alpha")
        await export("cat", "webm", project="beta")
        await export("cat", "gif", project="beta")
        await export("dan")
        await export("eve")
        await export("eve", "webm", outcome=pb.EXPORT_STATUS_FAILED)
        for _ in range(8):
            await export("fay")
        for _ in range(7):
            await export("gus")
        for _ in range(3):
            await export("ivy")
        for _ in range(12):
            await export("hal")
        await export("ben")
        yield Ledger(metering.target, port, clock, database_url)


def near(users: object) -> list[tuple[str, str, int, int]]:
    return [(u.user_id, u.tier, u.used_today, u.daily_limit) for u in users]  # type: ignore[attr-defined]


async def test_get_stats_answers_yesterday_by_format_and_who_is_near_the_limit(ledger: Ledger) -> None:
    async with metering_stub(ledger.target) as stub:
        system = await stub.GetStats(pb.GetStatsRequest(days=2))
        month = await stub.GetStats(pb.GetStatsRequest())
        ann = await stub.GetStats(pb.GetStatsRequest(user_id="ann", days=2))
        dan = await stub.GetStats(pb.GetStatsRequest(user_id="dan", days=1))
        beta = await stub.GetStats(pb.GetStatsRequest(project_id="beta", days=1))

    assert [d.date for d in system.daily] == [YESTERDAY.isoformat(), TODAY.isoformat()]
    assert dict(system.daily[-2].by_format) == YESTERDAY_BY_FORMAT
    assert system.daily[-2].exports == sum(YESTERDAY_BY_FORMAT.values())
    assert dict(system.daily[-1].by_format) == TODAY_BY_FORMAT
    assert dict(month.daily[-2].by_format) == YESTERDAY_BY_FORMAT
    assert all(not d.by_format for d in month.daily[:-2])  # days without exports stay empty
    assert near(system.near_limit) == NEAR_LIMIT
    assert all(not u.HasField("last_export_at") and u.total_exports == 0 for u in system.near_limit)
    assert near(month.near_limit) == NEAR_LIMIT  # always today, whatever the window

    assert dict(ann.daily[-2].by_format) == {"mp4": 1, "gif": 1}
    assert near(ann.near_limit) == [("ann", "free", 3, 3)]
    assert list(dan.near_limit) == []
    assert near(beta.near_limit) == [("cat", "free", 2, 3)]  # exported in beta today
    assert dict(beta.daily[-1].by_format) == {"webm": 1, "gif": 1}


async def test_the_near_limit_list_is_bounded_but_the_tier_counts_are_not(ledger: Ledger) -> None:
    tiers = TierTable({**TierTable.built_in(), "team": Tier("team", daily_limit=10)})
    connection = await asyncpg.connect(ledger.database_url)
    try:
        top_two = await stats.load_near_limit(connection, today=TODAY, tiers=tiers, top=2)
        nobody_listed = await stats.load_near_limit(connection, today=TODAY, tiers=tiers, top=0)
        tomorrow = await stats.load_near_limit(connection, today=TODAY + timedelta(days=1), tiers=tiers)
    finally:
        await connection.close()
    assert near(top_two.users) == NEAR_LIMIT[:2]
    assert dict(top_two.by_tier) == dict(nobody_listed.by_tier) == NEAR_LIMIT_BY_TIER
    assert nobody_listed.users == ()
    assert tomorrow.users == () and set(tomorrow.by_tier.values()) == {0}


def test_near_means_at_most_a_fifth_of_the_limit_left_and_at_least_one() -> None:
    assert [stats.near_limit_from(limit) for limit in (1, 3, 5, 10, 12, 50)] == [0, 2, 4, 8, 10, 40]


async def run_cli(*argv: str) -> str:
    out = io.StringIO()
    code = await asyncio.to_thread(cli.main, list(argv), out)
    assert code == 0
    return out.getvalue()


async def test_the_cli_answers_in_text(ledger: Ledger) -> None:
    out = await run_cli("--target", ledger.target, "stats", "--days", "2")
    table = out.split("Daily exports by format\n")[1].split("\n\n")[0].splitlines()
    assert table[0].split() == ["date", "gif", "mp4", "webm", "total"]
    assert table[2].split() == [YESTERDAY.isoformat(), "yesterday", "1", "3", "1", "5"]
    assert table[3].split() == [TODAY.isoformat(), "today", "1", "36", "2", "39"]
    section = out.split("Near their daily limit today\n")[1].splitlines()
    assert section[0].split() == ["user", "tier", "used", "today", "limit", "left"]
    assert [line.split() for line in section[2:6]] == [
        ["fay", "team", "8", "10", "2"], ["ann", "free", "3", "3", "0"],
        ["ivy", "free", "3", "3", "0"], ["cat", "free", "2", "3", "1"],
    ]

    out = await run_cli("--target", ledger.target, "near-limit")
    lines = out.splitlines()
    assert lines[0].startswith(f"Near their daily limit today ({TODAY.isoformat()}, system-wide): 4 users")
    assert [line.split()[0] for line in lines[3:]] == ["fay", "ann", "ivy", "cat"]
    out = await run_cli("--target", ledger.target, "near-limit", "--project", "alpha")
    assert [line.split()[0] for line in out.splitlines()[3:]] == ["ann"]
    out = await run_cli("--target", ledger.target, "near-limit", "--user", "dan")
    assert out.strip() == f"Nobody is near their daily limit today ({TODAY.isoformat()}, user dan)."


async def test_the_cli_answers_in_json(ledger: Ledger) -> None:
    answer = json.loads(await run_cli("--target", ledger.target, "--json", "stats", "--days", "2"))
    yesterday = answer["daily"][0]
    assert yesterday["date"] == YESTERDAY.isoformat()
    assert {name: int(count) for name, count in yesterday["by_format"].items()} == YESTERDAY_BY_FORMAT
    assert [u["user_id"] for u in answer["near_limit"]] == [user for user, *_ in NEAR_LIMIT]

    listed = json.loads(await run_cli("--target", ledger.target, "near-limit", "--json"))
    assert [(u["user_id"], u["tier"], int(u["used_today"]), int(u["daily_limit"])) for u in listed] == NEAR_LIMIT
    assert json.loads(await run_cli("--target", ledger.target, "--json", "near-limit", "--user", "hal")) == []


def scrape_near_limit(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["tier"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "metering_users_near_limit"
        for sample in family.samples
    }


async def wait_gauge(port: int, wanted: dict[str, int]) -> dict[str, float]:
    """Each replica recounts the gauge (every 0.5 s in tests); scrape until it shows `wanted`. Series of tiers
    that other tests in this process configured are shown too, and must read 0."""
    deadline = time.monotonic() + 15
    expected = {tier: float(count) for tier, count in wanted.items()}
    while True:
        seen = await asyncio.to_thread(scrape_near_limit, port)
        others = {tier: value for tier, value in seen.items() if tier not in wanted}
        if {tier: seen.get(tier) for tier in wanted} == expected and not any(others.values()):
            return {tier: seen[tier] for tier in wanted}
        if time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.1)


async def test_the_gauge_counts_users_near_the_limit_by_tier(ledger: Ledger) -> None:
    assert await wait_gauge(ledger.metrics_port, NEAR_LIMIT_BY_TIER) == NEAR_LIMIT_BY_TIER
    ledger.clock.moment = at(TODAY + timedelta(days=1), 0)  # a new day: every count starts again
    everyone_clear = dict.fromkeys(NEAR_LIMIT_BY_TIER, 0)
    assert await wait_gauge(ledger.metrics_port, everyone_clear) == everyone_clear


def test_set_users_near_limit_resets_tiers_it_is_not_given() -> None:
    metrics.initialize_tiers(["free", "pro"])
    assert metrics.REGISTRY.get_sample_value("metering_users_near_limit", {"tier": "pro"}) is not None
    metrics.set_users_near_limit({"free": 4, "pro": 2})
    metrics.set_users_near_limit({"pro": 1})
    assert metrics.sample_value("metering_users_near_limit", {"tier": "free"}) == 0
    assert metrics.sample_value("metering_users_near_limit", {"tier": "pro"}) == 1
    with pytest.raises(ValueError, match="negative"):
        metrics.set_users_near_limit({"free": -1})
