"""GitHub releases: the latest release of a repository, cached with ETags.

:class:`GitHubClient` asks ``GET /repos/{owner}/{repo}/releases/latest`` through the app's
shared :class:`~vtrio.http.HttpClient`. It remembers each answer with its ``ETag`` and sends
``If-None-Match`` next time: a ``304 Not Modified`` returns the remembered release, and GitHub
does not count it against the rate limit. A used-up rate limit (``403`` or ``429`` with
``x-ratelimit-remaining: 0``) is :class:`GitHubRateLimited`, carrying the reset time from
``x-ratelimit-reset``; it is not retried, since the reset may be an hour away.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from vtrio.http import HttpClient
from vtrio.retry import RetriesExhausted, RetryPolicy, describe_outcome, parse_retry_after

__all__ = [
    "DEFAULT_BASE_URL",
    "GitHubBadResponse",
    "GitHubClient",
    "GitHubError",
    "GitHubRateLimited",
    "GitHubUnavailable",
    "Release",
    "ReleaseAsset",
    "ReleaseNotFound",
    "validate_repository",
]

DEFAULT_BASE_URL = "https://api.github.com"
API_VERSION = "2022-11-28"

# GitHub owner (user or organisation) and repository names.
_REPOSITORY = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]{1,100})")

_CACHE_SIZE = 256


class GitHubError(Exception):
    """Base class of every GitHub failure; the message says what to do about it."""


class ReleaseNotFound(GitHubError):
    """GitHub has no published release for this repository (or no such repository)."""

    def __init__(self, repository: str) -> None:
        super().__init__(
            f"GitHub has no published release for {repository!r}: check the repository name; "
            "a private repository also needs a GitHub token that can read it"
        )
        self.repository = repository


class GitHubRateLimited(GitHubError):
    """GitHub's API rate limit is used up; ``reset_at`` (UTC) is when it resets, if known."""

    def __init__(self, message: str, *, reset_at: datetime | None) -> None:
        super().__init__(message)
        self.reset_at = reset_at


class GitHubUnavailable(GitHubError):
    """GitHub kept failing (network errors, 429 or 5xx) until the retry policy gave up."""


class GitHubBadResponse(GitHubError):
    """GitHub answered with something this client does not understand."""


@dataclass(frozen=True)
class ReleaseAsset:
    """A file attached to a release."""

    name: str
    size: int
    download_url: str


@dataclass(frozen=True)
class Release:
    """A published GitHub release. ``name`` falls back to the tag when the release has none."""

    tag: str
    name: str
    published_at: datetime
    assets: tuple[ReleaseAsset, ...]


def validate_repository(repository: str) -> tuple[str, str]:
    """``(owner, name)`` from ``"owner/name"``, or ``ValueError`` if it cannot be one."""
    if not isinstance(repository, str):
        raise ValueError(f"a repository must be a string 'owner/name', got {repository!r}")
    match = _REPOSITORY.fullmatch(repository.strip())
    if match is None or match.group(2) in (".", ".."):
        raise ValueError(
            f"{repository!r} is not a GitHub repository: expected 'owner/name', "
            "e.g. 'virtool/virtool'"
        )
    return match.group(1), match.group(2)


class GitHubClient:
    """Reads GitHub releases through the app's shared client.

    ``token`` (optional) is sent as ``Authorization: Bearer``: it raises the rate limit and
    opens private repositories. Network errors, 429 without a used-up rate limit and 5xx are
    retried with ``retry`` (default: ``RetryPolicy()``).
    """

    def __init__(
        self,
        http: HttpClient,
        *,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._retry = retry if retry is not None else RetryPolicy()
        self._headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
        }
        self._has_token = bool(token)
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # "owner/name" (lower case: GitHub names are case-insensitive) -> (ETag, Release),
        # least recently used first.
        self._cache: OrderedDict[str, tuple[str, Release]] = OrderedDict()

    async def latest_release(self, repository: str) -> Release:
        """The latest published release of ``repository`` (``"owner/name"``).

        Raises ``ValueError`` before any request if ``repository`` is not ``"owner/name"``,
        :class:`ReleaseNotFound` on a 404, :class:`GitHubRateLimited` when the rate limit is
        used up, :class:`GitHubUnavailable` when GitHub kept failing until the retry policy
        gave up, :class:`GitHubBadResponse` for an answer that cannot be read, and
        :class:`GitHubError` for other refusals (a rejected token, say).

        On cancellation: the request in flight is abandoned (the shared client stays usable);
        the cache is left as it was.
        """
        owner, name = validate_repository(repository)
        repository = f"{owner}/{name}"
        key = repository.lower()
        url = f"{self._base_url}/repos/{owner}/{name}/releases/latest"
        cached = self._cache.get(key)
        headers = dict(self._headers)
        if cached is not None:
            headers["If-None-Match"] = cached[0]

        async def attempt() -> httpx.Response:
            response = await self._http.get(url, headers=headers)
            self._raise_if_rate_limited(response)
            return response

        try:
            response = await self._retry.run(attempt, what=f"GitHub latest release of {repository}")
        except RetriesExhausted as exc:
            last = exc.last_response
            if last is not None and last.status_code == 429 and exc.retry_after is not None:
                raise GitHubRateLimited(
                    f"GitHub is rate-limiting these requests and asked to wait "
                    f"{exc.retry_after:.0f} s: try again after that",
                    reset_at=datetime.now(UTC) + timedelta(seconds=exc.retry_after),
                ) from exc
            raise GitHubUnavailable(
                f"GitHub failed to answer for {repository!r}: {exc.reason}. "
                "GitHub may be down; try again later"
            ) from exc

        status = response.status_code
        if status == 304:
            if cached is None:
                raise GitHubBadResponse(
                    f"GitHub answered 304 Not Modified for {repository!r} to a request without "
                    "If-None-Match; if this persists, report it"
                )
            self._cache.move_to_end(key)
            return cached[1]
        if status == 404:
            self._cache.pop(key, None)
            raise ReleaseNotFound(repository)
        if status == 401:
            raise GitHubError(
                f"GitHub rejected the token ({_github_message(response)}): check the "
                "configured GitHub token, or remove it to make anonymous requests"
            )
        if status == 403:
            advice = (
                "check that the GitHub token may read this repository"
                if self._has_token
                else "a GitHub token that may read this repository is needed"
            )
            raise GitHubError(
                f"GitHub refused access to {repository!r} ({_github_message(response)}): {advice}"
            )
        if status != 200:
            raise GitHubBadResponse(
                f"GitHub answered {describe_outcome(response)} for {repository!r}; "
                "if this persists, report it"
            )

        release = _parse_release(response, repository)
        etag = response.headers.get("etag")
        if etag:
            self._cache[key] = (etag, release)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.pop(key, None)
        return release

    def _raise_if_rate_limited(self, response: httpx.Response) -> None:
        """Raise :class:`GitHubRateLimited` for a used-up primary rate limit (never retried)."""
        if response.status_code not in (403, 429):
            return
        headers = response.headers
        if headers.get("x-ratelimit-remaining") == "0":
            reset_at = _reset_time(headers.get("x-ratelimit-reset"))
            limit = headers.get("x-ratelimit-limit")
            message = "GitHub's API rate limit"
            if limit:
                message += f" ({limit} requests per hour)"
            message += " is used up"
            if reset_at is not None:
                message += f"; it resets at {reset_at.isoformat(timespec='seconds')}"
            message += (
                ": wait until then" if self._has_token else ": wait, or configure a GitHub token"
            )
            raise GitHubRateLimited(message, reset_at=reset_at)
        if response.status_code == 403 and "retry-after" in headers:
            wait = parse_retry_after(headers["retry-after"])
            if wait is not None:
                raise GitHubRateLimited(
                    f"GitHub's secondary rate limit was hit; it asked to wait {wait:.0f} s: "
                    "try again after that",
                    reset_at=datetime.now(UTC) + timedelta(seconds=wait),
                )


def _reset_time(value: str | None) -> datetime | None:
    """``x-ratelimit-reset`` (seconds since the epoch) as an aware UTC datetime."""
    if value is None or not value.strip().isdigit():
        return None
    return datetime.fromtimestamp(int(value), UTC)


def _github_message(response: httpx.Response) -> str:
    """The ``message`` of a GitHub error body, or the status line."""
    try:
        message = response.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else describe_outcome(response)


def _parse_release(response: httpx.Response, repository: str) -> Release:
    def bad(reason: str) -> GitHubBadResponse:
        return GitHubBadResponse(
            f"GitHub's release of {repository!r} could not be read ({reason}); "
            "if this persists, report it"
        )

    try:
        data: Any = response.json()
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(data, dict):
        raise bad("not a JSON object")
    try:
        tag = data["tag_name"]
        published = data["published_at"]
        assets_data = data.get("assets") or []
        if not isinstance(tag, str) or not isinstance(published, str):
            raise TypeError("tag_name and published_at must be strings")
        published_at = datetime.fromisoformat(published)
        if published_at.tzinfo is None:
            published_at = published_at.replace(tzinfo=UTC)
        assets = tuple(
            ReleaseAsset(
                name=str(asset["name"]),
                size=int(asset["size"]),
                download_url=str(asset["browser_download_url"]),
            )
            for asset in assets_data
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from None
    name = data.get("name")
    return Release(
        tag=tag,
        name=name if isinstance(name, str) and name else tag,
        published_at=published_at,
        assets=assets,
    )
