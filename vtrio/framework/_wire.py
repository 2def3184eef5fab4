"""The wire format: everything a websocket client reads, down to the bytes.

- **JSON**: compact UTF-8; datetimes become ISO-8601 strings in UTC (MongoDB stores naive UTC
  datetimes, so a naive one is taken as UTC), ObjectIds their hex string. Everything else must
  be plain JSON.
- **Documents** go out with ``_id`` renamed ``id`` (:func:`to_wire`).
- **Change messages**: ``{"interface", "operation", "data", "position"}`` (:func:`change_payload`);
  ``data`` is the document for an insert or update, the list of removed ids for a delete.
- **Frames**: RFC 6455 server frames, unmasked, so one frame's bytes serve every client
  (:func:`text_frame`). Several change messages waiting for one client go out as one frame
  holding a JSON array of them, in order (:func:`batch_frame`); a JSON-RPC response always has
  a frame of its own.
- **Close codes**: :class:`CloseCode`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from bson import ObjectId

__all__ = [
    "CloseCode",
    "batch_frame",
    "change_payload",
    "dumps",
    "text_frame",
    "to_wire",
]


class CloseCode(IntEnum):
    """Why the server closed a websocket connection (the README's table)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """The server is shutting down: reconnect (elsewhere, or later) and resume."""
    PROTOCOL_ERROR = 1002
    """The client broke the websocket protocol."""
    INVALID_DATA = 1007
    """A text frame was not UTF-8."""
    MESSAGE_TOO_BIG = 1009
    """A frame larger than ``--max-message-size``."""
    INTERNAL_ERROR = 1011
    """vtrio failed while serving the connection (see the server's log)."""
    UNAUTHENTICATED = 4000
    """No API key, a wrong one, or one that has since been revoked: do not retry."""
    HEARTBEAT_TIMEOUT = 4001
    """No pong within the heartbeat interval: the peer is gone."""
    TOO_SLOW = 4002
    """The client read too slowly and its outbox overflowed: reconnect and resume."""
    HISTORY_LOST = 4003
    """The position to resume from is unknown or too old: reload, then reconnect."""


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


_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_encode_special)


def dumps(value: Any) -> str:
    """``value`` as compact JSON text, datetimes and ObjectIds converted."""
    return _encoder.encode(value)


def to_wire(document: Mapping[str, Any]) -> dict[str, Any]:
    """A document as clients see it: a new dict with ``_id`` renamed ``id``, first."""
    data: dict[str, Any] = {"id": document.get("_id")}
    data.update((key, value) for key, value in document.items() if key != "_id")
    return data


def change_payload(interface: str, operation: str, data: Any, position: str) -> bytes:
    """One change message, encoded: the payload of a frame or an element of a batch."""
    message = {"interface": interface, "operation": operation, "data": data, "position": position}
    return dumps(message).encode()


_TEXT = 0x81  # FIN + text opcode


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client text frame holding ``payload`` (RFC 6455, section 5.2)."""
    size = len(payload)
    if size < 126:
        header = bytes((_TEXT, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", _TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _TEXT, 127, size)
    return header + payload


def batch_frame(payloads: Sequence[bytes]) -> bytes:
    """One text frame holding several change messages as a JSON array, in order."""
    return text_frame(b"[" + b",".join(payloads) + b"]")
