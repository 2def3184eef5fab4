"""The baseline's MongoDB layer: pymongo's asyncio client, dispatching after each write."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pymongo import AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection

Dispatch = Callable[[str, str, Any], Awaitable[None]]

SILENT = frozenset({"users", "keys"})


def message_data(document: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"id": document.get("_id")}
    data.update((key, value) for key, value in document.items() if key != "_id")
    return data


class Collection:
    """A collection whose writes await the dispatch of their change (as Virtool's did)."""

    def __init__(self, collection: AsyncCollection, dispatch: Dispatch) -> None:
        self._collection = collection
        self._dispatch = dispatch
        self.name = collection.name
        self.silent = collection.name in SILENT

    async def find_one(self, filter: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        return await self._collection.find_one(filter, *args, **kwargs)

    async def find(self, filter: Mapping[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        return await self._collection.find(filter, **kwargs).to_list()

    async def aggregate(self, pipeline: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        cursor = await self._collection.aggregate(pipeline)
        return await cursor.to_list()

    async def insert_one(self, document: Mapping[str, Any], silent: bool = False) -> dict[str, Any]:
        doc = dict(document)
        await self._collection.insert_one(doc)
        if not (silent or self.silent):
            await self._dispatch(self.name, "insert", message_data(doc))
        return doc

    async def find_one_and_update(
        self, filter: Mapping[str, Any], update: Mapping[str, Any], silent: bool = False
    ) -> dict[str, Any] | None:
        doc = await self._collection.find_one_and_update(
            filter, update, return_document=ReturnDocument.AFTER
        )
        if doc is not None and not (silent or self.silent):
            await self._dispatch(self.name, "update", message_data(doc))
        return doc

    # One findAndModify, like vtrio's update_one (Virtool's three round trips were a fault).
    update_one = find_one_and_update

    async def update_many(
        self, filter: Mapping[str, Any], update: Mapping[str, Any], silent: bool = False
    ) -> int:
        ids = [doc["_id"] for doc in await self.find(filter, projection={"_id": True})]
        if not ids:
            return 0
        result = await self._collection.update_many({"_id": {"$in": ids}}, update)
        if not (silent or self.silent):
            async for doc in self._collection.find({"_id": {"$in": ids}}):
                await self._dispatch(self.name, "update", message_data(doc))
        return result.modified_count


class Database:
    def __init__(self, client: AsyncMongoClient, name: str, dispatch: Dispatch) -> None:
        self.client = client
        self._database = client[name]
        self._dispatch = dispatch
        self._collections: dict[str, Collection] = {}

    def __getattr__(self, name: str) -> Collection:
        if name.startswith("_"):
            raise AttributeError(name)
        collection = self._collections.get(name)
        if collection is None:
            collection = Collection(self._database[name], self._dispatch)
            self._collections[name] = collection
        return collection
