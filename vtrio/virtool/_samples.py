"""The ``samples.*`` methods: create, get, list, update and delete samples.

A sample names a reads file in ``uploads/``, belongs to the user who created it, and may be shared
with its group or everyone through Virtool's rights fields (see :mod:`vtrio.virtool._access`).
Names are unique per owner, so that an answer never tells anyone about a sample they cannot
read. Methods take and return documents with ``id``; a sample the caller may not read does not
exist for them (404), one they may read but not change is forbidden to change (403).

Cancellation (the caller's connection closed): a write already sent completes (see
:mod:`vtrio.framework`); nothing else is left half done, because every method makes one write,
except ``samples.delete``, whose cancelling of the sample's jobs may then not happen (the jobs
fail at their end, finding the sample gone), and ``samples.update`` of the sharing fields,
whose copy onto the jobs may then not happen.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from vtrio.framework import (
    INVALID_PARAMS,
    Collection,
    Conflict,
    DuplicateKey,
    Forbidden,
    Method,
    Methods,
    NotFound,
    Params,
    RpcError,
    to_wire,
)
from vtrio.virtool import _access as access
from vtrio.virtool._auth import Identity
from vtrio.virtool._collections import SAMPLE_FIELDS
from vtrio.virtool._uploads import UploadError, Uploads

LIST_LIMIT = 100
"""The most samples one ``samples.list`` call returns."""

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1024)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]

# What samples.list returns of each sample: everything but the (large) read statistics.
_LISTING = {field: True for field in SAMPLE_FIELDS if field != "quality"}
_SHARING = frozenset({"group", *access.RIGHTS})
_OWNERS = frozenset({"name", *_SHARING})
"""Fields only the owner or an administrator may change. The name is one: names are unique per
owner, so a rename by anyone else could learn the names of samples they cannot read."""


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
    after: Annotated[str, StringConstraints(max_length=1024)] | None = None
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


class SampleMethods:
    """``samples.*``, over the ``samples`` and ``jobs`` collections and the uploads folder.

    ``cancel_jobs(sample_id)`` stops a sample's waiting and running jobs (the job runner's).
    """

    def __init__(
        self,
        samples: Collection,
        jobs: Collection,
        uploads: Uploads,
        cancel_jobs: Callable[[str], Awaitable[None]],
    ) -> None:
        self._samples = samples
        self._jobs = jobs
        self._uploads = uploads
        self._cancel_jobs = cancel_jobs

    def methods(self) -> Methods:
        return Methods(
            {
                "samples.create": Method(CreateParams, self.create),
                "samples.get": Method(IdParams, self.get),
                "samples.list": Method(ListParams, self.list),
                "samples.update": Method(UpdateParams, self.update),
                "samples.delete": Method(IdParams, self.delete),
            }
        )

    async def create(self, caller: Identity, params: CreateParams) -> dict[str, Any]:
        """Create a sample owned by the caller. Its ``group``, if given, must be one of theirs."""
        _check_group(caller, params.group)
        try:
            await self._uploads.resolve(params.reads)
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
            "user": caller.user_id,
            "created_at": now(),
            "quality": None,
        }
        try:
            inserted = await self._samples.insert_one(document)
        except DuplicateKey:
            raise _name_taken(params.name) from None
        return to_wire(inserted)

    async def get(self, caller: Identity, params: IdParams) -> dict[str, Any]:
        return to_wire(await readable_sample(self._samples, caller, params.id))

    async def list(self, caller: Identity, params: ListParams) -> dict[str, Any]:
        """The caller's readable samples by name, ``limit`` at a time.

        Page with the cursor ``after`` (the ``next`` of the previous page: no sample is skipped
        or repeated however the collection changes in between) or with ``skip``. ``total``
        counts every readable sample matching ``prefix``, whatever the page.
        """
        query: dict[str, Any] = access.readable_filter(caller)
        if params.prefix:
            # An anchored, escaped prefix: MongoDB answers it from the name index.
            query = {"$and": [query, {"name": {"$regex": "^" + re.escape(params.prefix)}}]}
        page = query if params.after is None else {"$and": [query, _after(params.after)]}
        found = await self._samples.find(
            page, _LISTING, sort=[("name", 1), ("_id", 1)], skip=params.skip,
            limit=params.limit + 1,
        )  # fmt: skip
        more = len(found) > params.limit
        items = [to_wire(sample) for sample in found[: params.limit]]
        return {
            "items": items,
            "total": await self._samples.count_documents(query),
            "next": json.dumps([items[-1]["name"], items[-1]["id"]]) if more else None,
        }

    async def update(self, caller: Identity, params: UpdateParams) -> dict[str, Any]:
        """Change the given fields. The name and the sharing fields (``group`` and the rights)
        only the owner or an administrator may change, and only to a group of theirs."""
        changes = params.model_dump(exclude={"id"}, exclude_none=True)
        _check_group(caller, changes.get("group"))
        if not changes:
            return to_wire(await writable_sample(self._samples, caller, params.id))
        sharing = bool(changes.keys() & _SHARING)
        owners = bool(changes.keys() & _OWNERS)
        # One round trip when the caller may make the change: the rights are checked in the
        # write itself (so none revoked a moment ago is bypassed); only a refusal costs a
        # second look, to tell the caller why.
        query = {"$and": [{"_id": params.id}, access.writable_filter(caller)]}
        if owners and not caller.admin:
            query["$and"].append({"user": caller.user_id})
        try:
            updated = await self._samples.find_one_and_update(query, {"$set": changes})
        except DuplicateKey:
            raise _name_taken(params.name) from None
        if updated is None:
            raise await self._refusal(caller, params.id, owners)
        if sharing:
            # Jobs follow their sample: those who now may read it see its jobs too.
            await self._jobs.update_many(
                {"sample_id": params.id}, {"$set": {"access": access.access_of(updated)}}
            )
        return to_wire(updated)

    async def _refusal(self, caller: Identity, sample_id: str, owners: bool) -> RpcError:
        """Why an update matched nothing, as the error to raise."""
        sample = await writable_sample(self._samples, caller, sample_id)  # NotFound, Forbidden
        if owners and not (caller.admin or sample.get("user") == caller.user_id):
            return Forbidden(
                "only the sample's owner or an administrator may rename it or change its sharing"
            )
        return NotFound(f"no sample {sample_id!r}")  # it changed hands since the write

    async def delete(self, caller: Identity, params: IdParams) -> dict[str, Any]:
        """Delete the sample and cancel its waiting or running jobs (which stay, as history)."""
        await writable_sample(self._samples, caller, params.id)  # 404 or 403, as for update
        # Jobs first: a job that found its sample gone would end in "error", not "cancelled".
        await self._cancel_jobs(params.id)
        query = {"$and": [{"_id": params.id}, access.writable_filter(caller)]}
        if await self._samples.delete_one(query) is None:
            raise NotFound(f"no sample {params.id!r}")
        return {"id": params.id}


def now() -> datetime:
    """The time as MongoDB stores it (milliseconds), so that what a write returns and what a
    later read returns are equal."""
    time = datetime.now(UTC)
    return time.replace(microsecond=time.microsecond // 1000 * 1000)


async def readable_sample(samples: Collection, caller: Identity, sample_id: str) -> dict[str, Any]:
    """The sample, if the caller may read it; NotFound otherwise (its existence is private)."""
    sample = await samples.find_one({"_id": sample_id})
    if sample is None or not access.can_read(caller, sample):
        raise NotFound(f"no sample {sample_id!r}")
    return sample


async def writable_sample(samples: Collection, caller: Identity, sample_id: str) -> dict[str, Any]:
    """The sample, if the caller may change it; NotFound or Forbidden otherwise."""
    sample = await readable_sample(samples, caller, sample_id)
    if not access.can_write(caller, sample):
        raise Forbidden(f"you may read sample {sample_id!r} but not change it")
    return sample


def _after(cursor: str) -> dict[str, Any]:
    """The filter for the page after ``cursor`` (a ``next`` of samples.list)."""
    try:
        name, sample_id = json.loads(cursor)
    except (ValueError, TypeError):
        raise RpcError("invalid params: after: not a cursor from samples.list",
                       code=INVALID_PARAMS) from None  # fmt: skip
    return {"$or": [{"name": {"$gt": name}}, {"name": name, "_id": {"$gt": sample_id}}]}


def _name_taken(name: str | None) -> Conflict:
    return Conflict(
        f"a sample named {name!r} exists already among its owner's: choose another name"
    )


def _check_group(caller: Identity, group: str | None) -> None:
    if group is not None and group not in caller.groups and not caller.admin:
        raise Forbidden(f"you are not in group {group!r}: share with one of your own groups")
