"""`python -m metering.cli` against a real server: tables, the daily bar chart, JSON, errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import pytest

from exportapi.metering.v1 import metering_pb2 as pb
from metering import cli
from tests.support.metering import REPO_ROOT, metering_stub, reserve_request


async def run_cli(*argv: str) -> tuple[int, str]:
    """cli.main in a thread: it makes blocking calls, and the server runs on this event loop."""
    out = io.StringIO()
    code = await asyncio.to_thread(cli.main, list(argv), out)
    return code, out.getvalue()


@pytest.fixture
async def populated(metering_target: str) -> str:
    async with metering_stub(metering_target) as stub:
        first = await stub.CheckAndReserve(reserve_request("a", user="cleo", project="trailer", format="gif"))
        await stub.Complete(
            pb.CompleteRequest(
                export_id=first.export_id, outcome=pb.EXPORT_STATUS_COMPLETED, file_size_bytes=2_500_000,
                duration_seconds=9.5, render_seconds=3.2, output_uri="file:///tmp/a.gif",
            )
        )
        second = await stub.CheckAndReserve(reserve_request("b", user="cleo", project="teaser"))
        await stub.Complete(
            pb.CompleteRequest(export_id=second.export_id, outcome=pb.EXPORT_STATUS_FAILED, error="boom\nmore")
        )
        await stub.CheckAndReserve(reserve_request("c", user="cleo", project="trailer"))
        await stub.CheckAndReserve(reserve_request("d", user="dino", project="reel"))
    return metering_target


async def test_usage_prints_the_quota_in_words(populated: str) -> None:
    code, out = await run_cli("--target", populated, "usage", "cleo")
    assert code == 0
    assert "User cleo" in out
    assert "tier           free" in out
    assert "used today     2 of 3 (1 left)" in out
    assert "in flight      1" in out
    assert "longest video  30 s" in out
    assert "resets at" in out and "00:00:00 UTC" in out


async def test_history_lists_exports_newest_first(populated: str) -> None:
    code, out = await run_cli("--target", populated, "history", "cleo")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == [
        "created", "project", "status", "format", "mode", "length", "size", "render", "export", "id",
    ]
    rows = [line.split() for line in lines[2:5]]
    assert [row[3:6] for row in rows] == [
        ["trailer", "RESERVED", "mp4"], ["teaser", "FAILED", "mp4"], ["trailer", "COMPLETED", "gif"],
    ]
    assert "2.5 MB" in lines[4] and "3.2 s" in lines[4] and "9.5 s" in lines[4]
    assert any(line.strip().endswith(": boom") for line in lines[5:])
    code, only = await run_cli("--target", populated, "history", "cleo", "--project", "teaser", "--limit", "5")
    assert code == 0 and "teaser" in only and "trailer" not in only


async def test_stats_prints_tables_and_a_daily_bar_chart(populated: str) -> None:
    code, out = await run_cli("--target", populated, "stats", "--days", "7")
    assert code == 0
    assert "Exports system-wide" in out and "(7 days)" in out
    header, _, values = out.split("\n\n")[1].splitlines()
    assert header.split()[:5] == ["exports", "completed", "failed", "cancelled", "expired"]
    assert values.split()[:5] == ["4", "1", "1", "0", "0"]
    assert "50.0%" in values
    chart = out.split("Daily exports\n")[1].split("\n\n")[0].splitlines()
    assert len(chart) == 7
    assert chart[-1].endswith(" 4") and "█" * cli.BAR_WIDTH in chart[-1]
    assert all(line.rstrip().endswith(" 0") and "█" not in line for line in chart[:-1])
    users = out.split("Busiest users\n")[1]
    assert users.splitlines()[2].split()[:4] == ["cleo", "free", "3", "2/3"]
    code, one = await run_cli("--target", populated, "stats", "--user", "dino", "--days", "2")
    assert code == 0 and "Exports user dino" in one and "cleo" not in one


async def test_set_tier_moves_a_user_and_json_works_before_or_after_the_command(populated: str) -> None:
    code, out = await run_cli("--target", populated, "set-tier", "cleo", "pro")
    assert code == 0 and out.strip() == "cleo is now on the pro tier."
    code, before = await run_cli("--json", "--target", populated, "usage", "cleo")
    code_after, after = await run_cli("usage", "cleo", "--json", "--target", populated)
    assert code == code_after == 0
    usage = json.loads(before)
    assert (usage["tier"], usage["used"], usage["limit"], usage["remaining"]) == ("pro", "2", "50", "48")
    assert json.loads(after)["tier"] == "pro"
    code, stats = await run_cli("--target", populated, "--json", "stats", "--days", "3")
    parsed = json.loads(stats)
    assert code == 0 and parsed["total_exports"] == "4" and len(parsed["daily"]) == 3
    code, history = await run_cli("--target", populated, "history", "cleo", "--json", "--limit", "2")
    assert code == 0 and [e["idempotency_key"] for e in json.loads(history)] == ["c", "b"]


async def test_errors_are_one_line_and_a_nonzero_exit(
    populated: str, unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = await run_cli("--target", populated, "set-tier", "cleo", "platinum")
    assert code == 1
    assert "metering: INVALID_ARGUMENT: tier: unknown tier 'platinum'" in capsys.readouterr().err
    code, _ = await run_cli("--target", f"127.0.0.1:{unused_tcp_port}", "usage", "cleo")
    assert code == 3
    assert f"cannot reach metering at 127.0.0.1:{unused_tcp_port}" in capsys.readouterr().err
    # Out of range for the request's int32 field: a usage line naming the option, not a protobuf traceback.
    for command, option, value in (
        (["stats"], "--days", "3000000000"), (["stats"], "--days", "-1"), (["history", "cleo"], "--limit", "0")
    ):
        code, _ = await run_cli("--target", populated, *command, option, value)
        err = capsys.readouterr().err
        assert code == 2 and f"argument {option}: must be from" in err and "Traceback" not in err, err


async def test_python_dash_m_metering_cli_reads_metering_target(populated: str) -> None:
    env = {**os.environ, "METERING_TARGET": populated}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "metering.cli", "--json", "usage", "dino"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["used"] == "1"


def test_the_bar_chart_scales_to_the_busiest_day() -> None:
    chart = cli.bar_chart([("d1", 0), ("d2", 5), ("d3", 10), ("d4", 1)], width=20).splitlines()
    assert [line.count("█") for line in chart] == [0, 10, 20, 2]
    assert cli.bar_chart([("d1", 0)], width=5) == "  d1 │      0"
    assert cli.bar_chart([("d1", 1), ("d2", 1000)], width=10).splitlines()[0].count("█") == 1
