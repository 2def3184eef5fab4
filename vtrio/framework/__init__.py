"""vtrio's framework: a structured-concurrency server for live MongoDB data over websockets.

It knows nothing of Virtool: it imports nothing from :mod:`vtrio.virtool`, and what it offers an
application is exactly the names below. Its private modules, one per service or concern:

- ``_services``: running one service of the tree (:func:`service`), and the one stop signal
  they all watch (:class:`Stopping`)
- ``_mongod``, ``_keeper``: the embedded ``mongod`` (service ``mongodb``)
- ``_http``: the one shared ``httpx`` client (service ``http``)
- ``_executors``: cancellable thread and process pools (service ``executors``)
- ``_database``, ``_collection``, ``_documents``, ``_db_errors``, ``_workers``: MongoDB through
  pymongo in worker threads (service ``database``)
- ``_feed``: MongoDB's change stream as the feed of committed changes, with positions and history
- ``_changes``: what a committed change is, and each collection's declaration of who sees it
- ``_hub``: every open connection, and the fan-out of changes to them (service ``hub``)
- ``_connection``: one websocket connection, one object
- ``_listener``: the listening socket: HTTP requests and websocket handshakes (``listener``)
- ``_web``: plain HTTP on the same port: health, readiness, metrics, static files
- ``_metrics``: the server's metrics, for Prometheus
- ``_wire``: the wire format, to the byte
- ``_rpc``: JSON-RPC 2.0 on the same websocket
- ``_client``: a client of a running server (``vtrio call`` / ``vtrio watch``)
"""

from vtrio.framework._changes import Change as Change
from vtrio.framework._changes import CollectionSpec as CollectionSpec
from vtrio.framework._changes import Operation as Operation
from vtrio.framework._changes import Visibility as Visibility
from vtrio.framework._client import DEFAULT_URL as DEFAULT_URL
from vtrio.framework._client import ClientError as ClientError
from vtrio.framework._client import call as call
from vtrio.framework._client import watch as watch
from vtrio.framework._collection import Collection as Collection
from vtrio.framework._collection import UpdateManyResult as UpdateManyResult
from vtrio.framework._connection import Connection as Connection
from vtrio.framework._connection import ConnectionLimits as ConnectionLimits
from vtrio.framework._database import Database as Database
from vtrio.framework._database import open_database as open_database
from vtrio.framework._db_errors import DatabaseError as DatabaseError
from vtrio.framework._db_errors import DatabaseTimeout as DatabaseTimeout
from vtrio.framework._db_errors import DatabaseUnavailable as DatabaseUnavailable
from vtrio.framework._db_errors import DocumentInvalid as DocumentInvalid
from vtrio.framework._db_errors import DuplicateKey as DuplicateKey
from vtrio.framework._db_errors import mask_url as mask_url
from vtrio.framework._executors import Executors as Executors
from vtrio.framework._executors import ExecutorStatistics as ExecutorStatistics
from vtrio.framework._executors import NotPicklable as NotPicklable
from vtrio.framework._executors import WorkerCrashed as WorkerCrashed
from vtrio.framework._executors import open_executors as open_executors
from vtrio.framework._feed import FEED_NAME as FEED_NAME
from vtrio.framework._feed import ChangeFeed as ChangeFeed
from vtrio.framework._feed import HistoryLost as HistoryLost
from vtrio.framework._feed import Position as Position
from vtrio.framework._http import USER_AGENT as USER_AGENT
from vtrio.framework._http import HttpClient as HttpClient
from vtrio.framework._http import TotalTimeout as TotalTimeout
from vtrio.framework._http import open_http_client as open_http_client
from vtrio.framework._hub import Hub as Hub
from vtrio.framework._hub import open_hub as open_hub
from vtrio.framework._listener import HttpHandler as HttpHandler
from vtrio.framework._listener import HttpResponse as HttpResponse
from vtrio.framework._listener import ListenerLimits as ListenerLimits
from vtrio.framework._listener import serve_listener as serve_listener
from vtrio.framework._metrics import Metrics as Metrics
from vtrio.framework._mongod import MongodError as MongodError
from vtrio.framework._mongod import find_mongod as find_mongod
from vtrio.framework._mongod import run_mongod as run_mongod
from vtrio.framework._mongod import running_mongod as running_mongod
from vtrio.framework._rpc import BUSY as BUSY
from vtrio.framework._rpc import CONFLICT as CONFLICT
from vtrio.framework._rpc import FORBIDDEN as FORBIDDEN
from vtrio.framework._rpc import INTERNAL_ERROR as INTERNAL_ERROR
from vtrio.framework._rpc import INVALID_PARAMS as INVALID_PARAMS
from vtrio.framework._rpc import INVALID_REQUEST as INVALID_REQUEST
from vtrio.framework._rpc import MAX_BATCH as MAX_BATCH
from vtrio.framework._rpc import MAX_REQUEST_SIZE as MAX_REQUEST_SIZE
from vtrio.framework._rpc import METHOD_NOT_FOUND as METHOD_NOT_FOUND
from vtrio.framework._rpc import NOT_FOUND as NOT_FOUND
from vtrio.framework._rpc import PARSE_ERROR as PARSE_ERROR
from vtrio.framework._rpc import SHUTTING_DOWN as SHUTTING_DOWN
from vtrio.framework._rpc import UPSTREAM_FAILED as UPSTREAM_FAILED
from vtrio.framework._rpc import Busy as Busy
from vtrio.framework._rpc import Conflict as Conflict
from vtrio.framework._rpc import Forbidden as Forbidden
from vtrio.framework._rpc import Method as Method
from vtrio.framework._rpc import Methods as Methods
from vtrio.framework._rpc import NotFound as NotFound
from vtrio.framework._rpc import Params as Params
from vtrio.framework._rpc import RpcEndpoint as RpcEndpoint
from vtrio.framework._rpc import RpcError as RpcError
from vtrio.framework._rpc import UpstreamFailed as UpstreamFailed
from vtrio.framework._services import ServiceError as ServiceError
from vtrio.framework._services import Stopping as Stopping
from vtrio.framework._services import background_tasks as background_tasks
from vtrio.framework._services import describe as describe
from vtrio.framework._services import service as service
from vtrio.framework._web import CLIENT_SCRIPT as CLIENT_SCRIPT
from vtrio.framework._web import Web as Web
from vtrio.framework._web import load_static as load_static
from vtrio.framework._wire import CloseCode as CloseCode
from vtrio.framework._wire import dumps as dumps
from vtrio.framework._wire import to_wire as to_wire

__all__ = [
    "BUSY",
    "CLIENT_SCRIPT",
    "CONFLICT",
    "DEFAULT_URL",
    "FEED_NAME",
    "FORBIDDEN",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_BATCH",
    "MAX_REQUEST_SIZE",
    "METHOD_NOT_FOUND",
    "NOT_FOUND",
    "PARSE_ERROR",
    "SHUTTING_DOWN",
    "UPSTREAM_FAILED",
    "USER_AGENT",
    "Busy",
    "Change",
    "ChangeFeed",
    "ClientError",
    "CloseCode",
    "Collection",
    "CollectionSpec",
    "Conflict",
    "Connection",
    "ConnectionLimits",
    "Database",
    "DatabaseError",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "DocumentInvalid",
    "DuplicateKey",
    "ExecutorStatistics",
    "Executors",
    "Forbidden",
    "HistoryLost",
    "HttpClient",
    "HttpHandler",
    "HttpResponse",
    "Hub",
    "ListenerLimits",
    "Method",
    "Methods",
    "Metrics",
    "MongodError",
    "NotFound",
    "NotPicklable",
    "Operation",
    "Params",
    "Position",
    "RpcEndpoint",
    "RpcError",
    "ServiceError",
    "Stopping",
    "TotalTimeout",
    "UpdateManyResult",
    "UpstreamFailed",
    "Visibility",
    "Web",
    "WorkerCrashed",
    "background_tasks",
    "call",
    "describe",
    "dumps",
    "find_mongod",
    "load_static",
    "mask_url",
    "open_database",
    "open_executors",
    "open_http_client",
    "open_hub",
    "run_mongod",
    "running_mongod",
    "serve_listener",
    "service",
    "to_wire",
    "watch",
]
