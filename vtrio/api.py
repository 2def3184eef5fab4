"""The methods clients call over ``/ws``: the table, and the small methods of no other module.

``samples.*`` live in :mod:`vtrio.samples`, ``jobs.*`` in :mod:`vtrio.jobs`; this module adds
``system.info``, ``uploads.list`` and ``genbank.get`` and joins them into :data:`methods`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import StringConstraints

from vtrio import __version__, jobs, samples
from vtrio.auth import Identity
from vtrio.ncbi import AccessionNotFound, NCBIError
from vtrio.rpc import (
    INVALID_PARAMS,
    Methods,
    NotFound,
    Params,
    RpcEndpoint,
    RpcError,
    UpstreamFailed,
)

if TYPE_CHECKING:
    from vtrio.server import App


@dataclass(frozen=True)
class Call:
    """What every method receives first: the running app and who is calling."""

    app: App
    identity: Identity


methods: Methods[Call] = Methods()


class NoParams(Params):
    pass


class GenBankParams(Params):
    accession: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=32)]


@methods.method("system.info", NoParams)
async def system_info(call: Call, params: NoParams) -> dict[str, Any]:
    """The server's version and uptime (seconds), its open connections, its jobs by state."""
    return {
        "version": __version__,
        "uptime": round(time.monotonic() - call.app.started_at, 3),
        "connections": call.app.dispatcher.connection_count,
        "jobs": await jobs.count_by_state(call.app.db),
    }


@methods.method("uploads.list", NoParams)
async def uploads_list(call: Call, params: NoParams) -> list[dict[str, Any]]:
    """The files in ``uploads/`` that samples may name: ``name``, ``size``, ``modified_at``."""
    return await call.app.uploads.list()


@methods.method("genbank.get", GenBankParams)
async def genbank_get(call: Call, params: GenBankParams) -> dict[str, Any]:
    """The GenBank record of ``accession`` from NCBI, through the shared HTTP client.

    404 if NCBI has no such record, 502 if NCBI failed; cancellation abandons the request
    (the shared client stays usable).
    """
    try:
        record = await call.app.ncbi.fetch_genbank(params.accession)
    except AccessionNotFound as exc:
        raise NotFound(str(exc)) from None
    except ValueError as exc:
        raise RpcError(f"invalid params: accession: {exc}", code=INVALID_PARAMS) from None
    except NCBIError as exc:
        raise UpstreamFailed(str(exc)) from None
    return {**asdict(record), "accession_version": record.accession_version}


methods.update(samples.methods)
methods.update(jobs.methods)


def endpoint(app: App, *, max_in_flight: int = 16) -> RpcEndpoint[Call]:
    """The JSON-RPC endpoint for ``app``'s connections."""
    return RpcEndpoint(
        methods, lambda client: Call(app, client.identity), max_in_flight=max_in_flight
    )
