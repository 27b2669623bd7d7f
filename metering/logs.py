"""Structured logs for both services: one JSON object a line on stderr. Fields passed with `extra=` become keys,
and every record made while a call is handled carries that call's request id.

The request id travels from the renderer to metering in the `x-request-id` metadata, so one render can be
followed through both services' logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

def _line_encoder() -> Any:
    """json.dumps(entry, default=str), with the encoder made once instead of for every line."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the public path
        return json.JSONEncoder(default=str).encode
    encode = make(None, str, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda entry: "".join(encode(entry, 0))


_encode = _line_encoder()


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's request id when it sent a usable one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isprintable():
                return value
    # 32 hex digits, like uuid4().hex: an id to follow a call by, not a secret, so no system call for it.
    return f"{random.getrandbits(128):032x}"


class JsonFormatter(logging.Formatter):
    """`ts` is UTC with milliseconds (`2024-05-01T12:00:00.123+00:00`); fields passed with `extra=` follow
    the fixed keys, which they cannot replace."""

    def __init__(self, service: str = "metering") -> None:
        super().__init__()
        self._service = service
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():  # in the order given, for people reading the lines
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry)


class JsonLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The services' handler: JSON lines on a stream. `emit_info` writes the line an INFO record with `fields` as
    its extras would give, without making the record: the per-call line costs the server a tenth of its CPU
    through LogRecord and Formatter, at two lines a render. `info_writer` says when that shortcut is exact."""

    def __init__(self, stream: Any, service: str) -> None:
        super().__init__(stream)
        self._json = JsonFormatter(service)
        self.setFormatter(self._json)
        self._service = service

    def emit_info(self, logger_name: str, message: str, fields: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "ts": self._json._timestamp(time.time()),
            "level": "info",
            "service": self._service,
            "logger": logger_name,
            "msg": message,
        }
        current = request_id.get()  # set by the record factory, before makeRecord adds the extras
        if current is not None:
            entry["request_id"] = current
        for key, value in fields.items():
            entry.setdefault(key, value)
        try:
            line = _encode(entry) + self.terminator
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line)
                self.stream.flush()
        except Exception:  # as logging does: a log line that cannot be written never fails the call
            self.handleError(logging.makeLogRecord({"name": logger_name, "msg": message}))


def info_writer(logger: logging.Logger) -> Callable[[str, dict[str, Any]], None] | None:
    """`(message, fields) -> None` writing what `logger.info(message, extra=fields)` would, when that record would
    reach exactly one handler, a JsonLineHandler, through no filter; else None (then call `logger.info`).
    Checked on every call: a test's log capture or an embedding application may add handlers at any time."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    handler: JsonLineHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for candidate in current.handlers:
            if handler is not None or not isinstance(candidate, JsonLineHandler):
                return None
            handler = candidate
        current = current.parent if current.propagate else None  # type: ignore[assignment]
    if handler is None or handler.filters or handler.level > logging.INFO:
        return None
    name = logger.name
    return lambda message, fields: handler.emit_info(name, message, fields)


def install_request_ids() -> None:
    """Every record made from now on carries the current call's request id (when there is one)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        current = request_id.get()
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = current
        return record

    make_record.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


def configure_logging(level: str = "INFO", *, service: str = "metering") -> None:
    # What the JSON lines never show, not collected for every record (the logging HOWTO's "Optimization"):
    # the caller's file and line (a stack walk per record), thread, process and multiprocessing names.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = JsonLineHandler(sys.stderr, service)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_request_ids()
    # pgserver narrates every step at INFO; keep its warnings only.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
