"""A short soak in every test run: ~25 s of mixed traffic against two metering replicas while replicas are
SIGKILLed, SIGTERMed and the database is cut, then the ledger is checked (bench/soak.py; a long run is
`python -m bench.soak --seconds 180`)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.soak import FAULT_KINDS, SoakConfig, run_soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "25"))
SOAK_SEED = int(os.environ.get("SOAK_SEED", "1"))


async def test_a_short_soak_with_faults_loses_nothing_and_keeps_every_invariant(
    database_url: str, tmp_path: Path
) -> None:
    config = SoakConfig(seconds=SOAK_SECONDS, seed=SOAK_SEED, workers=6, think_seconds=0.008)
    summary = await run_soak(database_url, config, log_dir=tmp_path)

    assert summary["lost"] == 0, summary["problems"]
    assert summary["invariant_violations"] == 0, summary["problems"]
    assert all(summary["faults"][kind] >= 1 for kind in FAULT_KINDS), summary["fault_log"]
    assert all(summary["operations"].get(kind, 0) > 0 for kind in ("reserve", "complete", "fail", "cancel", "extend"))
    assert summary["answers"]["UNAVAILABLE"] > 0  # the faults were felt...
    assert summary["acknowledged"] > 100  # ...between plenty of work
    assert {"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"} <= set(summary["ledger"])
    assert "RESERVED" not in summary["ledger"]  # every lease ran out and was reaped
