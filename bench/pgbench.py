"""The database ceiling: pgbench running the SQL metering runs for one pair (reserve + complete), statement
for statement, with the same connection count as metering's pool.

The statements come from metering/queries.sql by name, so an edited query is benchmarked as it now reads;
the ORDER and choice of statements below mirror `MeteringCore._reserve` and `MeteringCore._complete` (the
non-replay path, outcome COMPLETED) and must follow them when the core changes.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.database import Libpq, find_pgbench
from bench.load import percentile
from metering import stats
from metering.sql import QUERIES

USER_SPREAD = "('user-' || :u::text)"
USER_HOT = "'hot-user'"
KEY = "('pgbench-' || :k::text)"
DAY = "current_date"
NOW = "now()"
FORMAT = "'mp4'"
MODE = "'local'"
RENDER_BUCKET = str(stats.render_time_bucket(1.5))
# The bench's tier table (bench/services.py: BENCH_TIERS), as metering passes it to `reserve`.
TIER_NAMES = "ARRAY['free', 'pro', 'unlimited']"
TIER_DAILY = "ARRAY[1000000000, 50, NULL]::bigint[]"
TIER_SECONDS = "ARRAY[3600, 120, NULL]::double precision[]"
TIER_PROJECT = "ARRAY[NULL, NULL, NULL]::bigint[]"


Step = tuple[str, list[str], bool] | str  # (query name, its arguments, \\gset?) or a pgbench meta-command


def _statements(user: str) -> tuple[list[Step], list[Step]]:
    project = f"({user} || '-p' || :p::text)"
    reserve_args = [user, DAY, project, KEY, "gen_random_uuid()", "'fingerprint'", MODE, FORMAT, "'1280x720'",
                    "10.0", NOW, "now() + interval '120 seconds'", TIER_NAMES, TIER_DAILY, TIER_SECONDS,
                    TIER_PROJECT, "'free'"]
    reserve = [
        ("reserve", reserve_args, True),
        "\\if :new_day",
        ("ensure_usage_rows", [user, DAY, project], False),
        ("reserve", reserve_args, True),
        "\\endif",
    ]
    complete = [
        (
            "complete",
            [":export_id", "'COMPLETED'", "NULL", "1000000", "10.0", "'file:///renders/x.mp4'", "1.5", NOW,
             RENDER_BUCKET],
            False,
        ),
    ]
    return reserve, complete


def _bind(sql: str, args: list[str]) -> str:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return re.sub(r"\$(\d+)", lambda match: f"({args[int(match.group(1)) - 1]})", body).rstrip().rstrip(";")


def script(shape: str, users: int = 10_000) -> str:
    """One pgbench transaction = one pair: the reservation's statement(s), then the completion's."""
    user = USER_HOT if shape == "hot" else USER_SPREAD
    reserve, complete = _statements(user)
    lines = [
        f"\\set u random(0, {users - 1})",
        "\\set p random(0, 2)",
        "\\set k random(1, 4611686018427387903)",
    ]
    for step in [*reserve, *complete]:
        if isinstance(step, str):
            lines.append(step)
        else:
            name, args, gset = step
            lines.append(_bind(QUERIES[name], args) + (" \\gset" if gset else ";"))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    pairs_per_second: float
    pairs: int
    failed: int
    p50_ms: float
    p99_ms: float
    clients: int
    seconds: float
    pgbench: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pgbench(dsn: str, *, shape: str, clients: int, seconds: float, users: int = 10_000) -> PgbenchResult:
    binary = find_pgbench()
    if binary is None:
        raise RuntimeError("pgbench not found: run bench/ensure_pgbench.sh (or set BENCH_PGBENCH)")
    libpq = Libpq.parse(dsn)
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as work:
        script_path = Path(work) / f"pair-{shape}.sql"
        script_path.write_text(script(shape, users))
        args = [
            binary, "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
            "-T", str(max(1, round(seconds))), "-f", str(script_path),
            "--log", f"--log-prefix={work}/tx", *libpq.args(),
        ]
        done = subprocess.run(args, capture_output=True, text=True, env=libpq.env(), cwd=work, check=False)
        if done.returncode not in (0, 2) or "tps = " not in done.stdout:
            raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        latencies: list[float] = []
        failed = 0
        for log in Path(work).glob("tx*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2] in ("failed", "serialization", "deadlock"):
                    failed += 1
                    continue
                latencies.append(int(fields[2]) / 1e6)
    tps = float(re.search(r"tps = ([0-9.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    latencies.sort()
    return PgbenchResult(
        pairs_per_second=tps,
        pairs=len(latencies),
        failed=failed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        clients=clients,
        seconds=seconds,
        pgbench=done.stdout.splitlines()[0] if done.stdout else binary,
    )
