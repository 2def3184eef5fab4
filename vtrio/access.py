"""Who may see and change a sample (and the jobs that follow it).

A sample is visible to its owner, to members of its group when ``group_read`` is set, to everyone
when ``all_read`` is set, and to administrators; changing it needs the matching write right
(and the right to read it). The same rule answers RPC calls (:func:`can_read`,
:func:`readable_filter`) and decides which connections receive a dispatched change
(:func:`may_receive`): there is no second copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vtrio.auth import Identity

RIGHTS = ("group_read", "group_write", "all_read", "all_write")
ACCESS_FIELDS = ("user", "group", *RIGHTS)
"""The fields of a document that decide who sees it."""


def can_read(identity: Identity, document: Mapping[str, Any]) -> bool:
    return _allowed(identity, document, "read")


def can_write(identity: Identity, document: Mapping[str, Any]) -> bool:
    """Writing needs the write right and the read right: nobody writes what they cannot see."""
    return _allowed(identity, document, "write") and _allowed(identity, document, "read")


def _allowed(identity: Identity, document: Mapping[str, Any], right: str) -> bool:
    return (
        identity.admin
        or document.get("user") == identity.user_id
        or bool(document.get(f"all_{right}"))
        or (bool(document.get(f"group_{right}")) and document.get("group") in identity.groups)
    )


def access_of(document: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``document`` that decide who sees it (copied onto a sample's jobs)."""
    return {field: document.get(field) for field in ACCESS_FIELDS}


def readable_filter(identity: Identity, *, within: str = "") -> dict[str, Any]:
    """A MongoDB filter matching exactly the documents :func:`can_read` allows.

    ``within`` names the sub-document holding the access fields (``"access"`` for jobs).
    """
    return _filter(identity, "read", within)


def writable_filter(identity: Identity, *, within: str = "") -> dict[str, Any]:
    """A MongoDB filter matching exactly the documents :func:`can_write` allows."""
    if identity.admin:
        return {}
    return {"$and": [_filter(identity, "read", within), _filter(identity, "write", within)]}


def _filter(identity: Identity, right: str, within: str) -> dict[str, Any]:
    if identity.admin:
        return {}
    at = f"{within}." if within else ""
    return {
        "$or": [
            {f"{at}user": identity.user_id},
            {f"{at}all_{right}": True},
            {f"{at}group_{right}": True, f"{at}group": {"$in": sorted(identity.groups)}},
        ]
    }


def may_receive(identity: Identity, subject: Any) -> bool:
    """Dispatch rule: may this connection's user receive a change message about ``subject``?

    An insert or update is about one document: it goes to those who may read it (a job's
    access fields are under ``access``). A delete is about the removed documents, though its
    message carries only their ids: it goes to those who could read at least one of them.
    """
    if isinstance(subject, Mapping):
        return can_read(identity, subject.get("access", subject))
    documents = [item for item in subject if isinstance(item, Mapping)]
    return not documents or any(may_receive(identity, document) for document in documents)
