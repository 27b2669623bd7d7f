"""`python -m bench`: every benchmark, or the ones picked, each against its own baseline in the same run.

    python -m bench                      # all four pieces (a few minutes), writes bench/results/latest.json
    python -m bench --quick              # a smoke run of everything in well under a minute (quick.json)
    python -m bench --metering --shape hot
    python -m bench --metering --profile # py-spy on the metering server meanwhile (bench/results/profile/)
    python -m bench --table              # the README table from the latest results, nothing run

Results of the pieces run replace those pieces in the results file; pieces not run keep their last figures.
"""

from __future__ import annotations

import os

# Before anything imports grpc: pgserver and ffmpeg fork, and gRPC's fork handlers are not safe for that.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import json
import logging
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.machine import describe, load_average, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PIECES = ("metering", "stats", "render", "lambda")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run, not figures")
    for piece in PIECES:
        parser.add_argument(f"--{piece}", action="store_true", help=f"run the {piece} benchmark")
    parser.add_argument("--shape", choices=("spread", "hot"), action="append",
                        help="metering: only this shape of load (repeatable)")
    parser.add_argument("--seconds", type=float, help="metering: seconds measured per run")
    parser.add_argument("--rounds", type=int, help="metering: rounds of no-op then service run (default 3)")
    parser.add_argument("--profile", action="store_true", help="metering: record the server with py-spy")
    parser.add_argument("--output", type=Path, help="results file (latest.json, or quick.json with --quick)")
    parser.add_argument("--table", action="store_true", help="print the README table of the results file")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[str]:
    chosen = [piece for piece in PIECES if getattr(args, piece)]
    return chosen or list(PIECES)


def results_path(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output
    return RESULTS_DIR / ("quick.json" if args.quick else "latest.json")


def load_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def run_pieces(args: argparse.Namespace, pieces: list[str], pg: Any) -> dict[str, Any]:
    from bench.lambda_bench import LambdaSettings, run_lambda
    from bench.metering_bench import MeteringSettings, run_metering
    from bench.render_bench import RenderSettings, run_render
    from bench.stats_bench import StatsSettings, run_stats

    out: dict[str, Any] = {}
    for piece in pieces:
        print(f"\n== {piece} ==", flush=True)
        load_before = load_average()
        started = time.monotonic()
        if piece == "metering":
            changes: dict[str, Any] = {}
            if args.shape:
                changes["shapes"] = tuple(dict.fromkeys(args.shape))
            if args.seconds:
                changes["seconds"] = args.seconds
            if args.rounds:
                changes["rounds"] = args.rounds
            if args.profile:
                changes["profile_dir"] = RESULTS_DIR / "profile"
            settings = MeteringSettings.quick(**changes) if args.quick else MeteringSettings(**changes)
            figures = await run_metering(pg, settings)
        elif piece == "stats":
            figures = await run_stats(pg, StatsSettings.quick() if args.quick else StatsSettings())
        elif piece == "render":
            figures = await run_render(pg, RenderSettings.quick() if args.quick else RenderSettings())
        else:
            figures = await run_lambda(pg, LambdaSettings.quick() if args.quick else LambdaSettings())
        figures["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        figures["wall_seconds"] = round(time.monotonic() - started, 1)
        figures["load_average_before"] = load_before
        figures["load_average_after"] = load_average()
        out[piece] = figures
        print(report.summary(piece, figures), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = results_path(args)
    if args.table:
        print(report.markdown_table(load_results(path)))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    pieces = selected(args)
    machine = machine_info()
    command = "python -m bench " + " ".join(shlex.quote(arg) for arg in (argv or sys.argv[1:]))
    print(f"machine: {describe(machine)}")
    if machine["load_average"] and machine["load_average"][0] > 1.5:
        print("warning: load average above 1.5 - other work is running; figures will be noisy")
    print(f"running: {', '.join(pieces)}{' (quick)' if args.quick else ''}", flush=True)

    from bench.database import BenchPostgres

    pg = BenchPostgres.start()  # before any gRPC object exists in this process

    async def run() -> dict[str, Any]:
        try:
            info = {"version": await pg.server_version(), "settings": await pg.settings(),
                    "embedded": pg.embedded is not None}
            pieces_out = await run_pieces(args, pieces, pg)
            return {"postgres": info, "pieces": pieces_out}
        finally:
            await pg.close()

    outcome = asyncio.run(run())
    results = load_results(path)
    results.update(
        {"machine": machine, "command": command.strip(), "quick": args.quick, "postgres": outcome["postgres"],
         "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    )
    for piece, figures in outcome["pieces"].items():
        figures["machine"] = machine
        figures["command"] = command.strip()
        results[piece] = figures
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
