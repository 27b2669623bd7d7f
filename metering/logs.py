"""Structured logs for both services: one JSON object a line on stderr. Fields passed with `extra=` become keys,
and every record made while a call is handled carries that call's request id.

The request id travels from the renderer to metering in the `x-request-id` metadata, so one render can be
followed through both services' logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's request id when it sent a usable one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isprintable():
                return value
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str = "metering") -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_request_ids()
    # pgserver narrates every step at INFO; keep its warnings only.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
