/**
 * vtrio.js: a client of vtrio's websocket, for browsers and for Node. One file, an ES module
 * with no dependencies and no build step.
 *
 *     import { connect } from "./vtrio.js";
 *
 *     const client = connect({ url: "ws://127.0.0.1:9950/ws", token: key });
 *     client.on("status", (status) => show(status));
 *     client.on("reload", async () => replaceLists(await client.call("samples.list", {})));
 *     client.subscribe("samples", (message) => apply(message));
 *     const sample = await client.call("samples.get", { id });
 *
 * What it does for its page:
 *
 * - Calls: JSON-RPC over the socket. Every promise settles: with the result, an RpcError (the
 *   server's error), a CallTimeoutError, or a ConnectionLostError. At most MAX_IN_FLIGHT calls
 *   are on the wire at once (the server answers 429 beyond); the rest wait their turn.
 * - Changes: each change message goes to the handlers of its interface, in the order the server
 *   sent them (a frame holding an array is unpacked).
 * - Staying live: it remembers the last position it has seen (from change messages, and from
 *   `system.info`, which it asks for right after each connect) and, when the connection drops,
 *   reconnects with capped, jittered exponential backoff and `?since=POSITION`, so that the
 *   server replays what was missed. With no position to resume from (the first connect, or after
 *   close code 4003 "history lost") it connects afresh and fires "reload": the page re-fetches.
 * - The browser's hints: while `offline` it waits for `online` instead of retrying; a page
 *   becoming visible with no open socket reconnects at once rather than at the next backoff.
 *
 * Statuses (`client.status`; the "status" event tells each change):
 *
 *   connecting   opening a connection with nothing to resume from (or waiting to, in backoff)
 *   resuming     the connection dropped: reconnecting, to resume from the last position
 *   reloading    connected; the "reload" handlers are re-fetching (changes wait for them)
 *   live         connected and up to date; changes arrive as they happen
 *   offline      the browser is offline: waiting for it to come back
 *   signed-out   the server refused the API key (close code 4000): stopped for good
 *   closed       `client.close()` was called
 */

/** Requests one connection may have in flight; the server answers 429 beyond. */
export const MAX_IN_FLIGHT = 16;

/** Close codes the server sends, and what this client does about each. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // the server is shutting down: reconnect, resume
  PROTOCOL_ERROR: 1002, // a bug of ours: reconnect, resume (the offending call has failed)
  INVALID_DATA: 1007, // as 1002
  DROPPED: 1006, // no close frame: the connection broke; reconnect, resume
  TOO_BIG: 1009, // we sent a frame too big: as 1002
  SERVER_ERROR: 1011, // reconnect, resume
  UNAUTHENTICATED: 4000, // no, wrong or revoked API key: signed out, never retried
  HEARTBEAT_TIMEOUT: 4001, // reconnect, resume
  TOO_SLOW: 4002, // we read too slowly: reconnect, resume from our last position
  HISTORY_LOST: 4003, // the server cannot resume from our position: reload, connect afresh
});

/** The server answered a call with an error: `code` and `data` are the server's. */
export class RpcError extends Error {
  constructor(method, { code, message, data }) {
    super(`${method}: ${message} (${code})`);
    this.name = "RpcError";
    this.method = method;
    this.code = code;
    this.data = data;
  }
}

/** No answer came within the call's timeout. The server may still carry the call out. */
export class CallTimeoutError extends Error {
  constructor(method, timeout) {
    super(`${method}: no answer within ${timeout} ms`);
    this.name = "CallTimeoutError";
    this.method = method;
    this.timeout = timeout;
  }
}

/**
 * The call could not be answered: the connection was lost (or closed, or refused) first.
 * A call that was already sent may or may not have been carried out.
 */
export class ConnectionLostError extends Error {
  constructor(method, why) {
    super(`${method}: connection lost (${why})`);
    this.name = "ConnectionLostError";
    this.method = method;
  }
}

/**
 * Open a client. It connects at once and stays connected until `close()` or a refused key.
 *
 * @param {object} options
 * @param {string} options.url the server's websocket URL, e.g. "ws://127.0.0.1:9950/ws"
 * @param {string} options.token an API key (sent as the `token` query parameter, the one way a
 *   browser can present it)
 * @param {typeof WebSocket} [options.WebSocket] the WebSocket class; the global one by default
 *   (Node 20 has none: pass the `ws` package's)
 * @param {number} [options.callTimeout=30000] default time limit of a call, in milliseconds
 * @param {number} [options.reconnectDelay=1000] delay before the first reconnection attempt;
 *   each failed attempt doubles it
 * @param {number} [options.maxReconnectDelay=30000] the most the delay grows to
 * @returns {Client}
 */
export function connect(options) {
  return new Client(options);
}

export class Client {
  #url;
  #token;
  #WebSocket;
  #callTimeout;
  #reconnectDelay;
  #maxReconnectDelay;

  #status = "connecting";
  #socket = null;
  #position = null; // the latest position seen, or null
  #needsReload = true; // the next connection must be followed by a reload
  #resuming = false; // the current connection was opened with ?since=
  #attempts = 0; // failed connections since the last live one: the backoff's exponent
  #retryTimer = null;
  #held = null; // change messages waiting for the reload handlers, while they run

  #nextId = 1;
  #queue = []; // calls not yet sent, oldest first
  #inFlight = new Map(); // id -> call sent on the current socket and not yet answered
  #listeners = { status: new Set(), reload: new Set() };
  #subscribers = new Map(); // interface -> Set of {handler} entries
  #windowListeners = [];

  constructor({
    url,
    token,
    WebSocket = globalThis.WebSocket,
    callTimeout = 30_000,
    reconnectDelay = 1_000,
    maxReconnectDelay = 30_000,
  }) {
    if (!url || !token) throw new TypeError("connect() needs a url and a token");
    if (!WebSocket) throw new TypeError("no WebSocket class: pass one (in Node: the ws package)");
    this.#url = url;
    this.#token = token;
    this.#WebSocket = WebSocket;
    this.#callTimeout = callTimeout;
    this.#reconnectDelay = reconnectDelay;
    this.#maxReconnectDelay = maxReconnectDelay;
    this.#listenToTheBrowser();
    this.#open();
  }

  /** One of the statuses listed at the top of this file. */
  get status() {
    return this.#status;
  }

  /** The latest position seen (an opaque string), or null: where a reconnect resumes from. */
  get position() {
    return this.#position;
  }

  /**
   * For tests only, not an API: the current WebSocket, or null. A test may break it (`ws`'s
   * `terminate()`) to see the client recover as it would from a dropped connection.
   */
  get _socket() {
    return this.#socket;
  }

  /**
   * Call `method` with `params`; a promise of its result.
   *
   * A call made while a connection is being opened waits for it (within its timeout); one
   * made while offline, signed out or closed fails at once with ConnectionLostError, as do
   * the calls still waiting when the browser goes offline.
   *
   * @param {string} method e.g. "samples.list"
   * @param {object} [params]
   * @param {{timeout?: number}} [options] time limit in milliseconds (default: callTimeout)
   */
  call(method, params = {}, { timeout = this.#callTimeout } = {}) {
    return new Promise((resolve, reject) => {
      if (["offline", "signed-out", "closed"].includes(this.#status)) {
        reject(new ConnectionLostError(method, this.#status));
        return;
      }
      const call = {
        id: this.#nextId++,
        method,
        params,
        settled: false,
        settle: (error, result) => {
          if (call.settled) return;
          call.settled = true;
          clearTimeout(call.timer);
          if (error) reject(error);
          else resolve(result);
        },
      };
      call.timer = setTimeout(() => call.settle(new CallTimeoutError(method, timeout)), timeout);
      this.#queue.push(call);
      this.#sendQueued();
    });
  }

  /**
   * Call `handler(message)` for every change message of `interface` ("samples", "jobs"), in
   * order. A handler that throws does not stop the others, nor later messages.
   *
   * @returns {() => void} a function that ends the subscription
   */
  subscribe(interfaceName, handler) {
    if (!this.#subscribers.has(interfaceName)) this.#subscribers.set(interfaceName, new Set());
    const handlers = this.#subscribers.get(interfaceName);
    const entry = { handler }; // its own identity: the same function may be subscribed twice
    handlers.add(entry);
    return () => handlers.delete(entry);
  }

  /**
   * Listen to "status" (`handler(status)`, on every change of status) or "reload" (`handler()`,
   * once connected afresh: the page should re-fetch its lists). A reload handler may return a
   * promise: the status stays "reloading", and change messages wait, until it settles, so a
   * page that replaces its lists with what it fetched then applies every change made since.
   * If it rejects, the lists may be incomplete: the client reconnects, after the backoff, and
   * reloads again.
   *
   * @returns {() => void} a function that removes the handler
   */
  on(event, handler) {
    const handlers = this.#listeners[event];
    if (!handlers) throw new TypeError(`no event ${JSON.stringify(event)}: status or reload`);
    const entry = { handler };
    handlers.add(entry);
    return () => handlers.delete(entry);
  }

  /** Close the connection for good; calls still pending fail with ConnectionLostError. */
  close() {
    if (this.#status === "closed") return;
    for (const [target, type, listener] of this.#windowListeners) {
      target.removeEventListener(type, listener);
    }
    this.#windowListeners = [];
    this.#stop("closed", "the client was closed");
  }

  // --- the connection ---------------------------------------------------------------------

  #open() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (globalThis.navigator?.onLine === false) {
      this.#goOffline();
      return;
    }
    const url = new URL(this.#url);
    url.searchParams.set("token", this.#token);
    this.#resuming = !this.#needsReload && this.#position !== null;
    if (this.#resuming) url.searchParams.set("since", this.#position);
    this.#setStatus(this.#resuming ? "resuming" : "connecting");

    const socket = new this.#WebSocket(url.href);
    this.#socket = socket;
    socket.onopen = () => this.#opened();
    socket.onmessage = (event) => this.#received(event.data);
    socket.onclose = (event) => this.#closed(event.code, event.reason);
    socket.onerror = () => {}; // a close event follows, and says more
  }

  async #opened() {
    const socket = this.#socket;
    this.#sendQueued();
    try {
      // The server's position now: every change after it reaches this connection.
      const info = await this.call("system.info");
      this.#advance(info.position);
    } catch (error) {
      if (error instanceof ConnectionLostError) return; // the close event takes over
      // Not knowing the position only costs a reload at the next reconnect: carry on.
    }
    if (socket !== this.#socket) return;
    if (this.#needsReload) {
      this.#setStatus("reloading");
      this.#held = [];
      try {
        await Promise.all([...this.#listeners.reload].map(({ handler }) => handler()));
      } catch (error) {
        // The page's lists may be incomplete: a connection of its own will reload again.
        if (socket === this.#socket) this.#drop(`reload failed: ${error.message}`);
        return;
      }
      if (socket !== this.#socket) return; // dropped meanwhile: the next connection reloads
      this.#needsReload = false;
      const held = this.#held;
      this.#held = null;
      for (const message of held) this.#deliver(message);
    }
    this.#attempts = 0;
    this.#setStatus("live");
  }

  #closed(code, reason) {
    this.#socket = null;
    this.#lost(`closed with ${code}${reason ? ` ${reason}` : ""}`);
    if (code === CloseCode.UNAUTHENTICATED) {
      this.#stop("signed-out", "the API key was refused");
      return;
    }
    if (code === CloseCode.HISTORY_LOST) {
      // We cannot resume: connect afresh without since, and reload. At once, when it was a
      // resume the server refused; a server refusing fresh connections too is backed off from.
      this.#position = null;
      this.#needsReload = true;
      if (this.#resuming) {
        this.#open();
        return;
      }
    }
    if (this.#position === null) this.#needsReload = true; // nothing to resume from
    this.#retryLater();
  }

  /** Give up the current socket ourselves; reconnect after the backoff. */
  #drop(why) {
    this.#lost(why);
    this.#retryLater();
  }

  #retryLater() {
    if (globalThis.navigator?.onLine === false) {
      this.#goOffline();
      return;
    }
    // Capped exponential backoff, with jitter so that the clients of a restarted server do
    // not all come back at the same instant.
    const ceiling = Math.min(this.#maxReconnectDelay, this.#reconnectDelay * 2 ** this.#attempts);
    const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    this.#attempts += 1;
    this.#setStatus(this.#needsReload ? "connecting" : "resuming");
    this.#retryTimer = setTimeout(() => this.#open(), delay);
  }

  /** End for good, with a final status: fail every call, retry nothing. */
  #stop(status, why) {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#lost(why);
    this.#failQueued(why);
    this.#setStatus(status);
  }

  /**
   * The connection is over (closed, or given up by us): close the socket if it is still
   * there, ignoring whatever it does from now on, and fail the calls it was answering.
   */
  #lost(why) {
    const socket = this.#socket;
    this.#socket = null;
    this.#held = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      // Closing a socket still connecting is an error event in Node's ws: ignore it.
      socket.onerror = () => {};
      socket.close(CloseCode.NORMAL);
    }
    for (const call of this.#inFlight.values()) {
      call.settle(new ConnectionLostError(call.method, why));
    }
    this.#inFlight.clear();
  }

  #listenToTheBrowser() {
    const listen = (target, type, listener) => {
      target.addEventListener(type, listener);
      this.#windowListeners.push([target, type, listener]);
    };
    const window = globalThis.window;
    if (!window?.addEventListener) return; // Node: no browser to listen to
    listen(window, "offline", () => {
      if (!this.#stoppedForGood()) this.#goOffline();
    });
    listen(window, "online", () => {
      if (this.#status === "offline") this.#open();
    });
    listen(window.document, "visibilitychange", () => {
      // Back in front of the user: a connection that was waiting for its backoff is wanted now.
      const waiting = this.#retryTimer !== null;
      if (window.document.visibilityState === "visible" && waiting) this.#open();
    });
  }

  /** Wait for the "online" event, which reconnects; fail the calls meanwhile. */
  #goOffline() {
    // A socket across a network that went away may never hear its close: give it up now, and
    // resume from the last position once back online.
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#lost("the browser is offline");
    this.#failQueued("the browser is offline");
    if (this.#position === null) this.#needsReload = true;
    this.#setStatus("offline");
  }

  #stoppedForGood() {
    return this.#status === "signed-out" || this.#status === "closed";
  }

  #setStatus(status) {
    if (status === this.#status) return;
    this.#status = status;
    for (const { handler } of [...this.#listeners.status]) {
      callSafely(handler, status);
    }
  }

  // --- messages ---------------------------------------------------------------------------

  #received(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      console.warn("vtrio: ignored a frame that is not JSON:", String(data).slice(0, 200));
      return;
    }
    for (const message of Array.isArray(frame) ? frame : [frame]) {
      if (message?.jsonrpc === "2.0") this.#answered(message);
      else if (typeof message?.interface === "string") this.#changed(message);
    }
  }

  #changed(message) {
    this.#advance(message.position);
    if (this.#held) this.#held.push(message);
    else this.#deliver(message);
  }

  #deliver(message) {
    for (const { handler } of [...(this.#subscribers.get(message.interface) ?? [])]) {
      callSafely(handler, message);
    }
  }

  #advance(position) {
    if (typeof position === "string" && (this.#position === null || position > this.#position)) {
      this.#position = position;
    }
  }

  // --- calls ------------------------------------------------------------------------------

  #sendQueued() {
    const socket = this.#socket;
    if (socket?.readyState !== this.#WebSocket.OPEN) return;
    // A call that timed out stays counted until its answer comes: the server still runs it.
    while (this.#queue.length > 0 && this.#inFlight.size < MAX_IN_FLIGHT) {
      const call = this.#queue.shift();
      if (call.settled) continue; // timed out while waiting its turn: never sent
      const { id, method, params } = call;
      socket.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
      this.#inFlight.set(id, call);
    }
  }

  #answered(response) {
    const call = this.#inFlight.get(response.id);
    if (!call) return; // not ours, or from a connection we have since given up
    this.#inFlight.delete(response.id);
    if (response.error) call.settle(new RpcError(call.method, response.error));
    else call.settle(null, response.result);
    this.#sendQueued();
  }

  /** Fail the calls waiting to be sent. */
  #failQueued(why) {
    for (const call of this.#queue.splice(0)) {
      call.settle(new ConnectionLostError(call.method, why));
    }
  }
}

/** Call a handler of the page's; if it throws, report the error without stopping our loop. */
function callSafely(handler, ...args) {
  try {
    handler(...args);
  } catch (error) {
    setTimeout(() => {
      throw error;
    });
  }
}
