"""Users and their API keys.

Both live in MongoDB, in the silent collections ``users`` and ``keys``: nothing about them is
ever dispatched. A key is shown once, when it is created; MongoDB holds only its SHA-256 hash.
A plain hash suffices because keys are 256 random bits, not passwords a person chose: there is
nothing to guess, so no slow hash is needed to slow the guessing down.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import trio

from vtrio.framework import Change, CloseCode, Database, DatabaseError, DuplicateKey, Hub

log = logging.getLogger(__name__)

KEY_PREFIX = "vt_"
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AuthError(Exception):
    """A user or key operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Identity:
    """The user behind an authenticated connection, and the key it presented."""

    user_id: str
    name: str
    admin: bool
    groups: frozenset[str]
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_user(
    db: Database, name: str, *, admin: bool = False, groups: list[str] | None = None
) -> dict[str, Any]:
    """Create the user ``name``. Raises AuthError if the name is taken or malformed."""
    if not _USER_NAME.match(name):
        raise AuthError(f"{name!r} is not a user name: use 1-64 letters, digits, '_', '.' or '-'")
    document = {
        "_id": name,
        "name": name,
        "admin": admin,
        "groups": sorted(set(groups or [])),
        "created_at": datetime.now(UTC),
    }
    try:
        return await db.users.insert_one(document)
    except DuplicateKey:
        raise AuthError(f"a user named {name!r} exists already") from None


async def create_key(db: Database, user_name: str) -> tuple[str, str]:
    """Create an API key for ``user_name``; return ``(key_id, key)``. The key is not kept."""
    user = await db.users.find_one({"name": user_name})
    if user is None:
        raise AuthError(f"no user named {user_name!r}: create it with `vtrio users create`")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = secrets.token_hex(6)
    await db.keys.insert_one(
        {
            "_id": key_id,
            "user_id": user["_id"],
            "hash": hash_key(key),
            "created_at": datetime.now(UTC),
        }
    )
    return key_id, key


async def list_keys(db: Database, user_name: str) -> list[dict[str, Any]]:
    """The ids and creation dates of ``user_name``'s keys (never the keys themselves)."""
    user = await db.users.find_one({"name": user_name})
    if user is None:
        raise AuthError(f"no user named {user_name!r}")
    keys = await db.keys.find(
        {"user_id": user["_id"]}, {"_id": 1, "created_at": 1}, sort=[("created_at", 1)]
    )
    return [{"id": key["_id"], "created_at": key["created_at"]} for key in keys]


async def revoke_key(db: Database, key_id: str) -> None:
    """Delete the key ``key_id``. Connections using it are closed by the running server."""
    if await db.keys.delete_one({"_id": key_id}) is None:
        raise AuthError(f"no key with id {key_id!r}: `vtrio keys list USER` shows the ids")


def well_formed(key: str) -> bool:
    """Whether ``key`` could be a key at all (not worth a database look-up otherwise)."""
    return key.startswith(KEY_PREFIX) and len(key) <= 200


def identity_of(user: Mapping[str, Any], key_record: Mapping[str, Any]) -> Identity:
    """The identity of ``user``, authenticated by the key ``key_record`` describes."""
    return Identity(
        user_id=user["_id"],
        name=user["name"],
        admin=bool(user.get("admin")),
        groups=frozenset(user.get("groups", [])),
        key_id=key_record["_id"],
    )


async def authenticate(db: Database, key: str | None) -> Identity | None:
    """The identity a key stands for, or None for a missing, wrong or revoked key."""
    if not key or not well_formed(key):
        return None
    record = await db.keys.find_one({"hash": hash_key(key)})
    if record is None:
        return None
    user = await db.users.find_one({"_id": record["user_id"]})
    return None if user is None else identity_of(user, record)


async def valid_key_ids(db: Database, key_ids: set[str]) -> set[str]:
    """Which of ``key_ids`` still exist."""
    return set(await db.keys.distinct("_id", {"_id": {"$in": sorted(key_ids)}}))


SWEEP_INTERVAL = 60.0
"""Seconds between two checks of every open connection's key, besides the feed's news."""


@asynccontextmanager
async def closing_revoked_keys(
    hub: Hub, db: Database, *, sweep_interval: float = SWEEP_INTERVAL
) -> AsyncIterator[None]:
    """For the block, close with 4000 every connection whose API key has been revoked: the
    moment the change feed says a key was deleted (by this instance or any other), and in a
    sweep every ``sweep_interval`` seconds (for a key revoked while its connection opened)."""

    def heard(changes: Sequence[Change]) -> None:
        gone = {c.id for c in changes if c.collection == db.keys.name and c.operation == "delete"}
        if gone:
            hub.close_matching(partial(_key_in, gone), CloseCode.UNAUTHENTICATED, REVOKED)

    unsubscribe = db.changes.subscribe(heard) if db.changes is not None else (lambda: None)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep, hub, db, sweep_interval)
            yield
            nursery.cancel_scope.cancel()
    finally:
        unsubscribe()


REVOKED = "API key revoked"


async def _sweep(hub: Hub, db: Database, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        key_ids = {connection.identity.key_id for connection in hub.connections}
        if not key_ids:
            continue
        try:
            valid = await valid_key_ids(db, key_ids)
        except DatabaseError as exc:
            log.warning("cannot check API keys (%s): will try again", exc)
            continue
        hub.close_matching(partial(_key_in, key_ids - valid), CloseCode.UNAUTHENTICATED, REVOKED)


def _key_in(key_ids: set[str], identity: Identity) -> bool:
    return identity.key_id in key_ids
