"""Opaque keyset page tokens for ListExports: the last row's (created_at, export_id), bound to the filter.

A token is only valid for the query that produced it; anything else is an INVALID_ARGUMENT page_token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from metering import errors

# Sorts after every real row: where the first page starts.
FIRST_PAGE = (datetime(9999, 12, 31, tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: datetime
    export_id: uuid.UUID


def _filter_tag(user_id: str, project_id: str | None) -> str:
    return hashlib.sha256(json.dumps([user_id, project_id]).encode()).hexdigest()[:16]


def encode(cursor: Cursor, *, user_id: str, project_id: str | None) -> str:
    payload = {
        "v": 1,
        "t": cursor.created_at.astimezone(UTC).isoformat(),
        "id": str(cursor.export_id),
        "f": _filter_tag(user_id, project_id),
    }
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode(token: str, *, user_id: str, project_id: str | None) -> Cursor:
    if not token:
        return Cursor(*FIRST_PAGE)
    invalid = errors.InvalidArgument("page_token", "is not a page token from this query's next_page_token")
    if len(token) > 512:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict) or payload.get("v") != 1:
            raise invalid
        moment, identifier = payload["t"], payload["id"]
        if not isinstance(moment, str) or not isinstance(identifier, str):
            raise invalid  # a token is made by `encode`, but anyone can build one with the right filter tag
        created_at = datetime.fromisoformat(moment)
        if created_at.tzinfo is None:
            raise invalid
        # In UTC here, as the database compares it: year 1 at +01:00 is before year 1 in UTC (OverflowError).
        created_at = created_at.astimezone(UTC)
        export_id = uuid.UUID(identifier)
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
        raise invalid from None
    if payload.get("f") != _filter_tag(user_id, project_id):
        raise invalid
    return Cursor(created_at, export_id)
