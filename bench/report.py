"""Printing the figures: a summary per piece as it finishes, and the README table from a results file."""

from __future__ import annotations

from typing import Any


def _check(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def _round_ratios(figures: dict[str, Any]) -> list[float]:
    return [measured["ratio_vs_noop"] for measured in figures.get("rounds", [])]


def _rounds_line(figures: dict[str, Any]) -> list[str]:
    ratios = _round_ratios(figures)
    if len(ratios) < 2:
        return []
    return [
        f"    rounds of no-op then service, back to back: ratio {', '.join(f'{ratio:.3f}' for ratio in ratios)}"
        " (the median round is the one reported)"
    ]


def _ratio_cell(figures: dict[str, Any]) -> str:
    ratios = _round_ratios(figures)
    spread = f" (rounds {min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
    return f"{figures['ratio_vs_noop']}{spread}"


def _shape_lines(shape: str, figures: dict[str, Any], targets: dict[str, float]) -> list[str]:
    service, noop, pgbench, open_loop = (figures[key] for key in ("service", "noop", "pgbench", "open_loop"))
    ratio = figures["ratio_vs_noop"]
    p99 = open_loop["p99_ms"]
    errors = {**service["errors"], **open_loop["errors"]}
    lines = [
        f"  {shape}: service {service['pairs_per_second']:.0f} pairs/s (p50 {service['p50_ms']:.1f} ms, "
        f"p99 {service['p99_ms']:.1f} ms at {service['in_flight']} in flight; server CPU "
        f"{service['server_cpu_cores']:.2f} cores of {service.get('machine_busy_cores', 0):.2f} busy)",
        f"    CPU per pair: server {service.get('server_cpu_ms_per_pair', 0):.2f} ms, PostgreSQL "
        f"{service.get('postgres_cpu_ms_per_pair', 0):.2f} ms, clients {service.get('other_cpu_ms_per_pair', 0):.2f}"
        f" ms (no-op: server {noop.get('server_cpu_ms_per_pair', 0):.2f} ms, clients "
        f"{noop.get('other_cpu_ms_per_pair', 0):.2f} ms)",
        f"    no-op server {noop['pairs_per_second']:.0f} pairs/s -> ratio {ratio} "
        f"(target >= {targets['ratio_vs_noop']}: {_check(ratio is not None and ratio >= targets['ratio_vs_noop'])})",
        *_rounds_line(figures),
        f"    pgbench same SQL ({pgbench['clients']} connections) {pgbench['pairs_per_second']:.0f} pairs/s "
        f"-> ratio {figures['ratio_vs_pgbench']}",
        f"    open loop at {open_loop['rate']:.0f} pairs/s (half the maximum): p50 {open_loop['p50_ms']:.1f} ms, "
        f"p99 {p99:.1f} ms (target <= {targets['open_loop_p99_ms']:.0f}: "
        f"{_check(p99 <= targets['open_loop_p99_ms'] and not open_loop['dropped'])})",
    ]
    ledger = figures.get("ledger")
    if ledger is not None:
        lines.append(
            f"    ledger after the runs: {ledger['exports']} exports, counters and rollups "
            + ("consistent" if ledger["consistent"] else f"INCONSISTENT {ledger['mismatching_rows']}")
        )
    if errors or open_loop["dropped"]:
        lines.append(f"    errors {errors}, dropped {open_loop['dropped']}")
    return lines


def summary(piece: str, figures: dict[str, Any]) -> str:
    if piece == "metering":
        lines = ["metering: CheckAndReserve + Complete pairs"]
        for shape in ("spread", "hot"):
            if shape in figures:
                lines += _shape_lines(shape, figures[shape], figures["targets"])
        return "\n".join(lines)
    if piece == "stats":
        sizes = figures["settings"]["sizes"]
        small, large = figures[str(sizes[0])], figures[str(sizes[1])]
        target = figures["target_ratio"]
        return "\n".join(
            [
                f"stats: GetStats p50 at {sizes[0]:,} vs {sizes[1]:,} exports "
                f"(seeded in {small['seed']['seconds']} s / {large['seed']['seconds']} s)",
                f"  one user:    {small['user']['p50_ms']:.1f} ms vs {large['user']['p50_ms']:.1f} ms -> ratio "
                f"{figures['ratio_user']} (target <= {target}: {_check(figures['ratio_user'] <= target)})",
                f"  system-wide: {small['system']['p50_ms']:.1f} ms vs {large['system']['p50_ms']:.1f} ms -> ratio "
                f"{figures['ratio_system']} (target <= {target}: {_check(figures['ratio_system'] <= target)})",
            ]
        )
    if piece == "render":
        targets = figures["targets"]
        return "\n".join(
            [
                f"render: {figures['settings']['width']}x{figures['settings']['height']} "
                f"{figures['settings']['seconds']} s mp4, median of {figures['settings']['repetitions']}",
                f"  job {figures['job_median_s']:.3f} s vs raw ffmpeg {figures['raw_ffmpeg_median_s']:.3f} s -> "
                f"ratio {figures['ratio']} (target <= {targets['ratio']}: "
                f"{_check(figures['ratio'] <= targets['ratio'])})",
                f"  metering per render {figures['metering_ms_per_render']:.1f} ms (reserve {figures['reserve_ms']:.1f}"
                f" + completion {figures['complete_ms']:.1f}; target <= {targets['metering_ms_per_render']:.0f}: "
                f"{_check(figures['metering_ms_per_render'] <= targets['metering_ms_per_render'])})",
                *_resource_lines(figures.get("resources")),
            ]
        )
    if piece == "lambda":
        settings = figures["settings"]
        return (
            f"lambda: {settings['seconds']} s mp4 in {settings['chunks']} chunks {figures['fan_out_median_s']:.2f} s"
            f" vs one invocation {figures['single_median_s']:.2f} s -> speedup {figures['speedup']}"
        )
    return f"{piece}: {figures}"


def _resource_lines(resources: dict[str, float] | None) -> list[str]:
    if not resources:
        return []
    return [
        f"  one render's ffmpeg: {resources['ffmpeg_cpu_cores']:.2f} cores,"
        f" peak {resources['ffmpeg_peak_rss_mib']:.0f} MiB;"
        f" peaks: job runner process {resources['job_runner_process_peak_rss_mib']:.0f} MiB,"
        f" metering {resources['metering_peak_rss_mib']:.0f} MiB",
        *(
            f"  {fmt} at {figures['width']}x{figures['height']}: {figures['cpu_cores']:.2f} cores, "
            f"peak {figures['peak_rss_mib']:.0f} MiB"
            for fmt, figures in resources.get("largest_frame", {}).items()
        ),
    ]


def markdown_table(results: dict[str, Any]) -> str:
    """The README's table of the latest figures (one row per figure, its baseline and the ratio)."""
    rows = ["| figure | measured | baseline | ratio | target |", "| --- | --- | --- | --- | --- |"]
    metering = results.get("metering")
    if metering:
        for shape in ("spread", "hot"):
            if shape not in metering:
                continue
            figures = metering[shape]
            service, noop, pgbench, open_loop = (
                figures[key] for key in ("service", "noop", "pgbench", "open_loop")
            )
            rows.append(
                f"| metering pairs/s, {shape} | {service['pairs_per_second']:.0f} | no-op gRPC "
                f"{noop['pairs_per_second']:.0f} | {_ratio_cell(figures)} | >= 0.6 |"
            )
            rows.append(
                f"| metering pairs/s, {shape} | {service['pairs_per_second']:.0f} | pgbench same SQL "
                f"{pgbench['pairs_per_second']:.0f} | {figures['ratio_vs_pgbench']} | |"
            )
            if "postgres_cpu_ms_per_pair" in service and "server_cpu_ms_per_pair" in noop:
                rows.append(
                    f"| CPU per pair at saturation, {shape}: server / PostgreSQL / clients | "
                    f"{service['server_cpu_ms_per_pair']:.2f} / {service['postgres_cpu_ms_per_pair']:.2f} / "
                    f"{service['other_cpu_ms_per_pair']:.2f} ms | no-op {noop['server_cpu_ms_per_pair']:.2f} / - / "
                    f"{noop['other_cpu_ms_per_pair']:.2f} ms | | reported |"
                )
            rows.append(
                f"| pair p50 / p99 at saturation ({service['in_flight']} in flight), {shape} | "
                f"{service['p50_ms']:.1f} / {service['p99_ms']:.1f} ms | queueing {figures['queueing_latency_ms']} ms"
                " | | reported |"
            )
            rows.append(
                f"| pair p99, open loop at {open_loop['rate']:.0f}/s, {shape} | {open_loop['p99_ms']:.1f} ms "
                f"(p50 {open_loop['p50_ms']:.1f}) | | | <= 25 ms |"
            )
    stats = results.get("stats")
    if stats:
        small, large = stats["settings"]["sizes"]
        for scope, key in (("one user", "user"), ("system-wide", "system")):
            rows.append(
                f"| GetStats p50, {scope}, {large:,} exports | {stats[str(large)][key]['p50_ms']:.1f} ms | "
                f"{small:,} exports {stats[str(small)][key]['p50_ms']:.1f} ms | {stats[f'ratio_{key}']} | <= 1.5 |"
            )
    render = results.get("render")
    if render:
        rows.append(
            f"| render job wall, {render['settings']['width']}x{render['settings']['height']} "
            f"{render['settings']['seconds']:g} s mp4 | {render['job_median_s']:.2f} s | raw ffmpeg "
            f"{render['raw_ffmpeg_median_s']:.2f} s | {render['ratio']} | <= 1.05 |"
        )
        rows.append(
            f"| metering overhead per render | {render['metering_ms_per_render']:.1f} ms | | | <= 10 ms |"
        )
    lam = results.get("lambda")
    if lam:
        rows.append(
            f"| lambda_local {lam['settings']['seconds']:g} s mp4 in {lam['settings']['chunks']} chunks | "
            f"{lam['fan_out_median_s']:.2f} s | one invocation {lam['single_median_s']:.2f} s | "
            f"speedup {lam['speedup']} | reported |"
        )
    lines = ["\n".join(rows), ""]
    for piece in ("metering", "stats", "render", "lambda"):
        figures = results.get(piece)
        if not figures or "machine" not in figures:
            continue
        load = " ".join(f"{value:.2f}" for value in figures.get("load_average_before", []))
        lines.append(
            f"- {piece}: `{figures.get('command', 'python -m bench')}`, finished {figures.get('measured_at', '?')}, "
            f"{figures['machine']['cores']} cores ({figures['machine']['cpu_model']}), load average {load} before"
        )
    return "\n".join(lines)
