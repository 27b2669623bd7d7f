"""What the job runner needs from metering, without gRPC: the port and its errors."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from renderer.domain import Composition, OutputFormat, RenderMode, Reservation


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    idempotency_key: str
    user_id: str
    project_id: str
    mode: RenderMode
    format: OutputFormat
    composition: Composition

    def digest(self) -> str:
        """CheckAndReserve's `request_digest`: sha256 (hex) of a canonical JSON of the composition, format and
        mode, so that metering refuses the same idempotency key with another render (ALREADY_EXISTS) even where
        this process never saw the first one (a restart, another renderer). Two requests that the job runner's
        own replay check takes for the same (`==`) get the same digest: numbers count as floats (5 and 5.0, -0.0
        and 0.0 are equal there too), and a field at its default is left out, so that a field added later with
        a default changes no digest."""
        canonical = json.dumps(
            {"composition": _canonical(self.composition), "format": self.format.value, "mode": self.mode.value},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            item.name: _canonical(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if item.default is dataclasses.MISSING or getattr(value, item.name) != item.default
        }
    if isinstance(value, tuple | list):
        return [_canonical(item) for item in value]
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value) + 0.0  # + 0.0: -0.0 becomes 0.0
    if isinstance(value, str):
        return value
    raise TypeError(f"no canonical form for {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Completion:
    """The closing record of one export; what the outbox stores until metering acknowledges it."""

    export_id: str
    outcome: Outcome
    error: str = ""
    file_size_bytes: int = 0
    duration_seconds: float = 0.0
    output_uri: str = ""
    render_seconds: float = 0.0


class MeteringError(Exception):
    """Base of the errors below."""


class MeteringUnavailable(MeteringError):
    """Metering did not answer: nothing may render (tracking fails closed)."""


class MeteringRejected(MeteringError):
    """Metering answered with an error (quota, precondition, idempotency conflict...).

    `status` is the transport's own error, kept whole so the caller sees metering's code, message and details
    unchanged; `permanent` says whether retrying the same call can ever succeed.
    """

    def __init__(self, message: str, *, status: Any, code_name: str, permanent: bool) -> None:
        super().__init__(message)
        self.status = status
        self.code_name = code_name
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class ClosedExport:
    """What metering recorded for an export that is no longer RESERVED."""

    export_id: str
    status: str  # "completed", "failed", "cancelled" or "expired"
    error: str = ""
    file_size_bytes: int = 0
    duration_seconds: float = 0.0
    output_uri: str = ""


class ExportAlreadyClosed(MeteringError):
    """A replayed reservation whose export was already closed: render nothing, report what happened."""

    def __init__(self, export: ClosedExport) -> None:
        super().__init__(f"export {export.export_id} is already {export.status}")
        self.export = export


class MeteringPort(Protocol):
    async def reserve(self, request: ReserveRequest) -> Reservation: ...

    async def complete(self, completion: Completion) -> None: ...

    async def extend(self, export_id: str) -> datetime: ...

    async def healthy(self) -> bool: ...
