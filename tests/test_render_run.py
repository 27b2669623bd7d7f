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


# Like the deadlocked ffmpeg: one progress block with the same values every period, nothing else, no CPU.
STALLED = """\
import sys, time
while True:
    sys.stdout.write("frame=4\\nout_time_us=400000\\nspeed=0.2x\\nprogress=continue\\n")
    sys.stdout.flush()
    time.sleep(0.1)
"""

# Busy without output for a while (a generator skipping to a far offset), then done.
BUSY_THEN_DONE = """\
import sys, time
deadline = time.monotonic() + float(sys.argv[-1])
while time.monotonic() < deadline:
    sum(range(10000))
sys.stdout.write("frame=10\\nout_time_us=1000000\\nprogress=end\\n")
"""

# Talking on stderr only, sleeping in between, then done.
CHATTY_THEN_DONE = """\
import sys, time
for i in range(int(sys.argv[-1])):
    sys.stderr.write(f"still working {i}\\n")
    sys.stderr.flush()
    time.sleep(0.1)
sys.stdout.write("frame=10\\nout_time_us=1000000\\nprogress=end\\n")
"""


def _fake_ffmpeg(tmp_path: Path, name: str, body: str) -> str:
    script = tmp_path / name
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    return str(script)


async def test_a_stalled_ffmpeg_is_stopped_and_the_run_fails(tmp_path: Path) -> None:
    script = _fake_ffmpeg(tmp_path, "stalled-ffmpeg", STALLED)
    seen: list[FfmpegProgress] = []
    run = run_ffmpeg(
        [script], on_progress=seen.append, stall_seconds=0.5, stop_grace_seconds=0.3, terminate_grace_seconds=0.3
    )
    with pytest.raises(RenderError, match=r"ffmpeg stalled: no progress for 0\.5 s"):
        await asyncio.wait_for(run, timeout=30)
    assert len(seen) > 1  # the repeated blocks arrived and were not taken for progress
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, script)]


@pytest.mark.parametrize(("body", "arg"), [(BUSY_THEN_DONE, "2.0"), (CHATTY_THEN_DONE, "20")], ids=["cpu", "stderr"])
async def test_cpu_use_or_stderr_output_is_not_a_stall(tmp_path: Path, body: str, arg: str) -> None:
    """Quiet on stdout for four stall periods, but alive: it must run to the end."""
    script = _fake_ffmpeg(tmp_path, "alive-ffmpeg", body)
    seen: list[FfmpegProgress] = []
    await asyncio.wait_for(run_ffmpeg([script, arg], on_progress=seen.append, stall_seconds=0.5), timeout=30)
    assert seen == [FfmpegProgress(frame=10, out_time_seconds=1.0, done=True)]


# Five frames, quickly, then done.
QUICK = """\
import sys
for frame in range(1, 6):
    sys.stdout.write(f"frame={frame}\\nout_time_us={frame * 100000}\\nprogress=continue\\n")
sys.stdout.write("frame=5\\nout_time_us=500000\\nprogress=end\\n")
"""


async def test_time_in_a_slow_progress_callback_is_not_ffmpegs_stall(tmp_path: Path) -> None:
    """ffmpeg waits while we do not read its progress: our callback's time is ours, not a stall."""
    script = _fake_ffmpeg(tmp_path, "quick-ffmpeg", QUICK)
    seen: list[int] = []

    async def slow(update: FfmpegProgress) -> None:
        await asyncio.sleep(0.4)
        seen.append(update.frame)

    await asyncio.wait_for(run_ffmpeg([script], on_progress=slow, stall_seconds=0.3), timeout=30)
    assert seen == [1, 2, 3, 4, 5, 5]


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
