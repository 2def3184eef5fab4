"""Jobs: ``sample_stats`` on generated FASTQ files with known statistics, live state and
progress, cancellation that kills the worker, and no job lost to a shutdown or a crash."""

from __future__ import annotations

import gzip
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import trio

from tests.live import settings_for
from tests.rpc_client import RpcClient, is_change, rpc_client
from vtrio.config import Settings
from vtrio.framework import CONFLICT, FORBIDDEN, INVALID_PARAMS, NOT_FOUND
from vtrio.server import App, open_app
from vtrio.virtool import DEFAULT_CHUNK_SIZE, runner_name

# --- FASTQ files whose statistics are known without computing them ---------------------------

# Three reads whose statistics are worked out by hand below. Phred+33: 'I' is 40, '!' 0, '#' 2,
# '+' 10, '5' 20, '?' 30.
TRIO = b"@r1 first\nACGTN\n+\nIIII!\n@r2\nGGCC\n+r2\n#+5?\n@r3\nAT\n+\nII\n"


def trio_quality(copies: int) -> dict[str, Any]:
    """The statistics of ``copies`` copies of TRIO: the same for any number of copies, but for
    the counts. Read means: (4 * 40 + 0) / 5 = 32, (2 + 10 + 20 + 30) / 4 = 15.5, 40."""
    distribution = [0] * 41
    distribution[15] = distribution[32] = distribution[40] = copies
    return {
        "count": 3 * copies,
        "bases": 11 * copies,
        "length": [2, 5],
        "gc": 600 / 11,  # C, G, then G, G, C, C: 6 of every 11 bases
        "mean_quality_by_position": [82 / 3, 30.0, 30.0, 35.0, 0.0],
        "quality_distribution": distribution,
    }


# One-base reads: the most records per byte, so the slowest file to compute, byte for byte
# (~0.3 s a 4 MiB chunk here): a job on it runs long enough to be caught running.
TINY_READ = b"@\nA\n+\nI\n"
SLOW_READS = 4 * DEFAULT_CHUNK_SIZE // len(TINY_READ)  # four chunks


def tiny_quality(reads: int) -> dict[str, Any]:
    return {
        "count": reads,
        "bases": reads,
        "length": [1, 1],
        "gc": 0.0,
        "mean_quality_by_position": [40.0],
        "quality_distribution": [0] * 40 + [reads],
    }


def settings(mongodb_url: str, db_name: str, data_dir: Path, **overrides: Any) -> Settings:
    return settings_for(mongodb_url, db_name, data_dir, **overrides)


@pytest.fixture
async def app(mongodb_url: str, db_name: str, tmp_path: Path) -> AsyncIterator[App]:
    async with open_app(settings(mongodb_url, db_name, tmp_path)) as app:
        write_reads(app, "slow.fq", TINY_READ * SLOW_READS)
        yield app


@pytest.fixture
async def client(app: App) -> AsyncIterator[RpcClient]:
    async with rpc_client(app) as client:
        yield client


def write_reads(app: App, name: str, data: bytes) -> None:
    (app.settings.data_dir / "uploads" / name).write_bytes(data)


async def new_sample(client: RpcClient, reads: str, name: str | None = None, **fields: Any) -> str:
    params = {"name": name or reads, "reads": reads, **fields}
    return (await client.call("samples.create", params))["id"]


async def start_job(client: RpcClient, sample_id: str) -> str:
    job = await client.call("jobs.create", {"task": "sample_stats", "sample_id": sample_id})
    assert job["state"] == "waiting"
    assert job["progress"] == 0
    return job["id"]


async def job_in_state(client: RpcClient, job_id: str, state: str, timeout: float = 30) -> dict:
    """The job's change message that shows it in ``state``."""
    change = await client.change(is_change("jobs", "update", id=job_id, state=state), timeout)
    return change["data"]


async def progress_seen(client: RpcClient, job_id: str) -> float:
    """Wait for a progress report of the running job, above 0 and below 1."""

    def partly_done(change: dict) -> bool:
        return (
            is_change("jobs", "update", id=job_id, state="running")(change)
            and 0 < change["data"]["progress"] < 1
        )

    return (await client.change(partly_done, timeout=30))["data"]["progress"]


# --- computing ----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
async def test_sample_stats_gives_the_known_statistics(
    app: App, client: RpcClient, compress: bool
) -> None:
    copies = 250_000  # ~12 MB: three chunks, so that the per-chunk results are merged
    data = TRIO * copies
    write_reads(app, "reads", gzip.compress(data, compresslevel=1) if compress else data)
    sample_id = await new_sample(client, "reads")
    job_id = await start_job(client, sample_id)

    running = await job_in_state(client, job_id, "running")
    assert running["progress"] == 0
    complete = await job_in_state(client, job_id, "complete")
    assert complete["progress"] == 1.0
    assert complete["started_at"] <= complete["finished_at"]

    sample = await client.change(is_change("samples", "update", id=sample_id))
    assert sample["data"]["quality"] == trio_quality(copies)
    assert (await client.call("samples.get", {"id": sample_id}))["quality"] == trio_quality(copies)
    job = await client.call("jobs.get", {"id": job_id})
    assert (job["state"], job["progress"], job["sample_id"]) == ("complete", 1.0, sample_id)
    assert (await client.call("system.info"))["jobs"]["complete"] == 1


async def test_progress_is_live_and_throttled(app: App, client: RpcClient) -> None:
    sample_id = await new_sample(client, "slow.fq")
    job_id = await start_job(client, sample_id)
    await job_in_state(client, job_id, "running")
    start = trio.current_time()
    reports = []
    while True:
        change = await client.change(is_change("jobs", "update", id=job_id), timeout=30)
        reports.append(change["data"]["progress"])
        if change["data"]["state"] != "running":
            break
    duration = trio.current_time() - start
    assert change["data"]["state"] == "complete"
    assert reports == sorted(reports)
    assert 0 < reports[0] < 1
    assert reports[-1] == 1.0
    # At most one report a PROGRESS_INTERVAL (0.25 s), plus the final ones.
    assert len(reports) <= duration / 0.25 + 3
    quality = (await client.call("samples.get", {"id": sample_id}))["quality"]
    assert quality == tiny_quality(SLOW_READS)


async def test_a_broken_file_fails_the_job(app: App, client: RpcClient) -> None:
    write_reads(app, "broken.fq", b"@r1\nACGT\n+\nIIII\n@r2\nACGT\n+\nII\n")
    sample_id = await new_sample(client, "broken.fq")
    job_id = await start_job(client, sample_id)
    failed = await job_in_state(client, job_id, "error")
    assert "record 2" in failed["error"]
    assert (await client.call("samples.get", {"id": sample_id}))["quality"] is None
    # A failed job does not block the next one.
    write_reads(app, "broken.fq", TRIO)
    retry = await start_job(client, sample_id)
    await job_in_state(client, retry, "complete")
    assert (await client.call("samples.get", {"id": sample_id}))["quality"] == trio_quality(1)


# --- the methods' errors ------------------------------------------------------------------


async def test_job_methods_errors(app: App, client: RpcClient) -> None:
    write_reads(app, "small.fq", TRIO)
    sample_id = await new_sample(client, "slow.fq")
    readonly = await new_sample(client, "small.fq", all_read=True)
    missing = await client.fails("jobs.create", {"task": "sample_stats", "sample_id": "nope"})
    assert missing.code == NOT_FOUND
    bad_task = await client.fails("jobs.create", {"task": "sum", "sample_id": sample_id})
    assert bad_task.code == INVALID_PARAMS
    assert "task" in bad_task.message

    job_id = await start_job(client, sample_id)
    duplicate = await client.fails("jobs.create", {"task": "sample_stats", "sample_id": sample_id})
    assert duplicate.code == CONFLICT
    assert "already has a sample_stats job" in duplicate.message
    assert (await client.fails("jobs.get", {"id": "nope"})).code == NOT_FOUND
    assert (await client.fails("jobs.cancel", {"id": "nope"})).code == NOT_FOUND

    async with rpc_client(app, "bob") as bob:
        error = await bob.fails("jobs.create", {"task": "sample_stats", "sample_id": readonly})
        assert error.code == FORBIDDEN
        other_job = await start_job(client, readonly)
        assert (await bob.call("jobs.get", {"id": other_job}))["sample_id"] == readonly
        assert (await bob.fails("jobs.cancel", {"id": other_job})).code == FORBIDDEN
        assert (await bob.fails("jobs.get", {"id": job_id})).code == NOT_FOUND
        assert [job["id"] for job in (await bob.call("jobs.list"))["items"]] == [other_job]

    listing = await client.call("jobs.list")
    assert listing["total"] == 2
    assert [job["id"] for job in listing["items"]] == [other_job, job_id]  # newest first
    by_sample = await client.call("jobs.list", {"sample_id": sample_id})
    assert [job["id"] for job in by_sample["items"]] == [job_id]
    assert (await client.fails("jobs.list", {"state": "done"})).code == INVALID_PARAMS

    await client.call("jobs.cancel", {"id": job_id})  # frees the one worker for the other job
    await job_in_state(client, other_job, "complete")
    ended = await client.fails("jobs.cancel", {"id": other_job})
    assert ended.code == CONFLICT
    assert "complete" in ended.message
    complete = await client.call("jobs.list", {"state": "complete"})
    assert [job["id"] for job in complete["items"]] == [other_job]
    # A sample whose job ended may have another.
    assert await start_job(client, sample_id)


# --- cancelling ---------------------------------------------------------------------------


async def test_cancel_waiting_and_running_jobs(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    async with (
        open_app(settings(mongodb_url, db_name, tmp_path, jobs=1)) as app,
        rpc_client(app) as client,
    ):
        write_reads(app, "slow.fq", TINY_READ * SLOW_READS)
        first = await start_job(client, await new_sample(client, "slow.fq", name="first"))
        second = await start_job(client, await new_sample(client, "slow.fq", name="second"))
        await progress_seen(client, first)
        # --jobs 1: the second waits while the first runs.
        assert (await client.call("jobs.get", {"id": second}))["state"] == "waiting"
        cancelled = await client.call("jobs.cancel", {"id": second})
        assert cancelled["state"] == "cancelled"

        start = trio.current_time()
        cancelled = await client.call("jobs.cancel", {"id": first})
        assert trio.current_time() - start < 0.1
        assert cancelled["state"] == "cancelled"
        assert 0 < cancelled["progress"] < 1
        assert app.executors.statistics().processes_busy == 0
        await job_in_state(client, first, "cancelled")
        info = await client.call("system.info")
        assert info["jobs"]["cancelled"] == 2
        assert info["jobs"]["running"] == info["jobs"]["waiting"] == 0
        assert (await client.fails("jobs.cancel", {"id": first})).code == CONFLICT


def trio_parallel_workers() -> list[int]:
    """Pids of this process's children that are multiprocessing workers."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(int(stat.parent.name))
    return workers


def computing(pid: int) -> bool:
    """Whether the process is on a CPU now (state R) rather than waiting for work."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
    except (OSError, IndexError):
        return False


async def test_cancelling_kills_the_worker_computing_the_job(app: App, client: RpcClient) -> None:
    job_id = await start_job(client, await new_sample(client, "slow.fq"))
    await progress_seen(client, job_id)  # its worker is started and has done a chunk
    with trio.fail_after(30):
        while not (busy := [pid for pid in trio_parallel_workers() if computing(pid)]):
            await trio.sleep(0.001)
    # No checkpoint between seeing the worker compute and cancelling: JobRunner.cancel cancels
    # before its first await, so the worker is still busy with this job when it is cancelled.
    start = trio.current_time()
    cancelled = await app.jobs.cancel(job_id)
    elapsed = trio.current_time() - start

    assert cancelled is not None and cancelled["state"] == "cancelled"
    assert elapsed < 0.1
    [worker] = busy
    assert not await trio.Path(f"/proc/{worker}").exists()  # killed and reaped, not a zombie
    assert app.executors.statistics().processes_busy == 0
    # The pool replaces the worker: the next job runs.
    write_reads(app, "small.fq", TRIO)
    again = await start_job(client, await new_sample(client, "small.fq"))
    await job_in_state(client, again, "complete")


async def test_deleting_a_sample_cancels_its_jobs(app: App, client: RpcClient) -> None:
    sample_id = await new_sample(client, "slow.fq")
    job_id = await start_job(client, sample_id)
    await job_in_state(client, job_id, "running")
    await client.call("samples.delete", {"id": sample_id})
    assert (await client.call("jobs.get", {"id": job_id}))["state"] == "cancelled"
    assert app.jobs.running_jobs == []


# --- no job lost --------------------------------------------------------------------------


async def test_a_job_stopped_by_a_shutdown_runs_after_the_restart(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    config = settings(mongodb_url, db_name, tmp_path)
    async with open_app(config) as app:
        write_reads(app, "slow.fq", TINY_READ * SLOW_READS)
        async with rpc_client(app) as client:
            sample_id = await new_sample(client, "slow.fq")
            job_id = await start_job(client, sample_id)
            await progress_seen(client, job_id)  # three chunks to go: the shutdown comes first
    # Shut down: the job went back to waiting, its work lost, nothing stored.
    job, sample = stored(mongodb_url, db_name, ("jobs", job_id), ("samples", sample_id))
    assert (job["state"], job["progress"]) == ("waiting", 0)
    assert sample["quality"] is None

    async with open_app(config) as app, rpc_client(app) as client:
        with trio.fail_after(30):
            while (await client.call("jobs.get", {"id": job_id}))["state"] != "complete":
                await client.change(is_change("jobs", "update", id=job_id))
        sample = await client.call("samples.get", {"id": sample_id})
        assert sample["quality"] == tiny_quality(SLOW_READS)


async def test_jobs_left_running_by_a_crash_run_again(
    mongodb_url: str, db_name: str, tmp_path: Path
) -> None:
    config = settings(mongodb_url, db_name, tmp_path)
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "r.fq").write_bytes(TRIO)
    sample = {"_id": "s1", "name": "s1", "reads": "r.fq", "user": "alice", "quality": None}
    access = {"user": "alice", "group": None, "group_read": False, "all_read": False}
    crashed = {"task": "sample_stats", "sample_id": "s1", "access": access, "progress": 0.5}
    # What a crash leaves: jobs marked as running by this server, and one by another server.
    mongo: Any
    with pymongo.MongoClient(mongodb_url) as mongo:
        db = mongo[db_name]
        db.samples.insert_one(sample)
        db.jobs.insert_one({"_id": "ours", **crashed, "state": "running",
                            "runner": runner_name(config.data_dir)})  # fmt: skip
        db.jobs.insert_one({"_id": "theirs", **crashed, "sample_id": "s2", "state": "running",
                            "runner": "elsewhere:/data"})  # fmt: skip

    async with open_app(config) as app:
        with trio.fail_after(30):
            while (await app.db.jobs.find_one({"_id": "ours"}) or {}).get("state") != "complete":
                await trio.sleep(0.02)
    ours, theirs, stats = stored(
        mongodb_url, db_name, ("jobs", "ours"), ("jobs", "theirs"), ("samples", "s1")
    )
    assert ours["state"] == "complete"
    assert stats["quality"] == trio_quality(1)
    assert (theirs["state"], theirs["progress"]) == ("running", 0.5)


def stored(mongodb_url: str, db_name: str, *wanted: tuple[str, str]) -> list[dict[str, Any]]:
    """The documents ``(collection, id)`` as MongoDB holds them, read with no app running."""
    mongo: Any
    with pymongo.MongoClient(mongodb_url) as mongo:
        found: list[dict[str, Any] | None] = [
            mongo[db_name][collection].find_one({"_id": id_}) for collection, id_ in wanted
        ]
    assert all(document is not None for document in found), found
    return [document for document in found if document is not None]
