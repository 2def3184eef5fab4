"""How a collection dispatches its changes (:class:`CollectionSpec`); the ``Dispatch`` type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Dispatch = Callable[[str, str, Any, Any], None]
"""``dispatch(interface, operation, data, subject)``: synchronous, never awaits, should not raise.

``interface`` is the collection's name, ``operation`` one of ``"insert"``, ``"update"``,
``"delete"``; ``data`` is what the message carries: the projected document with ``_id`` renamed
``id`` (insert, update) or the list of removed ids (delete), as Python objects, not yet
JSON-encoded. ``subject`` is what access rules judge the message by: the same document for an
insert or update, and for a delete the removed documents as they were (projected), which the
message itself does not carry.
"""


@dataclass(frozen=True)
class CollectionSpec:
    """How one collection dispatches its writes.

    ``projection`` names the top-level fields the dispatched documents carry (``_id`` always, as
    ``id``); ``None`` sends the whole document. A ``silent`` collection dispatches nothing.
    """

    projection: Sequence[str] | None = None
    silent: bool = False

    def __post_init__(self) -> None:
        if self.projection is None:
            return
        if isinstance(self.projection, str):
            raise TypeError("CollectionSpec.projection is a sequence of field names, not a string")
        fields = tuple(self.projection)
        for field in fields:
            check_top_level(field)
        if "_id" not in fields:
            fields = ("_id", *fields)
        object.__setattr__(self, "projection", fields)


def check_top_level(field: object) -> None:
    """Raise ValueError unless ``field`` names a top-level field (no dots, no ``$``)."""
    if not isinstance(field, str) or not field or "." in field or field.startswith("$"):
        raise ValueError(f"{field!r} is not a top-level field name (no dots, no '$')")
