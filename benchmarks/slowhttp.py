"""A deliberately slow local HTTP server, for the HTTP cancellation case.

``python -m benchmarks.slowhttp`` prints ``ready PORT`` on stdout, then serves 127.0.0.1:PORT:

- ``GET /slow?id=X``: answers ``200`` at once, then trickles a chunked body, one byte every
  50 ms, forever. When the client closes the connection, the instant (``time.monotonic_ns()``)
  is recorded under ``X``: that is when the request's work really stopped.
- ``GET /closed?id=X``: ``{"closed_ns": N}`` (or ``null`` while connection ``X`` is open).

It exits when its stdin closes (the harness is gone).
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

import trio

closed: dict[str, int | None] = {}


async def handle(stream: trio.SocketStream) -> None:
    try:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        target = request.split(b" ", 2)[1].decode()
        parts = urlsplit(target)
        ident = parse_qs(parts.query).get("id", [""])[0]
        if parts.path == "/closed":
            body = json.dumps({"closed_ns": closed.get(ident)}).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        closed[ident] = None
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                while True:
                    await stream.send_all(b"1\r\nx\r\n")
                    await trio.sleep(0.05)

            nursery.start_soon(trickle)
            # The client's FIN (or reset) ends this read: that is the moment the work stops.
            try:
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass
            closed[ident] = time.monotonic_ns()
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    sys.stdout.write(f"ready {port}\n")
    sys.stdout.flush()
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        while await stdin.receive_some(1024):
            pass
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
