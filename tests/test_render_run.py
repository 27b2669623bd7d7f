"""run_ffmpeg: progress parsing, ffmpeg's error in RenderError, and stopping a process that will not stop."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from renderer.domain import RenderError
from renderer.ffmpeg_graph import ffmpeg_exe
from renderer.ffmpeg_run import FfmpegProgress, run_ffmpeg


async def test_progress_blocks_become_callbacks_ending_with_done() -> None:
    updates: list[FfmpegProgress] = []

    async def on_progress(update: FfmpegProgress) -> None:
        updates.append(update)

    args = [ffmpeg_exe(), "-f", "lavfi", "-i", "testsrc2=s=64x48:r=10:d=2", "-f", "null", "-"]
    await run_ffmpeg(args, on_progress=on_progress)
    assert updates[-1].done and updates[-1].frame == 20
    assert updates[-1].out_time_seconds == pytest.approx(2.0, abs=0.11)
    assert [u.frame for u in updates] == sorted(u.frame for u in updates)
    assert not any(u.done for u in updates[:-1])


async def test_a_failure_carries_ffmpegs_own_error() -> None:
    args = [ffmpeg_exe(), "-f", "lavfi", "-i", "no_such_source_filter", "-f", "null", "-"]
    with pytest.raises(RenderError) as caught:
        await run_ffmpeg(args)
    assert "no_such_source_filter" in str(caught.value) and "exit" in str(caught.value)


async def test_a_missing_binary_is_a_render_error(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="cannot start ffmpeg"):
        await run_ffmpeg([str(tmp_path / "no-ffmpeg-here")])


STUBBORN = """\
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stderr.write("x" * 200000 + " a very long line\\n")
sys.stdout.write("frame=3\\nout_time_us=300000\\nprogress=continue\\n")
sys.stdout.flush()
while True:  # ignores 'q' on stdin and SIGTERM: only SIGKILL ends it
    time.sleep(0.05)
"""


async def test_cancelling_escalates_to_sigkill_for_a_process_that_ignores_q_and_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "stubborn-ffmpeg"
    script.write_text(f"#!{sys.executable}\n{STUBBORN}")
    script.chmod(0o755)
    running = asyncio.Event()
    seen: list[FfmpegProgress] = []

    def on_progress(update: FfmpegProgress) -> None:
        seen.append(update)
        running.set()

    task = asyncio.create_task(
        run_ffmpeg([str(script)], on_progress=on_progress, stop_grace_seconds=0.3, terminate_grace_seconds=0.3)
    )
    await asyncio.wait_for(running.wait(), timeout=30)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, str(script))]
    assert len(pids) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not Path(f"/proc/{pids[0]}").exists()
    assert seen == [FfmpegProgress(frame=3, out_time_seconds=0.3, done=False)]


async def test_a_failing_progress_callback_stops_ffmpeg_and_propagates() -> None:
    def on_progress(update: FfmpegProgress) -> None:
        raise RuntimeError("listener gone")

    marker = "testsrc2=s=64x48:r=10:d=601.25"
    args = [ffmpeg_exe(), "-re", "-f", "lavfi", "-i", marker, "-f", "null", "-"]
    with pytest.raises(RuntimeError, match="listener gone"):
        await run_ffmpeg(args, on_progress=on_progress)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
