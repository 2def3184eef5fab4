"""The ``jobs.*`` methods: create, get, list and cancel jobs (run by :mod:`vtrio.virtool._jobs`).

A job follows its sample: who may read the sample may read its jobs, who may change the sample
may start and cancel them (see :mod:`vtrio.virtool._access`).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from vtrio.framework import (
    Collection,
    Conflict,
    DuplicateKey,
    Forbidden,
    Method,
    Methods,
    NotFound,
    Params,
    to_wire,
)
from vtrio.virtool import _access as access
from vtrio.virtool._auth import Identity
from vtrio.virtool._jobs import STATES, Job, JobRunner
from vtrio.virtool._samples import now, writable_sample

Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CreateParams(Params):
    task: Literal["sample_stats"]
    sample_id: Id


class IdParams(Params):
    id: Id


class ListParams(Params):
    state: Literal["waiting", "running", "complete", "cancelled", "error"] | None = None
    sample_id: Id | None = None
    skip: Annotated[int, Field(ge=0, le=10_000)] = 0
    limit: Annotated[int, Field(ge=1, le=100)] = 25


class JobMethods:
    """``jobs.*``, over the ``jobs`` and ``samples`` collections and the job runner."""

    def __init__(self, jobs: Collection, samples: Collection, runner: JobRunner) -> None:
        self._jobs = jobs
        self._samples = samples
        self._runner = runner

    def methods(self) -> Methods:
        return Methods(
            {
                "jobs.create": Method(CreateParams, self.create),
                "jobs.get": Method(IdParams, self.get),
                "jobs.list": Method(ListParams, self.list),
                "jobs.cancel": Method(IdParams, self.cancel),
            }
        )

    async def create(self, caller: Identity, params: CreateParams) -> dict[str, Any]:
        """Queue a job for a sample the caller may change; 409 if one is already waiting or
        running for it."""
        sample = await writable_sample(self._samples, caller, params.sample_id)
        try:
            job = await self._jobs.insert_one(
                {
                    "_id": secrets.token_hex(8),
                    "task": params.task,
                    "sample_id": params.sample_id,
                    "user": caller.user_id,
                    "access": access.access_of(sample),
                    "state": "waiting",
                    "progress": 0,
                    "created_at": now(),
                }
            )
        except DuplicateKey:
            raise Conflict(
                f"sample {params.sample_id!r} already has a {params.task} job waiting or running: "
                "wait for it, or cancel it"
            ) from None
        self._runner.notify()
        return to_wire(job)

    async def get(self, caller: Identity, params: IdParams) -> dict[str, Any]:
        return to_wire(await self._readable_job(caller, params.id))

    async def list(self, caller: Identity, params: ListParams) -> dict[str, Any]:
        """The caller's readable jobs, newest first, optionally of one state or sample."""
        query: dict[str, Any] = access.readable_filter(caller, within="access")
        for name in ("state", "sample_id"):
            if (value := getattr(params, name)) is not None:
                query = {"$and": [query, {name: value}]}
        found = await self._jobs.find(
            query, sort=[("created_at", -1), ("_id", 1)], skip=params.skip, limit=params.limit
        )
        return {
            "items": [to_wire(job) for job in found],
            "total": await self._jobs.count_documents(query),
        }

    async def cancel(self, caller: Identity, params: IdParams) -> dict[str, Any]:
        """Cancel a waiting or running job; return it afterwards (``cancelled``, or
        ``complete`` or ``error`` if it ended first). 409 if it had already ended."""
        job = await self._readable_job(caller, params.id)
        if not access.can_write(caller, access.access_fields(job)):
            raise Forbidden(f"you may read job {params.id!r} but not cancel it")
        cancelled = await self._runner.cancel(params.id)
        if cancelled is None:
            job = await self._readable_job(caller, params.id)
            raise Conflict(f"job {params.id!r} is {job['state']} already: it cannot be cancelled")
        return to_wire(cancelled)

    async def _readable_job(self, caller: Identity, job_id: str) -> Job:
        job = await self._jobs.find_one({"_id": job_id})
        if job is None or not access.job_visible_to(caller, job):
            raise NotFound(f"no job {job_id!r}")
        return job


async def count_by_state(jobs: Collection) -> dict[str, int]:
    """How many jobs there are in each state."""
    counts = dict.fromkeys(STATES, 0)
    for group in await jobs.aggregate([{"$group": {"_id": "$state", "count": {"$sum": 1}}}]):
        if group["_id"] in counts:  # a state another program wrote is not one of ours
            counts[group["_id"]] = group["count"]
    return counts
