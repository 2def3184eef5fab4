"""The database's exceptions, and the translation of pymongo's into them.

Every pymongo failure reaches callers as a :class:`DatabaseError` subclass with pymongo's exception
as ``__cause__``. Messages say what went wrong in the user's terms and what to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

DUPLICATE_KEY = 11000
DOCUMENT_VALIDATION_FAILURE = 121
_MAYBE_APPLIED = "the write may or may not have been applied; "


class DatabaseError(Exception):
    """MongoDB refused or could not complete an operation."""


class DuplicateKey(DatabaseError):
    """A write would give a unique index a value it already holds. Nothing was written."""

    def __init__(self, collection: str | None, index: str | None, key: Mapping[str, Any]) -> None:
        self.collection = collection
        self.index = index
        self.key = dict(key)
        values = ", ".join(f"{field}={value!r}" for field, value in self.key.items()) or "the key"
        where = f" (unique index {index!r})" if index else ""
        super().__init__(
            f"{_where(collection)}: another document already has {values}{where}; "
            "use a different value, or update the existing document"
        )


class DocumentInvalid(DatabaseError):
    """A document failed the collection's validator (code 121). Nothing was written."""

    def __init__(self, collection: str | None, details: Mapping[str, Any]) -> None:
        self.collection = collection
        self.details = dict(details)
        super().__init__(
            f"{_where(collection)}: the document does not satisfy the collection's "
            f"validator ({_summarise_validation(self.details)}); correct the document and retry"
        )


class DatabaseUnavailable(DatabaseError):
    """MongoDB could not be reached, or did not answer in time."""


class DatabaseTimeout(DatabaseUnavailable):
    """An operation did not complete within the client-side operation timeout (``timeoutMS``)."""


def translate(
    exc: PyMongoError, *, collection: str | None, url: str, timeout: float, write: bool
) -> DatabaseError:
    """Our exception for pymongo's ``exc``, raised by an operation on ``collection`` (or
    on the database as a whole, if None).

    ``url`` must already be masked (:func:`mask_url`). The caller raises the result ``from exc``.
    """
    code, details = _code_and_details(exc)
    if code == DUPLICATE_KEY:
        return DuplicateKey(collection, _index_name(details), details.get("keyValue") or {})
    if code == DOCUMENT_VALIDATION_FAILURE:
        return DocumentInvalid(collection, details.get("errInfo") or {})
    maybe = _MAYBE_APPLIED if write else ""
    if isinstance(exc, ServerSelectionTimeoutError):
        return DatabaseUnavailable(
            f"MongoDB at {url} is unreachable ({brief(exc)}); {maybe}"
            "check that MongoDB is running and reachable, then retry"
        )
    if exc.timeout:
        return DatabaseTimeout(
            f"{_where(collection)}: the operation did not complete within the "
            f"{timeout:g} s timeout ({brief(exc)}); {maybe}retry, or raise the timeout"
        )
    if isinstance(exc, ConnectionFailure):
        return DatabaseUnavailable(
            f"lost the connection to MongoDB at {url} ({brief(exc)}); {maybe}retry"
        )
    return DatabaseError(f"{_where(collection)}: MongoDB refused the operation: {brief(exc)}")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = url.split("?", 1)[0].rfind("@")
    if at < start:
        return url
    user, colon, _password = url[start:at].partition(":")
    return url[:start] + user + (":***" if colon else "") + url[at:]


def redact(text: str, url: str) -> str:
    """``text`` with the password of ``url``, if any, replaced by ``***``."""
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    at = url.split("?", 1)[0].rfind("@")
    password = url[start:at].partition(":")[2] if at > start else ""
    return text.replace(password, "***") if password else text


def brief(exc: PyMongoError) -> str:
    """pymongo's message without the topology description it appends to selection timeouts."""
    text = str(exc)
    if isinstance(exc, ServerSelectionTimeoutError):
        text = text.split(", Timeout:", 1)[0]
    return text.split(", full error:", 1)[0]


def _where(collection: str | None) -> str:
    return f"collection {collection!r}" if collection else "database command"


def _code_and_details(exc: PyMongoError) -> tuple[int | None, Mapping[str, Any]]:
    if isinstance(exc, BulkWriteError):
        write_errors = exc.details.get("writeErrors") or [{}]
        first = write_errors[0]
        return first.get("code"), first
    if isinstance(exc, OperationFailure):
        return exc.code, exc.details or {}
    return None, {}


def _index_name(details: Mapping[str, Any]) -> str | None:
    match = re.search(r"index: (\S+) dup key", str(details.get("errmsg", "")))
    return match.group(1) if match else None


def _summarise_validation(err_info: Mapping[str, Any]) -> str:
    """A short account of a validation failure's ``errInfo``, e.g. 'missing: name'."""
    rules = (err_info.get("details") or {}).get("schemaRulesNotSatisfied") or []
    parts: list[str] = []
    for rule in rules:
        if rule.get("missingProperties"):
            parts.append("missing: " + ", ".join(rule["missingProperties"]))
        for prop in rule.get("propertiesNotSatisfied") or []:
            parts.append(f"invalid: {prop.get('propertyName')}")
        if rule.get("additionalProperties"):
            parts.append("not allowed: " + ", ".join(rule["additionalProperties"]))
    if parts:
        return "; ".join(parts)
    details = err_info.get("details")
    return f"details: {details}" if details else "no details given"
