"""The renderer's completion outbox on a real SQLite file. Metering is a stand-in here (a `deliver` function that
can hang, fail or refuse), because what is checked is what the outbox keeps on disk around each answer; the
metered path with the real metering service is in test_metered_path.py and test_renderer_service.py."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from renderer.metering_port import Completion, MeteringRejected, MeteringUnavailable, Outcome
from renderer.outbox import Outbox


def completion(export_id: str = "e-1") -> Completion:
    return Completion(
        export_id=export_id,
        outcome=Outcome.COMPLETED,
        file_size_bytes=1234,
        duration_seconds=2.0,
        output_uri=f"file:///renders/{export_id}.mp4",
        render_seconds=1.5,
    )


def rows_on_disk(path: Path) -> list[str]:
    with sqlite3.connect(path) as other:
        return [row[0] for row in other.execute("SELECT export_id FROM pending_completions ORDER BY export_id")]


async def until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class StandInMetering:
    """Records what it was given; `answers` says what each call does in turn (None: acknowledge)."""

    def __init__(self, *answers: Exception | asyncio.Event | None) -> None:
        self.answers = list(answers)
        self.delivered: list[Completion] = []
        self.calls = 0

    async def deliver(self, item: Completion) -> None:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, asyncio.Event):
            await answer.wait()
        elif isinstance(answer, Exception):
            raise answer
        self.delivered.append(item)


def refused(permanent: bool) -> MeteringRejected:
    return MeteringRejected("no", status=None, code_name="FAILED_PRECONDITION", permanent=permanent)


async def test_a_completion_is_on_disk_while_its_first_delivery_hangs_and_arrives_after_a_crash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    hanging = StandInMetering(asyncio.Event())  # never set: metering never answers this process
    first = Outbox(path, hanging.deliver)
    submitting = asyncio.create_task(first.submit(completion()))
    await until(lambda: rows_on_disk(path) == ["e-1"])  # durable, though the delivery has not returned
    assert hanging.calls == 1
    submitting.cancel()  # the process dies here: no close, no acknowledgement
    with pytest.raises(asyncio.CancelledError):
        await submitting

    metering = StandInMetering()
    second = Outbox(path, metering.deliver, base_backoff_seconds=0.01)
    second.start()
    try:
        await until(lambda: second.depth() == 0)
    finally:
        await second.close()
    assert metering.delivered == [completion()]
    assert rows_on_disk(path) == []


async def test_an_acknowledged_completion_is_gone_at_once_and_from_disk_after_close(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    metering = StandInMetering()
    outbox = Outbox(path, metering.deliver)
    outbox.start()
    assert await outbox.submit(completion("e-1")) is True
    assert await outbox.submit(completion("e-2")) is True
    assert outbox.depth() == 0  # acknowledged, even while the rows' deletion is still under way
    await outbox.close()
    assert rows_on_disk(path) == []
    assert [item.export_id for item in metering.delivered] == ["e-1", "e-2"]  # each once


async def test_a_failed_delivery_is_kept_and_retried_until_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    metering = StandInMetering(MeteringUnavailable("down"), refused(permanent=False), None)
    outbox = Outbox(path, metering.deliver, base_backoff_seconds=0.01, max_backoff_seconds=0.05)
    outbox.start()
    try:
        assert await outbox.submit(completion()) is False
        assert outbox.depth() == 1
        await until(lambda: outbox.depth() == 0)
    finally:
        await outbox.close()
    assert metering.calls == 3
    assert metering.delivered == [completion()]
    assert rows_on_disk(path) == []


async def test_a_completion_refused_for_good_becomes_a_dead_letter(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", StandInMetering(refused(permanent=True)).deliver)
    outbox.start()
    try:
        assert await outbox.submit(completion()) is False
        assert outbox.depth() == 0
        assert outbox.dead_letters() == [("e-1", "no")]
    finally:
        await outbox.close()


async def test_a_completion_that_cannot_be_written_counts_if_metering_acknowledged_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metering = StandInMetering()
    outbox = Outbox(tmp_path / "outbox.sqlite3", metering.deliver)
    outbox._db.execute("PRAGMA query_only = ON")  # every write fails, as on a full or read-only disk
    with caplog.at_level(logging.WARNING):
        assert await outbox.submit(completion()) is True
    assert metering.delivered == [completion()]
    assert any(record.getMessage() == "completion delivered but not written to the outbox" for record in caplog.records)
    await outbox.close()


async def test_a_completion_neither_written_nor_delivered_raises(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3", StandInMetering(MeteringUnavailable("down")).deliver)
    outbox._db.execute("PRAGMA query_only = ON")
    with pytest.raises(sqlite3.OperationalError):
        await outbox.submit(completion())
    await outbox.close()


async def test_close_right_after_a_failed_delivery_does_not_wait_out_the_backoff(tmp_path: Path) -> None:
    # The failed submit wakes the drain loop just as close() cancels it; Python 3.11's wait_for dropped that
    # cancellation and close() hung for the whole backoff (30 s here).
    for attempt in range(20):
        metering = StandInMetering(MeteringUnavailable("down"))
        outbox = Outbox(tmp_path / f"outbox-{attempt}.sqlite3", metering.deliver, max_backoff_seconds=30.0)
        outbox.start()
        assert await outbox.submit(completion()) is False
        started = asyncio.get_running_loop().time()
        await outbox.close()
        assert asyncio.get_running_loop().time() - started < 5
