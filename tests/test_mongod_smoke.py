import pymongo


def test_session_mongod_is_primary(mongodb_url: str, db_name: str) -> None:
    with pymongo.MongoClient(mongodb_url) as client:
        assert client.admin.command("hello")["isWritablePrimary"]
        client[db_name].things.insert_one({"a": 1})
        assert client[db_name].things.count_documents({}) == 1
