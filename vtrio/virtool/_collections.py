"""The application's collections, declared once: what their change messages carry, and who
sees them. The framework's database and hub both take :data:`COLLECTIONS`."""

from __future__ import annotations

from collections.abc import Mapping

from pymongo import IndexModel

from vtrio.framework import CollectionSpec
from vtrio.virtool._access import ACCESS_FIELDS, job_visible_to, sample_visible_to

SAMPLE_FIELDS = ("name", "host", "isolate", "reads", "created_at", "quality", *ACCESS_FIELDS)
"""Everything a client shows of a sample, its access fields included."""

JOB_FIELDS = (
    "task", "sample_id", "user", "access", "state", "progress", "error", "cancel_requested",
    "created_at", "started_at", "finished_at",
)  # fmt: skip
"""Everything a client shows of a job; ``access`` is its sample's access fields, copied."""

ACTIVE_STATES = ("waiting", "running")
"""The states of a job that is not over: a sample has at most one such job per task."""

COLLECTIONS: Mapping[str, CollectionSpec] = {
    "settings": CollectionSpec(silent=True),
    "users": CollectionSpec(silent=True, indexes=[IndexModel("name", unique=True)]),
    "keys": CollectionSpec(
        silent=True, indexes=[IndexModel("hash", unique=True), IndexModel("user_id")]
    ),
    "samples": CollectionSpec(
        projection=SAMPLE_FIELDS,
        visible_to=sample_visible_to,
        indexes=[
            # Unique per owner, not across users: a conflict tells only of your own samples.
            IndexModel(
                [("user", 1), ("name", 1)],
                unique=True,
                partialFilterExpression={"name": {"$type": "string"}},
            ),
            IndexModel("name", name="name_1"),  # once unique: the declaration replaces it
        ],
    ),
    "jobs": CollectionSpec(
        projection=JOB_FIELDS,
        visible_to=job_visible_to,
        indexes=[
            IndexModel([("state", 1), ("created_at", 1)]),
            IndexModel("sample_id"),
            IndexModel(
                [("sample_id", 1), ("task", 1)],
                name="one_active_job_per_sample_and_task",
                unique=True,
                partialFilterExpression={"state": {"$in": list(ACTIVE_STATES)}},
            ),
        ],
    ),
}
