"""The baseline's side of the offload benchmark: the same calls through its asyncio layer.

``python -m benchmarks.baseline.offload_probe --url URL --db NAME --ops N`` prints the same
JSON as ``benchmarks.offload_probe vtrio``: seconds per ``find_one`` by id and per
``insert_one`` (awaiting its dispatch, to no connection), and ``find_one`` calls per second
with 32 callers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from typing import Any

from pymongo import AsyncMongoClient

from benchmarks.baseline.db import Database
from benchmarks.baseline.dispatcher import Dispatcher

CONCURRENCY = 32


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client: AsyncMongoClient = AsyncMongoClient(args.url)
    dispatcher = Dispatcher()  # no connections: a dispatch serialises and reaches no one
    db = Database(client, args.db, dispatcher.dispatch)
    try:
        ids = [secrets.token_hex(8) for _ in range(args.ops)]
        for i in ids[:10]:
            await db.samples.insert_one({"_id": "w" + i, "name": i})
            await db.samples.find_one({"_id": "w" + i})
        started = time.perf_counter()
        for i in ids:
            await db.samples.insert_one({"_id": i, "name": i, "host": "", "quality": None})
        insert = (time.perf_counter() - started) / len(ids)
        started = time.perf_counter()
        for i in ids:
            await db.samples.find_one({"_id": i})
        find = (time.perf_counter() - started) / len(ids)

        async def reader(chunk: list[str]) -> None:
            for i in chunk:
                await db.samples.find_one({"_id": i})

        started = time.perf_counter()
        await asyncio.gather(*(reader(ids[k::CONCURRENCY]) for k in range(CONCURRENCY)))
        concurrent = len(ids) / (time.perf_counter() - started)
        await client.drop_database(args.db)
    finally:
        await client.close()
    return {"find_one_s": find, "insert_one_s": insert, "find_one_concurrent_per_s": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline.offload_probe")
    parser.add_argument("--url", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--ops", type=int, default=1000)
    args = parser.parse_args()
    sys.stdout.write(json.dumps(asyncio.run(run(args))) + "\n")


if __name__ == "__main__":
    main()
