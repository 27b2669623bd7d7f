"""RENDER_OUTPUT_DIR over time: a killed render's partial file goes at the next start, and finished renders go
after RENDER_OUTPUT_RETENTION_HOURS when it is set; nothing else in the folder is touched."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from renderer import retention
from renderer.config import ConfigError, RendererConfig
from tests.support.renderer import start_renderer

EXPORT_ID = "7f1c3a5e-8a3b-4c1d-9e2f-0a1b2c3d4e5f"


def touch(path: Path, hours_ago: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    moment = time.time() - hours_ago * 3600
    os.utime(path, (moment, moment))
    return path


def names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_killed_renders_partial_file_goes_at_the_next_start_and_nothing_else(
    metering_target: str, tmp_path: Path
) -> None:
    renders = tmp_path / "renders"
    touch(renders / f".{EXPORT_ID}.0a1b2c3d.partial.mp4", hours_ago=1)
    fresh_partial = ".0b9e2c1d-1111-4c1d-9e2f-0a1b2c3d4e5f.0a1b2c3e.partial.mp4"
    touch(renders / fresh_partial)  # written to just now: maybe another renderer's, sharing the folder
    kept = {
        fresh_partial,
        f"{EXPORT_ID}.mp4",  # a finished render: retention is off by default
        "README.partial.mp4",  # not a name the renderer gives
        ".other.partial",
        "notes.txt",
    }
    for name in kept - {fresh_partial}:
        touch(renders / name, hours_ago=24 * 365)
    async with start_renderer(metering_target, tmp_path):
        assert names(renders) == kept


async def test_finished_renders_older_than_the_retention_are_removed_while_the_renderer_runs(
    metering_target: str, tmp_path: Path
) -> None:
    renders = tmp_path / "renders"
    old = touch(renders / f"{EXPORT_ID}.webm", hours_ago=3)
    fresh = touch(renders / "0b9e2c1d-1111-4c1d-9e2f-0a1b2c3d4e5f.gif", hours_ago=1)
    unrelated = touch(renders / "keep-me.txt", hours_ago=3)
    elsewhere = touch(tmp_path / "elsewhere" / "a1.mp4", hours_ago=3)
    (renders / "b2.mp4").symlink_to(elsewhere)  # a link is not a render: neither it nor its target goes
    os.utime(renders / "b2.mp4", (time.time() - 3 * 3600,) * 2, follow_symlinks=False)
    async with start_renderer(metering_target, tmp_path, RENDER_OUTPUT_RETENTION_HOURS="2"):
        await until(lambda: not old.exists())
        assert fresh.exists() and unrelated.exists() and elsewhere.exists() and (renders / "b2.mp4").is_symlink()


def test_remove_expired_counts_what_it_removed(tmp_path: Path) -> None:
    touch(tmp_path / "a.mp4", hours_ago=5)
    touch(tmp_path / "b.mp4", hours_ago=1)
    assert retention.remove_expired(tmp_path, retention_seconds=2 * 3600) == 1
    assert names(tmp_path) == {"b.mp4"}
    assert retention.remove_expired(tmp_path / "absent", retention_seconds=1) == 0
    assert retention.remove_partials(tmp_path / "absent", untouched_seconds=1) == 0


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_a_bad_retention_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="RENDER_OUTPUT_RETENTION_HOURS"):
        RendererConfig.from_env({"RENDER_OUTPUT_RETENTION_HOURS": value})


def test_renders_are_kept_unless_a_retention_is_set() -> None:
    assert RendererConfig.from_env({}).output_retention_hours == 0
    assert RendererConfig.from_env({"RENDER_OUTPUT_RETENTION_HOURS": "0.5"}).output_retention_hours == 0.5
