"""The baseline's jobs: asyncio tasks, file reads in the thread pool, CPU in the process pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.baseline.db import Database
from vtrio.virtool import DEFAULT_CHUNK_SIZE, ReadStats, chunk_stats

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25


class JobRunner:
    def __init__(
        self,
        db: Database,
        threads: Executor,
        processes: Executor,
        uploads: Path,
        *,
        name: str,
        concurrency: int,
        poll_interval: float = 2.0,
    ) -> None:
        self.db = db
        self.threads = threads
        self.processes = processes
        self.uploads = uploads
        self.name = name
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._claimer: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._claimer = asyncio.create_task(self._claim_forever())

    def notify(self) -> None:
        self._wakeup.set()

    async def _claim_forever(self) -> None:
        await self.db.jobs.update_many(
            {"state": "running", "runner": self.name}, {"$set": {"state": "waiting", "progress": 0}}
        )
        while True:
            if len(self.running) < self.concurrency:
                job = await self.db.jobs.find_one_and_update(
                    {"state": "waiting"},
                    {
                        "$set": {
                            "state": "running",
                            "runner": self.name,
                            "started_at": datetime.now(UTC),
                            "progress": 0,
                        }
                    },
                )
                if job is not None:
                    self.running[job["_id"]] = asyncio.create_task(self._run(job))
                    continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)

    async def _run(self, job: dict[str, Any]) -> None:
        try:
            await self._sample_stats(job)
        except asyncio.CancelledError:
            state = "waiting" if self._closing else "cancelled"
            await asyncio.shield(self._finish(job, state))
            raise
        except Exception as exc:
            log.warning("job %s failed: %s", job["_id"], exc)
            await self._finish(job, "error", error=str(exc))
        else:
            await self._finish(job, "complete", progress=1.0)
        finally:
            self.running.pop(job["_id"], None)
            self.notify()

    async def _finish(self, job: dict[str, Any], state: str, **fields: Any) -> None:
        finished = {"finished_at": datetime.now(UTC)} if state != "waiting" else {}
        await self.db.jobs.update_one(
            {"_id": job["_id"], "runner": self.name},
            {"$set": {"state": state, **finished, **fields}},
        )

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        cancelled = await self.db.jobs.find_one_and_update(
            {"_id": job_id, "state": "waiting"},
            {"$set": {"state": "cancelled", "finished_at": datetime.now(UTC)}},
        )
        if cancelled is not None:
            return cancelled
        task = self.running.get(job_id)
        if task is None:
            return None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        found: dict[str, Any] | None = await self.db.jobs.find_one({"_id": job_id})
        return found

    async def close(self) -> None:
        """Cancel the claimer and every running job; wait for them."""
        self._closing = True
        tasks = [task for task in (self._claimer, *self.running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sample_stats(self, job: dict[str, Any]) -> None:
        sample = await self.db.samples.find_one({"_id": job["sample_id"]})
        if sample is None:
            raise ValueError(f"sample {job['sample_id']!r} was deleted")
        path = self.uploads / sample["reads"]
        quality = await self._read_statistics(path, job["_id"])
        await self.db.samples.update_one({"_id": sample["_id"]}, {"$set": {"quality": quality}})

    async def _read_statistics(self, path: Path, job_id: str) -> dict[str, Any]:
        """The same chunked computation as ``vtrio.fastq.read_statistics`` (plain FASTQ)."""
        loop = asyncio.get_running_loop()
        size = (await loop.run_in_executor(self.threads, path.stat)).st_size or 1
        file = await loop.run_in_executor(self.threads, path.open, "rb")
        try:
            totals = ReadStats()
            records = offset = position = 0
            head = b""
            last_report = time.monotonic()
            data = await loop.run_in_executor(self.threads, file.read, DEFAULT_CHUNK_SIZE)
            while data:
                position += len(data)
                work = loop.run_in_executor(
                    self.processes, chunk_stats, head, data, False, records + 1, offset
                )
                read = loop.run_in_executor(
                    self.threads, file.read, max(DEFAULT_CHUNK_SIZE, len(head) + len(data))
                )
                (stats, consumed), next_data = await asyncio.gather(work, read)
                totals.merge(stats)
                records, offset = records + stats.count, offset + consumed
                joined = head + data
                head = joined[consumed:]
                if time.monotonic() - last_report >= PROGRESS_INTERVAL:
                    last_report = time.monotonic()
                    await self.db.jobs.update_one(
                        {"_id": job_id, "state": "running"},
                        {"$set": {"progress": round(position / size, 4)}},
                    )
                data = next_data
            if head:
                stats, _ = await loop.run_in_executor(
                    self.processes, chunk_stats, head, b"", True, records + 1, offset
                )
                totals.merge(stats)
            return totals.as_quality()
        finally:
            await loop.run_in_executor(self.threads, file.close)
