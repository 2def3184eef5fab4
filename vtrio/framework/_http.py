"""The app's one HTTP client: every outgoing request goes through it.

:func:`open_http_client` opens a single ``httpx.AsyncClient`` for the whole app, with
``User-Agent: vtrio/<version>`` and the app's other headers set once, the connect and read
timeouts and the connection limit from configuration, and closes it when the service tree
leaves the block. Nothing else in vtrio opens a client: the NCBI client takes the
:class:`HttpClient` it yields.

:class:`HttpClient` adds two things httpx lacks:

* **A total timeout per request.** httpx's timeouts bound each connect, each read and each
  write, so a server trickling one byte at a time can hold a request forever. Every request
  made through :class:`HttpClient` completes, body included, within ``total_timeout`` or fails
  with :class:`TotalTimeout` (an ``httpx.TimeoutException``).
* **Cancellation that leaves the pool usable.** Requests wait for a connection in a trio
  ``CapacityLimiter`` sized like the pool, so httpcore's pool never queues a request itself.
  In httpcore 1.0.9 a request cancelled while queued in the pool can be handed a freshly
  created connection just as it leaves; that connection stays ``CONNECTING`` forever and holds
  a pool slot, and once every slot is held so the client is wedged (httpcore issues #830,
  #961, #1093). A trio limiter forgets a cancelled waiter cleanly, and a request that holds a
  limiter token always finds a connection in the pool at once.

Both only hold for requests made through :class:`HttpClient`'s methods, which is why the
``httpx.AsyncClient`` stays private.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
import trio

from vtrio import __version__

__all__ = ["USER_AGENT", "HttpClient", "TotalTimeout", "open_http_client"]

#: Sent with every request unless the app's headers say otherwise.
USER_AGENT = f"vtrio/{__version__}"


class TotalTimeout(httpx.TimeoutException):
    """A request, response body included, did not complete within the total timeout."""


class HttpClient:
    """The app's shared HTTP client: ``await http.get(url)`` returns the whole response.

    Made by :func:`open_http_client`; usable only inside its ``async with`` block.

    Resource handling:
        Responses come back with their body read and their connection returned to the pool,
        so callers never have to close anything.

    Error handling:
        Statuses are not checked: a ``404`` is a response, not an exception. Transport
        failures raise ``httpx.TransportError`` subclasses, a request over the total timeout
        raises :class:`TotalTimeout`.
    """

    def __init__(
        self, client: httpx.AsyncClient, *, total_timeout: float, max_connections: int
    ) -> None:
        self._client = client
        self._total_timeout = total_timeout
        # One token per pooled connection; see the module docstring for why requests queue
        # here rather than inside httpcore.
        self._connection_slots = trio.CapacityLimiter(max_connections)

    @property
    def headers(self) -> httpx.Headers:
        """The headers sent with every request (a copy: changing it changes nothing)."""
        return self._client.headers.copy()

    async def get(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """``GET url``: see :meth:`request`."""
        return await self.request("GET", url, params=params, headers=headers)

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send one request and return its response with the body read.

        ``headers`` are added to (and override) the client's own for this request only.
        Redirects are followed.

        Error handling:
            The total timeout covers waiting for a free connection, connecting, sending and
            receiving the whole body; beyond it the request is abandoned and
            :class:`TotalTimeout` is raised.

        Resource handling:
            On cancellation the request is abandoned at once; a connection it had started to
            use is closed rather than returned half-read, its slot is freed, and the client
            stays fully usable by other and later requests.
        """
        request = self._client.build_request(
            method, url, params=params, headers=headers, content=content
        )
        with trio.move_on_after(self._total_timeout):
            async with self._connection_slots:
                return await self._client.send(request)
        raise TotalTimeout(
            f"{method} {request.url} did not complete within the total timeout of "
            f"{self._total_timeout:g} s",
            request=request,
        )


def _check_seconds(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@asynccontextmanager
async def open_http_client(
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    total_timeout: float = 60.0,
    max_connections: int = 20,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[HttpClient]:
    """Open the app's HTTP client for the duration of the block.

    ``connect_timeout`` bounds opening a connection, ``read_timeout`` each wait for data (and
    each write), ``total_timeout`` a whole request; ``max_connections`` is the most
    connections open at once, over all hosts. ``headers`` are sent with every request, after
    ``User-Agent: vtrio/<version>`` (so they may replace it).

    Resource handling:
        The client and all its connections are closed when the block exits, whether
        normally, by an exception or by cancellation.
    """
    _check_seconds("connect_timeout", connect_timeout)
    _check_seconds("read_timeout", read_timeout)
    _check_seconds("total_timeout", total_timeout)
    if not (isinstance(max_connections, int) and max_connections >= 1):
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")

    client = _httpx_client(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_connections=max_connections,
        headers=headers,
    )
    async with client:
        yield HttpClient(client, total_timeout=total_timeout, max_connections=max_connections)


def _httpx_client(
    *,
    connect_timeout: float,
    read_timeout: float,
    max_connections: int,
    headers: Mapping[str, str] | None,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` under :class:`HttpClient`: app headers, timeouts, pool size."""
    default_headers = httpx.Headers({"User-Agent": USER_AGENT})
    default_headers.update(headers or {})
    return httpx.AsyncClient(
        headers=default_headers,
        timeout=httpx.Timeout(
            connect=connect_timeout,
            read=read_timeout,
            write=read_timeout,
            pool=None,  # waiting for a connection happens in HttpClient, under the total timeout
        ),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=True,
    )
