"""The methods of no other module: ``system.info``, ``uploads.list`` and ``genbank.get``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from pydantic import StringConstraints

from vtrio import __version__
from vtrio.framework import (
    INVALID_PARAMS,
    ChangeFeed,
    Collection,
    Method,
    Methods,
    NotFound,
    Params,
    RpcError,
    UpstreamFailed,
)
from vtrio.virtool._auth import Identity
from vtrio.virtool._job_methods import count_by_state
from vtrio.virtool._ncbi import AccessionNotFound, NCBIClient, NCBIError
from vtrio.virtool._uploads import Uploads


class NoParams(Params):
    pass


class GenBankParams(Params):
    accession: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]


class SystemMethods:
    """``system.info``, ``uploads.list`` and ``genbank.get``.

    ``connections()`` counts the server's open connections; ``changes`` is its change feed;
    ``instance`` names this server among those sharing the database; ``started_at`` is its
    start, in ``time.monotonic()`` seconds.
    """

    def __init__(
        self,
        jobs: Collection,
        uploads: Uploads,
        ncbi: NCBIClient,
        connections: Callable[[], int],
        changes: ChangeFeed | None,
        *,
        instance: str,
        started_at: float,
    ) -> None:
        self._jobs = jobs
        self._uploads = uploads
        self._ncbi = ncbi
        self._connections = connections
        self._changes = changes
        self._instance = instance
        self._started_at = started_at

    def methods(self) -> Methods:
        return Methods(
            {
                "system.info": Method(NoParams, self.info),
                "uploads.list": Method(NoParams, self.uploads),
                "genbank.get": Method(GenBankParams, self.genbank),
            }
        )

    async def info(self, caller: Identity, params: NoParams) -> dict[str, Any]:
        """The server's version, instance and uptime (seconds), its open connections, its jobs
        by state, and its change feed: ``position`` (this connection may resume from it: every
        change after it arrived before this answer or comes after it), ``lag`` (seconds from a
        change's commit to its reading, last measured) and ``live``."""
        feed = self._changes
        return {
            "version": __version__,
            "instance": self._instance,
            "uptime": round(time.monotonic() - self._started_at, 3),
            "connections": self._connections(),
            "jobs": await count_by_state(self._jobs),
            "position": None if feed is None else str(feed.position),
            "changes": None if feed is None else {"lag": round(feed.lag, 3), "live": feed.live},
        }

    async def uploads(self, caller: Identity, params: NoParams) -> list[dict[str, Any]]:
        """The files in ``uploads/`` that samples may name: ``name``, ``size``, ``modified_at``."""
        return await self._uploads.list()

    async def genbank(self, caller: Identity, params: GenBankParams) -> dict[str, Any]:
        """The GenBank record of ``accession`` from NCBI, through the shared HTTP client.

        404 if NCBI has no such record, 502 if NCBI failed; cancellation abandons the request
        (the shared client stays usable).
        """
        try:
            record = await self._ncbi.fetch_genbank(params.accession)
        except AccessionNotFound as exc:
            raise NotFound(str(exc)) from None
        except ValueError as exc:
            raise RpcError(f"invalid params: accession: {exc}", code=INVALID_PARAMS) from None
        except NCBIError as exc:
            raise UpstreamFailed(str(exc)) from None
        return {**asdict(record), "accession_version": record.accession_version}
