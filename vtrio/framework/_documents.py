"""Documents and projections: server projections, client-side projection, message data."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import bson

from vtrio.framework._changes import check_top_level

Document = dict[str, Any]
Projection = Sequence[str] | Mapping[str, Any]


def inclusion(fields: Iterable[str]) -> dict[str, bool]:
    """A server projection including ``fields`` (and ``_id``, which MongoDB keeps by default)."""
    return dict.fromkeys(fields, True)


def check_simple(projection: Projection | None) -> None:
    """Raise ValueError unless ``projection`` names top-level fields with true/false values.

    Write methods apply the caller's projection on the client, which supports only these.
    """
    if projection is None:
        return
    if isinstance(projection, str):
        raise TypeError("a projection is a sequence of field names or a mapping, not a string")
    for field in projection:
        check_top_level(field)
    if isinstance(projection, Mapping):
        for field, value in projection.items():
            if not isinstance(value, bool | int):
                raise ValueError(f"projection of {field!r}: only true/false values are supported")
        if {k for k, v in projection.items() if v and k != "_id"} and {
            k for k, v in projection.items() if not v and k != "_id"
        }:
            raise ValueError("a projection cannot both include and exclude fields")


def covering(spec: Sequence[str] | None, projection: Projection | None) -> dict[str, bool] | None:
    """The server projection that fetches what both ``spec`` and the caller's projection need.

    ``None`` (the whole document) unless both are inclusions.
    """
    if spec is None or projection is None:
        return None
    included = _included(projection)
    return inclusion([*spec, *included]) if included else None


def project(document: Mapping[str, Any], projection: Projection | None) -> Document:
    """A new dict: ``document`` with a top-level projection applied (see :func:`check_simple`)."""
    if projection is None:
        return dict(document)
    if isinstance(projection, Mapping):
        keep_id = bool(projection.get("_id", True))
        included = _included(projection)
        excluded = {field for field, value in projection.items() if not value}
        if not included and (excluded or not projection):
            return {key: value for key, value in document.items() if key not in excluded}
    else:
        keep_id, included = True, list(projection)
    wanted = set(included)
    return {
        key: value for key, value in document.items() if key in wanted or (key == "_id" and keep_id)
    }


def _included(projection: Projection) -> list[str]:
    if isinstance(projection, Mapping):
        return [field for field, value in projection.items() if value and field != "_id"]
    return [field for field in projection if field != "_id"]


def id_key(value: Any) -> Hashable:
    """A hashable stand-in for an ``_id`` (which may be a document)."""
    return value if isinstance(value, Hashable) else bson.encode({"_id": value})
