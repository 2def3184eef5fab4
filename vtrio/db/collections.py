"""The app's collections and how each dispatches its changes: the one place they are declared.

:func:`vtrio.db.open_database` uses :data:`COLLECTIONS` unless given another mapping. A collection
not listed here dispatches whole documents; list it with a projection to send less, or as
``silent`` to send nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from vtrio.db.spec import CollectionSpec

# Everything a client shows of a sample, and the fields vtrio.access decides visibility by.
SAMPLE_FIELDS = (
    "name", "host", "isolate", "reads", "user", "group", "created_at",
    "group_read", "group_write", "all_read", "all_write", "quality",
)  # fmt: skip
# Jobs carry their sample's access fields (under "access") so the same rule applies to them.
JOB_FIELDS = (
    "task", "sample_id", "user", "access", "state", "progress", "error",
    "created_at", "started_at", "finished_at",
)  # fmt: skip

COLLECTIONS: Mapping[str, CollectionSpec] = {
    "users": CollectionSpec(silent=True),
    "keys": CollectionSpec(silent=True),
    "samples": CollectionSpec(projection=SAMPLE_FIELDS),
    "jobs": CollectionSpec(projection=JOB_FIELDS),
}
