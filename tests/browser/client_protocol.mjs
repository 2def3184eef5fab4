/**
 * vtrio.js against a scripted stand-in for the server (a `ws` server in this process): the
 * parts of the protocol that are hard to bring about with the real one. Resuming from the last
 * position after each kind of drop, 4003 (history lost), changes held during a reload, the
 * in-flight limit, the backoff, and the browser's online/offline/visibility hints (faked).
 */

import assert from "node:assert/strict";
import { once } from "node:events";
import { test } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { MAX_IN_FLIGHT, connect } from "../../vtrio/framework/static/vtrio.js";
import { waitFor } from "./harness.mjs";

const BOUND = { timeout: 30_000 }; // each test's time limit

/**
 * A /ws that answers system.info with its `position` and samples.list with nothing, leaves
 * every other call unanswered, and lets the test talk to each connection.
 */
async function fakeServer(t) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await once(wss, "listening");
  const server = {
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    position: "p-0005",
    connections: [],
    /** The test may replace this: how to answer `request` on `connection`. */
    answer(connection, request) {
      if (request.method === "system.info")
        connection.reply(request, { position: server.position });
      if (request.method === "samples.list")
        connection.reply(request, { items: [], total: 0, next: null });
    },
    /** The latest connection, once there are `count`. */
    async connection(count) {
      await waitFor(`connection ${count}`, () => server.connections.length >= count);
      return server.connections[count - 1];
    },
  };
  wss.on("connection", (socket, request) => {
    const connection = {
      socket,
      since: new URL(request.url, server.url).searchParams.get("since"),
      requests: [],
      send: (payload) => socket.send(JSON.stringify(payload)),
      reply: (request, result) => connection.send({ jsonrpc: "2.0", id: request.id, result }),
    };
    socket.on("message", (data) => {
      const request = JSON.parse(data);
      connection.requests.push(request);
      server.answer(connection, request);
    });
    server.connections.push(connection);
  });
  t.after(() => {
    for (const socket of wss.clients) socket.terminate();
    wss.close();
  });
  return server;
}

function change(id, position, operation = "update") {
  return { interface: "samples", operation, data: { id }, position };
}

async function live(client) {
  await waitFor("the client to be live", () => client.status === "live");
}

function newClient(t, server, options = {}) {
  const client = connect({
    url: server.url,
    token: "vt_test",
    WebSocket,
    reconnectDelay: 20,
    ...options,
  });
  t.after(() => client.close());
  return client;
}

test(
  "it resumes from its last position after each kind of drop, without a reload",
  BOUND,
  async (t) => {
    const server = await fakeServer(t);
    const client = newClient(t, server);
    let reloads = 0;
    client.on("reload", () => {
      reloads += 1;
    });
    const seen = [];
    client.subscribe("samples", ({ data, position }) => seen.push(`${data.id}@${position}`));
    await live(client);
    assert.equal((await server.connection(1)).since, null);
    assert.equal(client.position, "p-0005", "from system.info");

    // A frame holding an array: each message in turn, and the position moves to the last.
    (await server.connection(1)).send([change("a", "p-0006", "insert"), change("a", "p-0007")]);
    await waitFor("both messages", () => seen.length === 2);
    assert.deepEqual(seen, ["a@p-0006", "a@p-0007"]);
    assert.equal(client.position, "p-0007");

    const drops = [
      (socket) => socket.close(1001, "server shutting down"),
      (socket) => socket.close(4002, "outbox overflowed: reconnect with ?since=p-0007"),
      (socket) => socket.close(1011, "internal error"),
      (socket) => socket.terminate(), // 1006: no close frame
    ];
    for (const [index, drop] of drops.entries()) {
      drop((await server.connection(index + 1)).socket);
      const resumed = await server.connection(index + 2);
      assert.equal(resumed.since, "p-0007", `drop ${index}`);
      await live(client);
    }
    assert.equal(reloads, 1, "only the first connection reloaded");
  },
);

test("4003: it reloads and connects afresh, without since", BOUND, async (t) => {
  const server = await fakeServer(t);
  const client = newClient(t, server);
  let reloads = 0;
  client.on("reload", () => {
    reloads += 1;
  });
  await live(client);
  (await server.connection(1)).socket.close(1001);
  const resumed = await server.connection(2);
  assert.equal(resumed.since, "p-0005");
  resumed.socket.close(4003, "history lost: reload");
  const fresh = await server.connection(3);
  assert.equal(fresh.since, null);
  await live(client);
  assert.equal(reloads, 2);
});

test("changes that come during a reload wait for it, in order", BOUND, async (t) => {
  const server = await fakeServer(t);
  const order = [];
  let answerList;
  server.answer = (connection, request) => {
    if (request.method === "system.info") connection.reply(request, { position: "p-0001" });
    if (request.method === "samples.list")
      answerList = () => connection.reply(request, { items: [] });
  };
  const client = newClient(t, server);
  client.on("reload", async () => {
    await client.call("samples.list");
    order.push("lists replaced");
  });
  client.subscribe("samples", ({ data }) => order.push(`change ${data.id}`));
  await waitFor("the reload's call", () => answerList);
  assert.equal(client.status, "reloading");
  const connection = await server.connection(1);
  connection.send(change("x", "p-0002"));
  connection.send(change("y", "p-0003"));
  await waitFor("the position to move", () => client.position === "p-0003");
  assert.deepEqual(order, [], "held while the reload runs");
  answerList();
  await live(client);
  assert.deepEqual(order, ["lists replaced", "change x", "change y"]);
});

test(`at most ${MAX_IN_FLIGHT} calls are in flight; the rest wait their turn`, BOUND, async (t) => {
  const server = await fakeServer(t);
  const client = newClient(t, server);
  await live(client);
  const connection = await server.connection(1);
  const calls = Array.from({ length: MAX_IN_FLIGHT + 4 }, () => client.call("slow.method"));
  const slow = () => connection.requests.filter(({ method }) => method === "slow.method");
  await waitFor("the first calls", () => slow().length === MAX_IN_FLIGHT);
  connection.reply(slow()[0], "done");
  assert.equal(await calls[0], "done");
  await waitFor("one more sent", () => slow().length === MAX_IN_FLIGHT + 1);
  client.close();
  await Promise.allSettled(calls);
});

test("reconnection backs off, exponentially and capped", BOUND, async (t) => {
  const server = await fakeServer(t);
  const arrivals = [];
  server.answer = () => {};
  const client = newClient(t, server, { reconnectDelay: 40, maxReconnectDelay: 160 });
  // Every connection is refused at once, as by a failing server.
  const refuse = setInterval(() => {
    for (const connection of server.connections.splice(0)) {
      arrivals.push(Date.now());
      connection.socket.close(1011);
    }
  }, 5);
  t.after(() => clearInterval(refuse));
  await waitFor("seven attempts", () => arrivals.length >= 7, 5_000);
  client.close();
  const gaps = arrivals.slice(1).map((at, index) => at - arrivals[index]);
  // Each wait lies between half its ceiling and the ceiling: 40, 80, 160, then 160 for good.
  const ceilings = [40, 80, 160, 160, 160, 160];
  for (const [index, gap] of gaps.entries()) {
    assert.ok(
      gap >= ceilings[index] / 2 - 5,
      `wait ${index} of ${gap} ms: below ${ceilings[index] / 2}`,
    );
    assert.ok(gap <= ceilings[index] + 100, `wait ${index} of ${gap} ms: above ${ceilings[index]}`);
  }
});

test(
  "the browser's hints: offline waits, online and a visible page reconnect at once",
  BOUND,
  async (t) => {
    // A browser's globals, as far as vtrio.js looks at them.
    const window = new EventTarget();
    window.document = Object.assign(new EventTarget(), { visibilityState: "hidden" });
    const navigator = { onLine: true };
    Object.assign(globalThis, { window, navigator });
    t.after(() => {
      delete globalThis.window;
      delete globalThis.navigator;
    });

    const server = await fakeServer(t);
    const client = newClient(t, server, { reconnectDelay: 60_000 }); // a backoff never reached
    await live(client);

    navigator.onLine = false;
    window.dispatchEvent(new Event("offline"));
    assert.equal(client.status, "offline");
    await assert.rejects(client.call("system.info"), /offline/);
    navigator.onLine = true;
    window.dispatchEvent(new Event("online"));
    assert.equal((await server.connection(2)).since, "p-0005");
    await live(client);

    // Dropped while the page is hidden: it waits its (long) backoff, until the page is shown.
    (await server.connection(2)).socket.close(1001);
    await waitFor("the drop", () => client.status === "resuming");
    window.document.visibilityState = "visible";
    window.document.dispatchEvent(new Event("visibilitychange"));
    assert.equal((await server.connection(3)).since, "p-0005");
    await live(client);
  },
);
