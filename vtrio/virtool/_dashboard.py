"""The dashboard: a plain HTML, CSS and JavaScript page (no build step) served at ``/``, which
shows a user's samples and jobs live through vtrio.js."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DASHBOARD"]

_FOLDER = Path(__file__).parent / "dashboard"

DASHBOARD = {
    "/": _FOLDER / "index.html",
    "/dashboard.js": _FOLDER / "dashboard.js",
    "/dashboard.css": _FOLDER / "dashboard.css",
}
"""The dashboard's files, by the path they are served at."""
