"""Who may see and change a sample (and the jobs that follow it).

A sample is visible to its owner, to members of its group when ``group_read`` is set, to everyone
when ``all_read`` is set, and to administrators; changing it needs the matching write right.
The same rule answers RPC calls (:func:`can_read`, :func:`readable_filter`) and decides which
connections receive a dispatched change (:func:`may_receive`): there is no second copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vtrio.auth import Identity

RIGHTS = ("group_read", "group_write", "all_read", "all_write")


def can_read(identity: Identity, document: Mapping[str, Any]) -> bool:
    return _allowed(identity, document, "read")


def can_write(identity: Identity, document: Mapping[str, Any]) -> bool:
    return _allowed(identity, document, "write")


def _allowed(identity: Identity, document: Mapping[str, Any], right: str) -> bool:
    return (
        identity.admin
        or document.get("user") == identity.user_id
        or bool(document.get(f"all_{right}"))
        or (bool(document.get(f"group_{right}")) and document.get("group") in identity.groups)
    )


def readable_filter(identity: Identity, *, within: str = "") -> dict[str, Any]:
    """A MongoDB filter matching exactly the documents :func:`can_read` allows.

    ``within`` names the sub-document holding the access fields (``"access"`` for jobs).
    """
    if identity.admin:
        return {}
    at = f"{within}." if within else ""
    return {
        "$or": [
            {f"{at}user": identity.user_id},
            {f"{at}all_read": True},
            {f"{at}group_read": True, f"{at}group": {"$in": sorted(identity.groups)}},
        ]
    }


def may_receive(identity: Identity, data: Any) -> bool:
    """Dispatch rule: a change to a document goes to those who may read it; a delete (a list
    of ids, nothing readable in it) goes to everyone, who drop ids they never had."""
    return not isinstance(data, Mapping) or can_read(identity, data.get("access", data))
