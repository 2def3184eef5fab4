"""The baseline: the design vtrio replaces, rebuilt as a benchmark peer (aiohttp + asyncio).

This package is the one place asyncio appears in the project. It exists only so that the
benchmarks can measure vtrio against the original design on the same machine, in the same run,
doing the same work; nothing in vtrio imports it.

It is meant to be a faithful peer: the design of Virtool's aiohttp/motor backend, with no
deliberate handicap. Each choice, and why:

- **Server**: ``aiohttp.web.run_app`` (what Virtool used) on a socket bound here, listening with
  the same backlog trio uses (``SOMAXCONN``), access log off (vtrio logs no line per request).
  It raises its soft open-file limit to the hard one at start, as vtrio does, so that it may
  hold as many connections.
- **Websocket** ``GET /ws``: ``web.WebSocketResponse(autoping=True, heartbeat=5,
  max_msg_size=1 MiB)``, Virtool's heartbeat and vtrio's default ``--max-message-size``. The API
  key is checked after the handshake (close code 4000 if missing or wrong), with the same two
  MongoDB lookups as vtrio (``keys`` by hash, then ``users``); a client receives changes from
  then on. (vtrio checks the key before it answers the handshake; the benchmarks wait until
  each server counts its clients, through ``system.info``, before they measure.)
- **Dispatcher**: every change is serialised ONCE (``vtrio.framework.dumps``, so the bytes are
  vtrio's but for the ``position`` field, which the baseline has no notion of) and sent with
  ``await ws.send_str(text)`` to each connection in turn, the visibility rule (vtrio's own)
  judged per connection. Virtool called ``send_json`` per connection, which re-serialises the
  same message for every client; that cost has nothing to do with concurrency, so the baseline
  does not pay it (it is the faster of the two options). One message per frame: the original
  had no batching. A dead connection is skipped (the working version of Virtool's check).
- **Changes come from the process that wrote them**: a write dispatches its change in process,
  to this process's clients, before it answers (the design vtrio replaced with MongoDB's change
  stream). So the baseline has no positions, no resume, no multi-instance story: changes made
  by another process (another instance, ``mongosh``) reach no client.
- **JSON-RPC**: the same methods, parameters (vtrio's pydantic models), database calls and
  answers as vtrio, so a call does the same work on both: ``samples.update`` is one
  ``findAndModify`` whose filter checks the caller's rights, a second look only to explain a
  refusal, like vtrio's; ``system.info`` counts the jobs by state with the same aggregate.
  Each request runs in a task of its own (``asyncio.create_task``), at most 16 per connection
  like vtrio; a connection's tasks are cancelled when it closes. Every frame is parsed
  (``json.loads``) and validated by pydantic, whatever its size under ``max_msg_size``: the
  original design had neither vtrio's 256 KiB cut-off for JSON-RPC frames nor its count of
  parameters before pydantic (the ``fairness`` benchmark measures what they are worth).
- **MongoDB**: pymongo's asyncio client (``pymongo.AsyncMongoClient``, the successor of motor),
  default pool settings. A wrapper dispatches after each acknowledged write, awaiting the
  dispatch like Virtool's did. No coalescing of concurrent calls (vtrio's design, not the
  original's).
- **Executors**: ``loop.run_in_executor`` with a ``ThreadPoolExecutor`` (also the loop's default
  executor, as Virtool set it) for file reads, and a ``ProcessPoolExecutor`` (default start
  method, as Virtool used it) for CPU work.
- **Jobs**: ``sample_stats`` reads the FASTQ file in the same 4 MiB chunks as vtrio (reads in
  the thread pool, reading ahead one chunk) and runs the very same ``vtrio.virtool.chunk_stats``
  in the process pool; progress is written at most every 0.25 s. Plain FASTQ only (the
  benchmark files are plain). ``jobs.cancel`` cancels the job's task; the chunk already in a
  worker runs on, as ``concurrent.futures`` cannot stop it.
- **Shutdown** (SIGINT, via ``run_app``): ``on_shutdown`` closes each websocket in turn with
  1001 (awaiting each close), then calls ``shutdown(wait=True)`` on both executors (blocking the
  loop, as Virtool did), then cancels the running jobs; ``on_cleanup`` closes the MongoDB client.
"""
