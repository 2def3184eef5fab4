"""The ``samples.*`` methods: create, get, list, update and delete samples.

A sample names a reads file in ``uploads/``, belongs to the user who created it, and may be shared
with its group or everyone through Virtool's rights fields (see :mod:`vtrio.access`). Methods
take and return documents with ``id``; a sample the caller may not read does not exist for them
(404), one they may read but not change is forbidden to change (403).

Cancellation (the caller's connection closed): a write already sent completes and is dispatched
(see :mod:`vtrio.db`); nothing else is left half done, because every method makes one write,
except ``samples.delete``, whose cancelling of the sample's jobs may then not happen (the jobs
fail at their end, finding the sample gone), and ``samples.update`` of the sharing fields,
whose copy onto the jobs may then not happen.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, StringConstraints

from vtrio import access
from vtrio.db.collections import SAMPLE_FIELDS
from vtrio.db.documents import message_data
from vtrio.db.errors import DuplicateKey
from vtrio.rpc import INVALID_PARAMS, Conflict, Forbidden, Methods, NotFound, Params, RpcError
from vtrio.uploads import UploadError, Uploads

if TYPE_CHECKING:
    from vtrio.api import Call
    from vtrio.db import Database


LIST_LIMIT = 100
"""The most samples one ``samples.list`` call returns."""

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1024)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]

methods: Methods[Call] = Methods()

# What samples.list returns of each sample: everything but the (large) read statistics.
_LISTING = {field: True for field in SAMPLE_FIELDS if field != "quality"}


async def create_indexes(db: Database) -> None:
    await db.samples.create_index("name", unique=True)
    await db.samples.create_index("user")


class CreateParams(Params):
    name: Name
    reads: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    host: Text = ""
    isolate: Text = ""
    group: Name | None = None
    group_read: bool = False
    group_write: bool = False
    all_read: bool = False
    all_write: bool = False


class IdParams(Params):
    id: Id


class ListParams(Params):
    prefix: Annotated[str, StringConstraints(max_length=256)] = ""
    after: Annotated[str, StringConstraints(max_length=256)] | None = None
    skip: Annotated[int, Field(ge=0, le=10_000)] = 0
    limit: Annotated[int, Field(ge=1, le=LIST_LIMIT)] = 25


class UpdateParams(Params):
    id: Id
    name: Name | None = None
    host: Text | None = None
    isolate: Text | None = None
    group: Name | None = None
    group_read: bool | None = None
    group_write: bool | None = None
    all_read: bool | None = None
    all_write: bool | None = None


_SHARING = frozenset({"group", *access.RIGHTS})
"""Fields only the owner or an administrator may change."""


@methods.method("samples.create", CreateParams)
async def create(call: Call, params: CreateParams) -> dict[str, Any]:
    """Create a sample owned by the caller. Its ``group``, if given, must be one of theirs."""
    _check_group(call, params.group)
    try:
        await call.app.uploads.resolve(params.reads)
    except UploadError as exc:
        raise RpcError(
            f"invalid params: reads: {exc}",
            code=INVALID_PARAMS,
            data=[{"field": "reads", "problem": str(exc)}],
        ) from None
    document = {
        "_id": secrets.token_hex(8),
        **params.model_dump(),
        "reads": Uploads.normalized(params.reads),
        "user": call.identity.user_id,
        "created_at": now(),
        "quality": None,
    }
    try:
        inserted = await call.app.db.samples.insert_one(document)
    except DuplicateKey:
        raise Conflict(f"a sample named {params.name!r} exists: choose another name") from None
    return message_data(inserted)


@methods.method("samples.get", IdParams)
async def get(call: Call, params: IdParams) -> dict[str, Any]:
    return message_data(await readable_sample(call, params.id))


@methods.method("samples.list", ListParams)
async def list_samples(call: Call, params: ListParams) -> dict[str, Any]:
    """The caller's readable samples by name, ``limit`` at a time.

    Page with the cursor ``after`` (the ``next`` of the previous page: no sample is skipped or
    repeated however the collection changes in between) or with ``skip``. ``total`` counts
    every readable sample matching ``prefix``, whatever the page.
    """
    query: dict[str, Any] = access.readable_filter(call.identity)
    if params.prefix:
        # An anchored, escaped prefix: MongoDB answers it from the name index.
        query = {"$and": [query, {"name": {"$regex": "^" + re.escape(params.prefix)}}]}
    page = query
    if params.after is not None:
        page = {"$and": [query, {"name": {"$gt": params.after}}]}
    found = await call.app.db.samples.find(
        page, _LISTING, sort=[("name", 1)], skip=params.skip, limit=params.limit + 1
    )
    more = len(found) > params.limit
    items = [message_data(sample) for sample in found[: params.limit]]
    return {
        "items": items,
        "total": await call.app.db.samples.count_documents(query),
        "next": items[-1]["name"] if more else None,
    }


@methods.method("samples.update", UpdateParams)
async def update(call: Call, params: UpdateParams) -> dict[str, Any]:
    """Change the given fields. The sharing fields (``group`` and the rights) only the owner or
    an administrator may change, and only to a group of theirs."""
    changes = params.model_dump(exclude={"id"}, exclude_none=True)
    _check_group(call, changes.get("group"))
    if not changes:
        return message_data(await writable_sample(call, params.id))
    sharing = bool(changes.keys() & _SHARING)
    # One round trip when the caller may make the change: the rights are checked in the write
    # itself (so none revoked a moment ago is bypassed); only a refusal costs a second look,
    # to tell the caller why.
    query = {"$and": [{"_id": params.id}, access.writable_filter(call.identity)]}
    if sharing and not call.identity.admin:
        query["$and"].append({"user": call.identity.user_id})
    try:
        updated = await call.app.db.samples.find_one_and_update(query, {"$set": changes})
    except DuplicateKey:
        raise Conflict(f"a sample named {params.name!r} exists: choose another name") from None
    if updated is None:
        sample = await writable_sample(call, params.id)  # raises NotFound or Forbidden
        if sharing and not _owns(call, sample):
            raise Forbidden("only the sample's owner or an administrator may change its sharing")
        raise NotFound(f"no sample {params.id!r}")  # it changed hands since the write
    if sharing:
        # Jobs follow their sample: those who now may read it see its jobs too (dispatched).
        await call.app.db.jobs.update_many(
            {"sample_id": params.id}, {"$set": {"access": access.access_of(updated)}}
        )
    return message_data(updated)


@methods.method("samples.delete", IdParams)
async def delete(call: Call, params: IdParams) -> dict[str, Any]:
    """Delete the sample and cancel its waiting or running jobs (which stay, as history)."""
    await writable_sample(call, params.id)  # 404 or 403, as for update
    # Jobs first: a job that found its sample gone would end in "error", not "cancelled".
    await call.app.jobs.cancel_sample(params.id)
    query = {"$and": [{"_id": params.id}, access.writable_filter(call.identity)]}
    deleted = await call.app.db.samples.delete_one(query)
    if deleted is None:
        raise NotFound(f"no sample {params.id!r}")
    return {"id": params.id}


def now() -> datetime:
    """The time as MongoDB stores it (milliseconds), so that what a write returns and what a
    later read returns are equal."""
    time = datetime.now(UTC)
    return time.replace(microsecond=time.microsecond // 1000 * 1000)


async def readable_sample(call: Call, sample_id: str) -> dict[str, Any]:
    """The sample, if the caller may read it; NotFound otherwise (its existence is private)."""
    sample = await call.app.db.samples.find_one({"_id": sample_id})
    if sample is None or not access.can_read(call.identity, sample):
        raise NotFound(f"no sample {sample_id!r}")
    return sample


async def writable_sample(call: Call, sample_id: str) -> dict[str, Any]:
    """The sample, if the caller may change it; NotFound or Forbidden otherwise."""
    sample = await readable_sample(call, sample_id)
    if not access.can_write(call.identity, sample):
        raise Forbidden(f"you may read sample {sample_id!r} but not change it")
    return sample


def _owns(call: Call, sample: dict[str, Any]) -> bool:
    return call.identity.admin or sample.get("user") == call.identity.user_id


def _check_group(call: Call, group: str | None) -> None:
    if group is not None and group not in call.identity.groups and not call.identity.admin:
        raise Forbidden(f"you are not in group {group!r}: share with one of your own groups")
