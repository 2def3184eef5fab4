"""The ``samples.*`` methods: create, get, list, update and delete samples.

A sample names a reads file in ``uploads/``, belongs to the user who created it, and may be shared
with its group or everyone through Virtool's rights fields (see :mod:`vtrio.access`). Methods
take and return documents with ``id``; a sample the caller may not read does not exist for them.
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
from vtrio.uploads import UploadError

if TYPE_CHECKING:
    from vtrio.api import Call
    from vtrio.db import Database


LIST_LIMIT = 100

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1024)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]

methods: Methods[Call] = Methods()


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
    skip: Annotated[int, Field(ge=0, le=1_000_000)] = 0
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
    try:
        await call.app.uploads.resolve(params.reads)
    except UploadError as exc:
        raise RpcError(f"invalid params: reads: {exc}", code=INVALID_PARAMS) from None
    _check_group(call, params.group)
    document = {
        "_id": secrets.token_hex(8),
        **params.model_dump(),
        "user": call.identity.user_id,
        "created_at": datetime.now(UTC),
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
    query: dict[str, Any] = access.readable_filter(call.identity)
    if params.prefix:
        query = {"$and": [query, {"name": {"$regex": "^" + re.escape(params.prefix)}}]}
    listing = {field: True for field in SAMPLE_FIELDS if field != "quality"}
    found = await call.app.db.samples.find(
        query, listing, sort=[("name", 1)], skip=params.skip, limit=params.limit
    )
    total = await call.app.db.samples.count_documents(query)
    return {
        "items": [message_data(sample) for sample in found],
        "total": total,
        "skip": params.skip,
        "limit": params.limit,
    }


@methods.method("samples.update", UpdateParams)
async def update(call: Call, params: UpdateParams) -> dict[str, Any]:
    changes = params.model_dump(exclude={"id"}, exclude_none=True)
    sample = await writable_sample(call, params.id)
    if changes.keys() & _SHARING and not _owns(call, sample):
        raise Forbidden("only the sample's owner or an administrator may change its sharing")
    _check_group(call, changes.get("group"))
    if not changes:
        return message_data(sample)
    try:
        updated = await call.app.db.samples.find_one_and_update(
            {"_id": params.id}, {"$set": changes}
        )
    except DuplicateKey:
        raise Conflict(f"a sample named {params.name!r} exists: choose another name") from None
    if updated is None:
        raise NotFound(f"no sample {params.id!r}")
    if changes.keys() & _SHARING:
        await call.app.db.jobs.update_many(
            {"sample_id": params.id}, {"$set": {"access": access_of(updated)}}, silent=True
        )
    return message_data(updated)


@methods.method("samples.delete", IdParams)
async def delete(call: Call, params: IdParams) -> dict[str, Any]:
    await writable_sample(call, params.id)
    if await call.app.db.samples.delete_one({"_id": params.id}) is None:
        raise NotFound(f"no sample {params.id!r}")
    return {"id": params.id}


async def readable_sample(call: Call, sample_id: str) -> dict[str, Any]:
    """The sample, if the caller may read it; NotFound otherwise (its existence is private)."""
    sample = await call.app.db.samples.find_one({"_id": sample_id})
    if sample is None or not access.can_read(call.identity, sample):
        raise NotFound(f"no sample {sample_id!r}")
    return sample


async def writable_sample(call: Call, sample_id: str) -> dict[str, Any]:
    sample = await readable_sample(call, sample_id)
    if not access.can_write(call.identity, sample):
        raise Forbidden(f"you may read sample {sample_id!r} but not change it")
    return sample


def access_of(sample: dict[str, Any]) -> dict[str, Any]:
    """The fields of a sample that decide who sees it, copied onto its jobs."""
    return {field: sample.get(field) for field in ("user", "group", *access.RIGHTS)}


def _owns(call: Call, sample: dict[str, Any]) -> bool:
    return call.identity.admin or sample.get("user") == call.identity.user_id


def _check_group(call: Call, group: str | None) -> None:
    if group is not None and group not in call.identity.groups and not call.identity.admin:
        raise Forbidden(f"you are not in group {group!r}: share with one of your own groups")
