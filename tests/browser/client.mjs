/**
 * vtrio.js in Node, with the `ws` package, against the real server: calls and their errors,
 * a call timeout, change messages in order, a dropped connection recovered, and a refused key.
 *
 * Writes --report: the URLs of the connections of the recovery test, and whether the server
 * had sent the client a position to resume from, for the test to judge the resume itself.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import {
  CallTimeoutError,
  ConnectionLostError,
  RpcError,
  connect,
} from "../../vtrio/framework/static/vtrio.js";
import { args, keyOf, report, waitFor } from "./harness.mjs";

const BOUND = { timeout: 30_000 }; // each test's time limit

/** `ws`, noting the URL of every connection the client opens. */
function recordingWebSocket() {
  const urls = [];
  class Recording extends WebSocket {
    constructor(url, ...rest) {
      super(url, ...rest);
      urls.push(url);
    }
  }
  return { WebSocket: Recording, urls };
}

/** A client of `user`'s, closed after the test; resolves once it is live. */
async function liveClient(t, user, options = {}) {
  const client = connect({ url: args.ws, token: keyOf(user), WebSocket, ...options });
  t.after(() => client.close());
  await waitFor("the client to be live", () => client.status === "live");
  return client;
}

const silentGenbank = { accession: "NC_001477" }; // the test's NCBI never answers

test("calls resolve with results and reject with the server's errors", BOUND, async (t) => {
  const client = await liveClient(t, "alice");
  const info = await client.call("system.info");
  assert.equal(typeof info.version, "string");
  assert.ok(info.connections >= 1);

  const made = await client.call("samples.create", { name: "node-1", reads: "small.fq" });
  assert.deepEqual(await client.call("samples.get", { id: made.id }), made);

  await assert.rejects(client.call("samples.get", { id: "nope" }), (error) => {
    assert.ok(error instanceof RpcError);
    assert.equal(error.code, 404);
    assert.equal(error.method, "samples.get");
    return true;
  });
  await assert.rejects(client.call("samples.create", { name: "no reads" }), (error) => {
    assert.ok(error instanceof RpcError);
    assert.equal(error.code, -32602);
    assert.ok(
      error.data.some(({ field }) => field === "reads"),
      JSON.stringify(error.data),
    );
    return true;
  });
  assert.equal(client.status, "live");
});

test("a call with no answer in time rejects; the connection goes on", BOUND, async (t) => {
  const client = await liveClient(t, "alice", { callTimeout: 400 });
  const started = Date.now();
  await assert.rejects(
    client.call("genbank.get", silentGenbank, { timeout: 200 }),
    CallTimeoutError,
  );
  assert.ok(Date.now() - started < 2_000);
  await assert.rejects(client.call("genbank.get", silentGenbank), CallTimeoutError); // callTimeout
  assert.equal((await client.call("samples.list", { prefix: "nothing-" })).total, 0);
  assert.equal(client.status, "live");
});

test("change messages arrive in order; unsubscribing stops them", BOUND, async (t) => {
  const client = await liveClient(t, "alice");
  const seen = [];
  const unsubscribe = client.subscribe("samples", ({ operation, data }) => {
    seen.push(operation === "delete" ? `delete ${data}` : `${operation} ${data.name} ${data.host}`);
  });
  const jobs = [];
  client.subscribe("jobs", (message) => jobs.push(message));

  // One after the other: a write's message comes before its answer.
  const ids = [];
  for (const n of [1, 2, 3]) {
    ids.push((await client.call("samples.create", { name: `order-${n}`, reads: "small.fq" })).id);
  }
  for (const [index, id] of ids.entries()) {
    await client.call("samples.update", { id, host: `host-${index + 1}` });
  }
  assert.deepEqual(seen, [
    "insert order-1 ",
    "insert order-2 ",
    "insert order-3 ",
    "update order-1 host-1",
    "update order-2 host-2",
    "update order-3 host-3",
  ]);

  // More at once than the server takes in flight (16): the client queues the rest, so none is
  // refused as busy, and every insert arrives once.
  seen.length = 0;
  const names = Array.from({ length: 24 }, (_, n) => `burst-${String(n).padStart(2, "0")}`);
  await Promise.all(
    names.map((name) => client.call("samples.create", { name, reads: "small.fq" })),
  );
  assert.deepEqual(
    [...seen].sort(),
    names.map((name) => `insert ${name} `),
  );
  assert.equal(jobs.length, 0, "samples' messages go to samples' handlers alone");

  unsubscribe();
  const after = [];
  client.subscribe("samples", ({ data }) => after.push(data.name));
  await client.call("samples.create", { name: "after", reads: "small.fq" });
  assert.deepEqual(after, ["after"]); // came: the first handler would have had it too
  assert.equal(seen.length, names.length);
});

test("a dropped connection is recovered, with what changed meanwhile", BOUND, async (t) => {
  const { WebSocket: Recording, urls } = recordingWebSocket();
  // Time enough for the change below to be made before the client is back.
  const client = connect({
    url: args.ws,
    token: keyOf("alice"),
    WebSocket: Recording,
    reconnectDelay: 2_000,
  });
  t.after(() => client.close());
  let reloads = 0;
  const listed = [];
  client.on("reload", async () => {
    reloads += 1;
    listed.splice(0, Infinity, ...(await client.call("samples.list", { prefix: "away" })).items);
  });
  const inserted = [];
  client.subscribe(
    "samples",
    ({ operation, data }) => operation === "insert" && inserted.push(data.name),
  );
  await waitFor("the client to be live", () => client.status === "live");
  assert.equal(reloads, 1, "the first connection reloads");
  const positionBefore = client.position;

  const pending = client.call("genbank.get", silentGenbank, { timeout: 20_000 });
  client._socket.terminate(); // the TCP connection, gone without a close frame
  await assert.rejects(pending, ConnectionLostError);
  assert.ok(["resuming", "connecting"].includes(client.status), client.status);

  const other = await liveClient(t, "alice");
  await other.call("samples.create", { name: "away-1", reads: "small.fq" });
  assert.notEqual(client.status, "live", "the change was made while the client was away");

  const shown = () => inserted.includes("away-1") || listed.some(({ name }) => name === "away-1");
  await waitFor("the client back live, with away-1", () => client.status === "live" && shown());
  assert.equal(urls.length, 2);
  assert.deepEqual((await client.call("samples.list", { prefix: "away" })).total, 1);
  await report({ urls, positionBefore, reloads });
});

test("a refused key signs the client out, for good", BOUND, async () => {
  const { WebSocket: Recording, urls } = recordingWebSocket();
  const client = connect({
    url: args.ws,
    token: "vt_wrong",
    WebSocket: Recording,
    reconnectDelay: 50,
  });
  const statuses = [];
  client.on("status", (status) => statuses.push(status));
  const pending = client.call("system.info"); // waits for the connection, which is refused
  await assert.rejects(pending, ConnectionLostError);
  await waitFor("signed-out", () => client.status === "signed-out");
  // Twenty reconnection delays: a client that retried would have.
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  assert.equal(urls.length, 1);
  assert.deepEqual(statuses, ["signed-out"]);
  await assert.rejects(client.call("system.info"), ConnectionLostError); // at once
  client.close();
  assert.equal(client.status, "closed");
});

test("close() ends the client: its calls fail, it reconnects no more", BOUND, async (t) => {
  const { WebSocket: Recording, urls } = recordingWebSocket();
  const client = await liveClient(t, "alice", { WebSocket: Recording });
  const pending = client.call("genbank.get", silentGenbank, { timeout: 20_000 });
  client.close();
  await assert.rejects(pending, ConnectionLostError);
  assert.equal(client.status, "closed");
  assert.equal(client._socket, null);
  assert.equal(urls.length, 1);
});
