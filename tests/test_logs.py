"""The JSON log lines: the per-call shortcut (`info_writer`) writes exactly what logging would, and steps aside
whenever anything else (a capture, a filter, a second handler) would see the record."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from metering.logs import JsonLineHandler, info_writer, install_request_ids, request_id


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    install_request_ids()
    stream = io.StringIO()
    # A tree of its own, outside logging's registry (where pytest attaches its capture handlers).
    root = logging.Logger("logs-test", logging.INFO)
    root.addHandler(JsonLineHandler(stream, "metering"))
    child = logging.Logger("logs-test.rpc")
    child.parent = root
    yield child, stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    for entry in entries:
        assert isinstance(entry.pop("ts"), str)
    return entries


def test_the_shortcut_writes_the_line_logging_writes(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    token = request_id.set("trace-7")
    try:
        fields = {"user_id": "u\u00e9\n\"x", "export_id": "e-1", "rpc": "Complete", "code": "OK", "ms": 1.25}
        write = info_writer(log)
        assert write is not None
        write("rpc", dict(fields))
        log.info("rpc", extra=dict(fields))
    finally:
        request_id.reset(token)
    shortcut, logged = lines(stream)
    assert shortcut == logged
    assert list(shortcut) == list(logged)  # the same keys in the same order, too
    assert logged["request_id"] == "trace-7" and logged["logger"] == "logs-test.rpc" and logged["level"] == "info"
    raw_shortcut, raw_logged = stream.getvalue().splitlines()
    assert raw_shortcut[raw_shortcut.index('"level"') :] == raw_logged[raw_logged.index('"level"') :]


def test_the_shortcut_steps_aside_for_anything_else_that_would_see_the_record(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, _ = logger
    assert info_writer(log) is not None
    log.addHandler(logging.NullHandler())  # a second handler on the way
    assert info_writer(log) is None
    log.handlers[:] = []
    log.addFilter(lambda record: True)
    assert info_writer(log) is None
    log.filters[:] = []
    assert info_writer(log) is not None
    quiet = logging.Logger("logs-test.quiet", logging.WARNING)
    quiet.parent = log.parent
    assert info_writer(quiet) is None
    assert log.parent is not None
    log.parent.handlers[0].setLevel(logging.WARNING)
    assert info_writer(log) is None


def test_under_a_log_capture_the_records_still_reach_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert info_writer(logging.getLogger("metering.rpc")) is None  # pytest's handlers are not JSON lines


def test_a_line_that_cannot_be_written_does_not_raise(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = logger
    write = info_writer(log)
    assert write is not None
    stream.close()  # as when stderr is gone
    previous, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        write("rpc", {"rpc": "Complete", "code": "OK"})
        log.info("rpc", extra={"rpc": "Complete", "code": "OK"})
    finally:
        logging.raiseExceptions = previous
