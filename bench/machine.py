"""What the figures were measured on: cores, CPU model, load, versions."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gib = 0.0
    return {
        "cores": os.cpu_count() or 1,
        "cpu_model": cpu_model(),
        "memory_gib": memory_gib,
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def describe(info: dict[str, Any]) -> str:
    load = " ".join(f"{value:.2f}" for value in info.get("load_average", []))
    return (
        f"{info['cores']} cores, {info['cpu_model']}, {info['memory_gib']} GiB, "
        f"Python {info['python']}, load average {load}"
    )


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's resident-set high-water mark (VmHWM, Linux), MiB; 0 when unreadable."""
    try:
        for line in open(f"/proc/{pid}/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
