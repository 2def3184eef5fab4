"""vtrio's side of the offload benchmark: MongoDB round trips through vtrio's database layer
(``vtrio.framework.open_database``), and the same calls made with pymongo directly from one
thread (the floor the offload is measured against).

``python -m benchmarks.offload_probe vtrio|pymongo --url URL --db NAME --ops N`` prints one
JSON line: seconds per ``find_one`` by id and per ``insert_one`` one call at a time (for vtrio,
``insert_one`` returns after the write fence: once its change feed has read the insert and
handed it to its subscribers), and ``find_one`` calls per second with 32 callers at once (vtrio
only).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import pymongo
import trio

CONCURRENCY = 32


def _pymongo(args: argparse.Namespace) -> dict[str, Any]:
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(args.url) as client:
        collection: Any = client[args.db].samples
        ids = [secrets.token_hex(8) for _ in range(args.ops)]
        for i in ids[:10]:  # warm up the connection and the collection
            collection.insert_one({"_id": "w" + i, "name": i})
            collection.find_one({"_id": "w" + i})
        started = time.perf_counter()
        for i in ids:
            collection.insert_one({"_id": i, "name": i, "host": "", "quality": None})
        insert = (time.perf_counter() - started) / len(ids)
        started = time.perf_counter()
        for i in ids:
            collection.find_one({"_id": i})
        find = (time.perf_counter() - started) / len(ids)
        client.drop_database(args.db)
    return {"find_one_s": find, "insert_one_s": insert}


async def _vtrio(args: argparse.Namespace) -> dict[str, Any]:
    from vtrio.framework import open_database
    from vtrio.virtool import COLLECTIONS

    dispatched = 0

    def publish(changes: Sequence[Any]) -> None:
        nonlocal dispatched
        dispatched += len(changes)

    # The write's full price: it returns once the change feed has dispatched it.
    async with open_database(args.url, args.db, collections=COLLECTIONS) as db:
        assert db.changes is not None
        db.changes.subscribe(publish)
        ids = [secrets.token_hex(8) for _ in range(args.ops)]
        for i in ids[:10]:
            await db.samples.insert_one({"_id": "w" + i, "name": "w" + i})
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
        async with trio.open_nursery() as nursery:
            for k in range(CONCURRENCY):
                nursery.start_soon(reader, ids[k::CONCURRENCY])
        concurrent = len(ids) / (time.perf_counter() - started)
        assert dispatched >= len(ids)
        await db.command("dropDatabase")
    return {"find_one_s": find, "insert_one_s": insert, "find_one_concurrent_per_s": concurrent}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offload_probe")
    parser.add_argument("side", choices=("vtrio", "pymongo"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--ops", type=int, default=1000)
    args = parser.parse_args()
    result = trio.run(_vtrio, args) if args.side == "vtrio" else _pymongo(args)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
