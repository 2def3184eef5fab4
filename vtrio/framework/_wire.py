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
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from bson import ObjectId

__all__ = [
    "CloseCode",
    "FrameSkipper",
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


class FrameSkipper:
    """Finds, in what a client sends, the messages too large to be worth decoding.

    :meth:`feed` splits the bytes read from a client into the bytes to parse (handed on as
    they came) and, in their place, the size of each message sent whole in one masked text or
    binary frame and larger than ``larger_than`` bytes: its header is read, its payload is
    never copied, unmasked or decoded. That is what makes refusing a huge frame cost a few
    microseconds instead of milliseconds (wsproto unmasks and UTF-8-decodes every byte).

    Everything else goes on to the parser untouched, whole or fragmented: control frames,
    fragments of a message, and frames the parser must refuse (unmasked, reserved bits set,
    a new message inside a fragmented one), so that it answers them as RFC 6455 says.
    """

    __slots__ = ("_fragmented", "_larger_than", "_passing", "_pending", "_skipping")

    def __init__(self, larger_than: int) -> None:
        self._larger_than = larger_than
        self._pending = b""  # the start of a header that the last read cut short
        self._passing = 0  # payload bytes of the current frame still to hand on
        self._skipping = 0  # payload bytes of the current (skipped) frame still to drop
        self._fragmented = False  # a message of several frames is under way

    def feed(self, data: bytes) -> Iterator[bytes | int]:
        """Yield, in order, the bytes of ``data`` to parse and the size of each skipped
        message (as soon as its header has arrived)."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        start = position = 0  # start: the first byte neither handed on nor dropped
        while position < len(data):
            if self._passing:
                step = min(self._passing, len(data) - position)
                self._passing -= step
                position += step
            elif self._skipping:
                step = min(self._skipping, len(data) - position)
                self._skipping -= step
                position = start = position + step
            else:
                header = _frame_header(data, position)
                if header is None:  # cut short: the rest of it comes with the next read
                    self._pending = data[position:]
                    break
                header_size, size = header
                if self._skips(data[position], data[position + 1], size):
                    if start < position:
                        yield data[start:position]
                    yield size
                    self._skipping = size
                    start = position + header_size
                else:
                    self._passing = size
                position += header_size
        if start < position:
            yield data if start == 0 and position == len(data) else data[start:position]

    @property
    def to_drop(self) -> int:
        """Bytes of a skipped message still to come: the reader may drop them itself, unread
        (and then says so with :meth:`dropped`), instead of feeding them."""
        return self._skipping

    def dropped(self, size: int) -> None:
        """``size`` bytes of :attr:`to_drop` were dropped without being fed."""
        assert 0 <= size <= self._skipping
        self._skipping -= size

    def _skips(self, first: int, second: int, size: int) -> bool:
        """Whether the frame whose header starts with these bytes is skipped; keeps count of
        fragmented messages (which are never skipped: their parts are counted as they come)."""
        opcode = first & 0x0F
        if opcode == 0x0:  # a continuation
            if first & 0x80:
                self._fragmented = False
            return False
        if opcode not in (0x1, 0x2):  # a control frame, or one the parser refuses
            return False
        if not first & 0x80:  # the first of several frames
            self._fragmented = True
            return False
        return (
            not self._fragmented
            and not first & 0x70  # no reserved bits: no extension is ever agreed
            and bool(second & 0x80)  # masked, as a client must
            and size > self._larger_than
        )


def _frame_header(data: bytes, at: int) -> tuple[int, int] | None:
    """(header size, payload size) of the frame starting at ``data[at]``; None if the header
    is not all there yet."""
    available = len(data) - at
    if available < 2:
        return None
    second = data[at + 1]
    size = second & 0x7F
    extended = 2 if size == 126 else 8 if size == 127 else 0
    header_size = 2 + extended + (4 if second & 0x80 else 0)
    if available < header_size:
        return None
    if extended:
        size = int.from_bytes(data[at + 2 : at + 2 + extended], "big")
    return header_size, size
