"""JSON for the wire: MongoDB documents as websocket clients read them.

Datetimes become ISO-8601 strings in UTC (MongoDB stores naive UTC datetimes, so a naive one is
taken as UTC), ObjectIds become their hex string. Everything else must be plain JSON.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, default=lambda value: _encode_special(value)
)


def _encode_special(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} cannot be sent as JSON: {value!r}")


def dumps(value: Any) -> str:
    """``value`` as compact JSON text, datetimes and ObjectIds converted."""
    return _encoder.encode(value)
