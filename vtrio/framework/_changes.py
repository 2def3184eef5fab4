"""What flows from MongoDB to the hub: a :class:`Change`, and how each collection shares its own.

A :class:`CollectionSpec` is the application's one declaration of a collection: the fields its
change messages carry, whether it is silent, and who may see each of its documents. The hub
judges every change by it, once per user, with the document as it was before the change and as
it is after, so that access changes are messages too: a user who could see a document and no
longer can receives a ``delete``, one who now can receives an ``insert``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pymongo import IndexModel

from vtrio.framework._wire import change_payload, to_wire

__all__ = ["Change", "CollectionSpec", "Operation", "Visibility", "check_top_level"]

Operation = Literal["insert", "update", "delete"]

Visibility = Callable[[Any, Mapping[str, Any] | None], bool]
"""``visible_to(identity, document)``: may this connection's user see ``document``?

``document`` is projected by the collection's projection and keeps its ``_id``. It is None when
the document is not known (a delete whose removed document MongoDB no longer holds): the rule
then says whether this user sees changes to documents it cannot judge (administrators, say).
A rule must not raise: a document of a shape it does not expect is simply not visible.
"""


@dataclass(frozen=True)
class CollectionSpec:
    """How one collection's changes reach clients.

    ``projection`` names the top-level fields change messages carry (``_id`` always, as
    ``id``); ``None`` sends whole documents. ``visible_to`` decides who receives a change
    (``None``: every connection). A ``silent`` collection's changes reach no client.
    ``indexes`` are created when the database service starts (see ``open_database``).
    """

    projection: Sequence[str] | None = None
    silent: bool = False
    visible_to: Visibility | None = None
    indexes: Sequence[IndexModel] = ()

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

    def sees(self, identity: Any, document: Mapping[str, Any] | None) -> bool:
        return self.visible_to is None or self.visible_to(identity, document)


def check_top_level(field: object) -> None:
    """Raise ValueError unless ``field`` names a top-level field (no dots, no ``$``)."""
    if not isinstance(field, str) or not field or "." in field or field.startswith("$"):
        raise ValueError(f"{field!r} is not a top-level field name (no dots, no '$')")


class Change:
    """One committed change to one document of ``collection``.

    ``after`` is the document after the change and ``before`` the document before it, both
    projected by the collection's spec (with ``_id``); ``after`` is None for a delete,
    ``before`` None for an insert, and None for an update or delete when it is not known.
    ``position`` orders changes across the whole deployment (empty when unknown).

    The three messages a change can become (its own operation, or an ``insert`` or ``delete``
    for a user whose access it changed) are each encoded once, on first use, for every client.
    """

    __slots__ = ("_payloads", "after", "before", "collection", "id", "operation", "position")

    def __init__(
        self,
        collection: str,
        operation: Operation,
        id: Any,
        *,
        after: Mapping[str, Any] | None = None,
        before: Mapping[str, Any] | None = None,
        position: str = "",
    ) -> None:
        self.collection = collection
        self.operation = operation
        self.id = id
        self.after = after
        self.before = before
        self.position = position
        self._payloads: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<Change {self.collection} {self.operation} {self.id!r} at {self.position!r}>"

    def message_for(self, identity: Any, spec: CollectionSpec) -> bytes | None:
        """The encoded message this user receives for this change, or None."""
        operation = self._seen_as(identity, spec)
        return None if operation is None else self.payload(operation)

    def _seen_as(self, identity: Any, spec: CollectionSpec) -> Operation | None:
        if spec.visible_to is None:
            return self.operation
        if self.operation == "insert":
            return "insert" if spec.sees(identity, self.after) else None
        if self.operation == "delete":
            return "delete" if spec.sees(identity, self.before) else None
        if self.before is None:  # an update with no record of what was: judged as it is now
            return "update" if spec.sees(identity, self.after) else None
        saw, sees = spec.sees(identity, self.before), spec.sees(identity, self.after)
        if sees:
            return "update" if saw else "insert"
        return "delete" if saw else None

    def payload(self, operation: Operation) -> bytes:
        """This change as an ``operation`` message (see :func:`~vtrio.framework._wire`)."""
        payload = self._payloads.get(operation)
        if payload is None:
            document = self.after if operation != "delete" else None
            data = [self.id] if document is None else to_wire(document)
            payload = change_payload(self.collection, operation, data, self.position)
            self._payloads[operation] = payload
        return payload
