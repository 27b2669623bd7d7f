"""`python -m bench --quick` end to end: every piece runs against real servers and reports the figures, the
machine and the ratios in the shape the README table and the reports read. Speed is not checked here (that is
what the benchmarks themselves are for), only that the harness works and that its load got no errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import report

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_bench(pg_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCH_DATABASE_URL": pg_dsn}
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _is_ratio(value: object) -> bool:
    return isinstance(value, float) and value > 0


def test_quick_run_reports_every_piece_with_machine_and_ratios(pg_dsn: str, tmp_path: Path) -> None:
    output = tmp_path / "quick.json"
    done = _run_bench(
        pg_dsn, "--quick", "--shape", "spread", "--seconds", "0.5", "--rounds", "2", "--output", str(output)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    printed = done.stdout
    assert printed.startswith("machine: ") and " cores, " in printed.splitlines()[0]
    for heading in ("== metering ==", "== stats ==", "== render ==", "== lambda =="):
        assert heading in printed
    assert "no-op server" in printed and "pgbench same SQL" in printed and "open loop at" in printed
    assert "rounds of no-op then service" in printed

    results = json.loads(output.read_text())
    assert results["quick"] is True
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu_model"]

    metering = results["metering"]
    assert "hot" not in metering  # --shape spread picked one shape
    spread = metering["spread"]
    for baseline in ("service", "noop", "open_loop"):
        run = spread[baseline]
        assert run["pairs"] > 0 and run["pairs_per_second"] > 0, baseline
        assert run["errors"] == {} and run["dropped"] == 0, (baseline, run["errors"], run["dropped"])
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], baseline
    assert spread["pgbench"]["pairs_per_second"] > 0 and spread["pgbench"]["failed"] == 0
    assert _is_ratio(spread["ratio_vs_noop"]) and _is_ratio(spread["ratio_vs_pgbench"])
    # Each round is a no-op run and a service run back to back; the reported ratio is the lower-middle round's.
    round_ratios = sorted(measured["ratio_vs_noop"] for measured in spread["rounds"])
    assert len(round_ratios) == 2 and spread["ratio_vs_noop"] == round_ratios[0]
    assert spread["service"]["pairs_per_second"] in [m["service_pairs_per_second"] for m in spread["rounds"]]
    assert spread["open_loop"]["rate"] > 0
    # Under 64 calls in flight, every counter and rollup still agrees with the ledger, row for row.
    assert spread["ledger"]["consistent"], spread["ledger"]
    assert spread["ledger"]["exports"] >= spread["service"]["pairs"] + spread["open_loop"]["pairs"]

    stats = results["stats"]
    small, large = stats["settings"]["sizes"]
    assert stats[str(large)]["seed"]["rows"]["exports"] == large
    assert stats[str(small)]["seed"]["rows"]["exports"] == small
    assert _is_ratio(stats["ratio_user"]) and _is_ratio(stats["ratio_system"])

    render = results["render"]
    assert _is_ratio(render["ratio"]) and render["metering_ms_per_render"] > 0
    assert len(render["job_s"]) == len(render["raw_ffmpeg_s"]) == render["settings"]["repetitions"]

    lam = results["lambda"]
    assert _is_ratio(lam["speedup"])
    assert lam["lambda_local_stats"]["function_errors"] == 0

    for piece in ("metering", "stats", "render", "lambda"):
        assert results[piece]["machine"]["cores"] >= 1 and results[piece]["load_average_before"]

    table = report.markdown_table(results)
    assert table.startswith("| figure | measured | baseline | ratio | target |")
    assert "no-op gRPC" in table and "GetStats p50" in table and "raw ffmpeg" in table and "chunks" in table
