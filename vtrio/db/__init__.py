"""MongoDB for vtrio: pymongo in worker threads; writes dispatch their changes once acknowledged.

- :func:`open_database` connects (checking with a ``ping``) and yields a :class:`Database`.
- ``db.samples`` / ``db["samples"]`` is a :class:`Collection`: async reads, and writes that pass
  ``(collection name, "insert" | "update" | "delete", data)`` to the ``dispatch`` function.
- :data:`COLLECTIONS` declares how each collection dispatches (:class:`CollectionSpec`).
- Failures raise :class:`DatabaseError` subclasses, pymongo's exception as ``__cause__``.

Cancellation: a write, once sent, completes and dispatches before the caller sees ``Cancelled``;
a read returns at once (see :mod:`vtrio.db.collection`).
"""

from vtrio.db.client import Database, open_database
from vtrio.db.collection import IDS_PER_COMMAND, Collection, UpdateManyResult
from vtrio.db.collections import COLLECTIONS
from vtrio.db.errors import (
    DatabaseError,
    DatabaseTimeout,
    DatabaseUnavailable,
    DocumentInvalid,
    DuplicateKey,
    mask_url,
)
from vtrio.db.spec import CollectionSpec, Dispatch

__all__ = [
    "COLLECTIONS",
    "IDS_PER_COMMAND",
    "Collection",
    "CollectionSpec",
    "Database",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "Dispatch",
    "DocumentInvalid",
    "DuplicateKey",
    "UpdateManyResult",
    "mask_url",
    "open_database",
]
