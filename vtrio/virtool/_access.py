"""Who may see and change a sample, and the jobs that follow it.

A sample is visible to its owner, to members of its group when ``group_read`` is set, to everyone
when ``all_read`` is set, and to administrators; changing it needs the matching write right
(and the right to read it). A job carries a copy of its sample's access fields under
``access`` and follows the same rule. The one rule answers RPC calls (:func:`can_read`,
:func:`can_write`, :func:`readable_filter`, :func:`writable_filter`) and decides which
connections receive a change (:func:`sample_visible_to`, :func:`job_visible_to`, declared
with the collections in :mod:`vtrio.virtool._collections`): there is no second copy of it.

A document whose access fields do not have the shape this module expects (another program
wrote it: a job without ``access``, a ``user`` that is not a string) is visible to
administrators only, and logged once, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vtrio.virtool._auth import Identity

log = logging.getLogger(__name__)

RIGHTS = ("group_read", "group_write", "all_read", "all_write")
ACCESS_FIELDS = ("user", "group", *RIGHTS)
"""The fields of a document that decide who sees it."""

_MALFORMED_LOGGED = 1_000
_logged: set[Any] = set()


def can_read(identity: Identity, document: Mapping[str, Any] | None) -> bool:
    """Whether ``identity`` may read a document with these access fields."""
    return _allowed(identity, document, "read")


def can_write(identity: Identity, document: Mapping[str, Any] | None) -> bool:
    """Writing needs the write right and the read right: nobody writes what they cannot see."""
    return _allowed(identity, document, "write") and _allowed(identity, document, "read")


def sample_visible_to(identity: Identity, sample: Mapping[str, Any] | None) -> bool:
    """Visibility rule of ``samples``: a None sample (one MongoDB no longer holds) is an
    administrator's to know about."""
    return can_read(identity, sample)


def job_visible_to(identity: Identity, job: Mapping[str, Any] | None) -> bool:
    """Visibility rule of ``jobs``: by the access fields copied from the job's sample."""
    return can_read(identity, None if job is None else access_fields(job))


def access_fields(job: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The access fields a job carries, or None if it carries none that can be read."""
    fields = job.get("access")
    if isinstance(fields, Mapping):
        return fields
    _log_malformed(job.get("_id"), "no 'access' object")
    return None


def _allowed(identity: Identity, document: Mapping[str, Any] | None, right: str) -> bool:
    if identity.admin:
        return True
    if document is None or not _well_formed(document):
        return False
    return (
        document.get("user") == identity.user_id
        or document.get(f"all_{right}") is True
        or (document.get(f"group_{right}") is True and document.get("group") in identity.groups)
    )


def _well_formed(document: Mapping[str, Any]) -> bool:
    problem = None
    if not isinstance(document.get("user"), str):
        problem = "'user' is not a string"
    elif not isinstance(document.get("group"), str | None):
        problem = "'group' is not a string"
    elif any(not isinstance(document.get(right, False), bool) for right in RIGHTS):
        problem = "a right is not true or false"
    if problem is not None:
        _log_malformed(document.get("_id"), problem)
    return problem is None


def _log_malformed(document_id: Any, problem: str) -> None:
    key = repr(document_id)
    if key not in _logged and len(_logged) < _MALFORMED_LOGGED:
        _logged.add(key)
        log.warning("document %s has unexpected access fields (%s): admins only", key, problem)


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
    granted = {
        "$or": [
            {f"{at}user": identity.user_id},
            {f"{at}all_{right}": True},
            {f"{at}group_{right}": True, f"{at}group": {"$in": sorted(identity.groups)}},
        ]
    }
    return {"$and": [granted, _well_formed_filter(at)]}


def _well_formed_filter(at: str) -> dict[str, Any]:
    """What :func:`_well_formed` says, as a filter. ``$type`` in ``$expr`` is the type of the
    field itself (a query's ``$type`` would also match arrays holding that type)."""

    def type_of(field: str) -> dict[str, str]:
        return {"$type": f"${at}{field}"}

    return {
        "$expr": {
            "$and": [
                {"$eq": [type_of("user"), "string"]},
                {"$in": [type_of("group"), ["string", "null", "missing"]]},
                *({"$in": [type_of(right), ["bool", "missing"]]} for right in RIGHTS),
            ]
        }
    }
