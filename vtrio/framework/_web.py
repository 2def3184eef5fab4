"""The plain-HTTP side of the port: health, readiness, metrics and the static files.

- ``GET /health``: 200 while the process runs its service tree (a liveness probe).
- ``GET /ready``: 200 when MongoDB answers, the change feed is live and the server is not
  stopping; 503 otherwise, with a small JSON body saying which (a load balancer's check: a
  stopping server turns 503 before it closes its connections).
- ``GET /metrics``: Prometheus text.
- The static files: loaded once at start-up from the folders they are given; served from
  memory with their content type and an ``ETag`` (``If-None-Match`` gets 304). Only the files
  named at start-up exist: nothing outside them can be asked for.

Anything else is 404, a method other than GET or HEAD 405. None of it needs an API key.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
import trio

from vtrio.framework._listener import HttpResponse
from vtrio.framework._metrics import CONTENT_TYPE, Metrics

__all__ = ["CLIENT_SCRIPT", "StaticFile", "Web", "load_static"]

CLIENT_SCRIPT = Path(__file__).parent / "static" / "vtrio.js"
"""vtrio.js, the browser client of the websocket protocol (an ES module, no dependencies)."""

Readiness = Callable[[], Awaitable[dict[str, object]]]
"""``await ready()``: what readiness depends on, each ``True`` when ready."""

_JSON = "application/json"
_TYPES = {".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


async def load_static(files: Mapping[str, Path]) -> dict[str, StaticFile]:
    """The files served at these paths, read now (``trio.Path``)."""
    loaded = {}
    for url_path, source in files.items():
        body = await trio.Path(source).read_bytes()
        guessed = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        content_type = _TYPES.get(source.suffix, guessed)
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        loaded[url_path] = StaticFile(body, content_type, etag)
    return loaded


class Web:
    """Answers the plain-HTTP requests of the listener (module docstring)."""

    def __init__(
        self, *, ready: Readiness, metrics: Metrics, static: Mapping[str, StaticFile]
    ) -> None:
        self._ready = ready
        self._metrics = metrics
        self._static = dict(static)

    async def __call__(self, request: h11.Request) -> HttpResponse:
        path = urlsplit(request.target.decode("latin-1")).path
        if request.method not in (b"GET", b"HEAD"):
            return HttpResponse(405, b"GET or HEAD only\n", headers=(("Allow", "GET, HEAD"),))
        if path == "/health":
            return HttpResponse(200, b'{"status":"ok"}\n', _JSON)
        if path == "/ready":
            return await self._readiness()
        if path == "/metrics":
            return HttpResponse(200, await self._metrics.render(), CONTENT_TYPE)
        file = self._static.get(path)
        if file is None:
            return HttpResponse(404, b"no such page\n")
        return self._file(file, request)

    async def _readiness(self) -> HttpResponse:
        state = await self._ready()
        ready = all(value is True for value in state.values())
        body = json.dumps({"ready": ready, **state}).encode() + b"\n"
        return HttpResponse(200 if ready else 503, body, _JSON)

    def _file(self, file: StaticFile, request: h11.Request) -> HttpResponse:
        headers = (("ETag", file.etag), ("Cache-Control", "no-cache"))
        if dict(request.headers).get(b"if-none-match", b"").decode("latin-1") == file.etag:
            return HttpResponse(304, b"", file.content_type, headers)
        return HttpResponse(200, file.body, file.content_type, headers)
