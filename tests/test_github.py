"""The GitHub releases client against a real local server speaking GitHub's REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import trio

from tests.http_servers import (
    Reply,
    ScriptedServer,
    github_headers,
    github_latest_release,
    github_not_found,
    github_rate_limited,
    github_release_json,
    http_date,
    json_reply,
    serve,
)
from vtrio import __version__
from vtrio.github import (
    GitHubBadResponse,
    GitHubClient,
    GitHubError,
    GitHubRateLimited,
    GitHubUnavailable,
    Release,
    ReleaseAsset,
    ReleaseNotFound,
    validate_repository,
)
from vtrio.http import HttpClient, open_http_client
from vtrio.retry import RetryPolicy

LATEST = "/repos/virtool/virtool/releases/latest"
FAST_RETRY = RetryPolicy(max_attempts=4, max_total=10, base_delay=0.01, max_delay=0.05)
RESET = 1_767_225_600  # 2026-01-01T00:00:00Z

EXPECTED = Release(
    tag="v7.1.2",
    name="v7.1.2 - Fix sample uploads",
    published_at=datetime(2025, 1, 14, 19, 8, 39, tzinfo=UTC),
    assets=(
        ReleaseAsset(
            name="virtool.tar.gz",
            size=48213117,
            download_url="https://github.com/virtool/virtool/releases/download/v7.1.2/virtool.tar.gz",
        ),
        ReleaseAsset(
            name="checksums.txt",
            size=97,
            download_url="https://github.com/virtool/virtool/releases/download/v7.1.2/checksums.txt",
        ),
    ),
)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        running.route(LATEST, github_latest_release(github_release_json()))
        yield running


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    async with open_http_client(connect_timeout=2, read_timeout=2, total_timeout=5) as client:
        yield client


def github(server: ScriptedServer, http: HttpClient, *, token: str | None = None) -> GitHubClient:
    return GitHubClient(http, base_url=server.url, token=token, retry=FAST_RETRY)


async def test_latest_release(server: ScriptedServer, http: HttpClient) -> None:
    release = await github(server, http).latest_release("virtool/virtool")

    assert release == EXPECTED
    assert release.published_at.tzinfo is not None
    [request] = server.requests()
    assert request.path == LATEST
    assert request.headers["user-agent"] == f"vtrio/{__version__}"
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    assert "authorization" not in request.headers
    assert "if-none-match" not in request.headers


async def test_a_token_is_sent_as_bearer(server: ScriptedServer, http: HttpClient) -> None:
    await github(server, http, token="ghp_example").latest_release("virtool/virtool")
    assert server.requests()[0].headers["authorization"] == "Bearer ghp_example"


async def test_a_release_without_a_name_is_named_by_its_tag(
    server: ScriptedServer, http: HttpClient
) -> None:
    data = github_release_json() | {"name": None, "assets": []}
    server.route(LATEST, json_reply(data))
    release = await github(server, http).latest_release("virtool/virtool")
    assert release.name == "v7.1.2"
    assert release.assets == ()


async def test_etag_turns_the_second_call_into_a_304(
    server: ScriptedServer, http: HttpClient
) -> None:
    client = github(server, http)
    first = await client.latest_release("virtool/virtool")
    second = await client.latest_release("virtool/virtool")

    assert second == first == EXPECTED
    one, two = server.requests()
    assert "if-none-match" not in one.headers
    assert two.headers["if-none-match"] == 'W/"4d1fbd7c0a5e6b1f"'


async def test_a_changed_release_replaces_the_cached_one(
    server: ScriptedServer, http: HttpClient
) -> None:
    client = github(server, http)
    await client.latest_release("virtool/virtool")
    server.route(LATEST, github_latest_release(github_release_json(tag="v7.2.0"), etag='W/"77aa"'))
    newer = await client.latest_release("virtool/virtool")
    again = await client.latest_release("virtool/virtool")

    assert newer.tag == again.tag == "v7.2.0"
    requests = server.requests()
    assert requests[1].headers["if-none-match"] == 'W/"4d1fbd7c0a5e6b1f"'  # answered 200
    assert requests[2].headers["if-none-match"] == 'W/"77aa"'  # answered 304


async def test_404_is_release_not_found(server: ScriptedServer, http: HttpClient) -> None:
    server.route("/repos/virtool/nothing/releases/latest", github_not_found())
    with pytest.raises(ReleaseNotFound, match="'virtool/nothing'") as caught:
        await github(server, http).latest_release("virtool/nothing")
    assert caught.value.repository == "virtool/nothing"
    assert len(server.requests()) == 1


@pytest.mark.parametrize("status", [403, 429])
async def test_a_used_up_rate_limit(server: ScriptedServer, http: HttpClient, status: int) -> None:
    server.route(LATEST, github_rate_limited(status, reset=RESET))
    with pytest.raises(GitHubRateLimited, match="resets at 2026-01-01T00:00:00") as caught:
        await github(server, http).latest_release("virtool/virtool")

    assert caught.value.reset_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert "configure a GitHub token" in str(caught.value)
    assert len(server.requests()) == 1  # an hour-long wait is not retried


async def test_a_secondary_rate_limit_is_waited_out(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(
        LATEST,
        json_reply(
            {"message": "You have exceeded a secondary rate limit."},
            status=429,
            headers={"Retry-After": "1", **github_headers(remaining=42)},
        ),
        github_latest_release(github_release_json()),
    )
    release = await github(server, http).latest_release("virtool/virtool")
    assert release == EXPECTED
    first, second = server.requests()
    assert second.time - first.time >= 1.0


async def test_a_secondary_rate_limit_beyond_the_budget(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(
        LATEST,
        json_reply(
            {"message": "You have exceeded a secondary rate limit."},
            status=429,
            headers={"Retry-After": "600"},
        ),
    )
    before = datetime.now(UTC)
    with pytest.raises(GitHubRateLimited, match="asked to wait 600 s") as caught:
        await github(server, http).latest_release("virtool/virtool")
    assert caught.value.reset_at is not None
    assert caught.value.reset_at - before >= timedelta(seconds=599)
    assert len(server.requests()) == 1


async def test_503_with_retry_after_as_a_date_then_success(
    server: ScriptedServer, http: HttpClient
) -> None:
    server.route(
        LATEST,
        Reply(status=503, headers={"Retry-After": http_date(datetime.now(UTC))}),
        github_latest_release(github_release_json()),
    )
    assert await github(server, http).latest_release("virtool/virtool") == EXPECTED
    assert len(server.requests()) == 2


async def test_connection_reset_then_success(server: ScriptedServer, http: HttpClient) -> None:
    server.route(LATEST, Reply(reset=True), github_latest_release(github_release_json()))
    assert await github(server, http).latest_release("virtool/virtool") == EXPECTED
    assert len(server.requests()) == 2


async def test_always_503_gives_up(server: ScriptedServer, http: HttpClient) -> None:
    server.route(LATEST, Reply(status=503))
    started = trio.current_time()
    with pytest.raises(GitHubUnavailable, match=r"after 4 attempts .*HTTP 503.*try again later"):
        await github(server, http).latest_release("virtool/virtool")
    assert trio.current_time() - started < FAST_RETRY.max_total
    assert len(server.requests()) == 4


async def test_a_rejected_token(server: ScriptedServer, http: HttpClient) -> None:
    server.route(LATEST, json_reply({"message": "Bad credentials"}, status=401))
    with pytest.raises(GitHubError, match=r"rejected the token \(Bad credentials\)"):
        await github(server, http, token="ghp_wrong").latest_release("virtool/virtool")


async def test_an_unreadable_release(server: ScriptedServer, http: HttpClient) -> None:
    server.route(LATEST, json_reply({"tag_name": "v1", "published_at": "yesterday"}))
    with pytest.raises(GitHubBadResponse, match="could not be read"):
        await github(server, http).latest_release("virtool/virtool")


@pytest.mark.parametrize(
    "repository", ["virtool", "virtool/", "/virtool", "a/b/c", "-owner/repo", "owner/..", "o w/r"]
)
async def test_bad_repositories_are_refused_before_any_request(
    server: ScriptedServer, http: HttpClient, repository: str
) -> None:
    with pytest.raises(ValueError, match="owner/name"):
        await github(server, http).latest_release(repository)
    assert server.requests() == []


def test_repository_names() -> None:
    assert validate_repository("virtool/virtool") == ("virtool", "virtool")
    assert validate_repository(" octo-org/my.repo_2 ") == ("octo-org", "my.repo_2")
