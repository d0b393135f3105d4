// Throng JavaScript client: wire protocol v1 over WebSocket (`/ws`), with Server-Sent Events (`/sse`,
// `/poll`, `POST /publish`) as the fallback when WebSocket is blocked. No dependencies; browsers and
// Node >= 20 (built-in WebSocket from Node 22, or pass one, e.g. the `ws` package, as `options.WebSocket`).
//
// An ES module. Throng serves it at `/throng.js`, and at `/throng.global.js` the same code as a classic
// script that sets `window.Throng` (for a plain `<script src>`). Loaded as a module in a browser it sets
// `window.Throng` too. Documentation: docs/client.md.
//
// Conventions kept so the classic-script form can be made from this file: no `import`, no `import.meta`,
// and one `export { ... }` statement at the very end (the server turns it into `globalThis.Throng = {...}`).

/** The version of this client. */
const VERSION = "1.0.0";

/** Every default option (docs/client.md, "Options"). */
const DEFAULTS = Object.freeze({
  url: undefined, // server base: http(s)://host[:port] or ws(s)://host[:port]; in a browser: the page's origin
  token: undefined, // a JWT (string)
  getToken: undefined, // async () => string | null: a fresh token from your backend
  user: undefined, // open development mode only: ?user=NAME
  tokenTransport: "subprotocol", // "subprotocol" (Sec-WebSocket-Protocol: throng.v1, bearer.<jwt>) or "query" (?token=)
  WebSocket: undefined, // a WebSocket implementation (Node < 22: the `ws` package)
  fetch: undefined, // a fetch implementation (default: globalThis.fetch)
  backoff: Object.freeze({ initial: 500, max: 30000, factor: 2 }), // ms; full jitter
  spreadWindow: 10000, // ms: after 1001, 1013 or 4029 the first retry is spread over at least this window
  pingIdle: 10000, // ms without anything from the server before the client sends an application ping
  pongTimeout: 5000, // ms to wait for any answer to that ping before the connection is given up
  connectTimeout: 10000, // ms for a connection attempt to reach `welcome`
  requestTimeout: 10000, // ms for publish, presence, history, refresh (per call: { timeout })
  refresh: true, // refresh the token through `refresh` before its `exp` (needs getToken)
  refreshFraction: 0.8, // ... when this fraction of its remaining life has passed
  fallback: "sse", // "sse", or false: never leave WebSocket
  fallbackAfter: 3, // WebSocket attempts in a row that fail before `welcome` before SSE is tried
  wsProbeInterval: 30000, // ms: while on SSE, how often WebSocket is tried again
  historyLimit: 1000, // messages asked for when catching up after an epoch change or a gap
  closePolicy: undefined, // { [code]: "retry" | "spread" | "auth" | "stop" } overrides
  autoConnect: true,
});

/** States a client goes through (the `state` event names them). */
const STATES = Object.freeze([
  "idle", // created with autoConnect: false, not connected yet
  "connecting", // an attempt is under way (WebSocket or SSE)
  "connected", // WebSocket open and `welcome` received
  "fallback", // SSE stream open and its `welcome` received
  "disconnected", // waiting for the next attempt
  "unauthorized", // closed for its token (4001, 4003, or expired): waiting for a new one
  "stopped", // the server closed us with a code that means "do not come back" (default for 4000-4999 not listed)
  "closed", // close() was called
]);

/**
 * What to do after a close with `code` (docs/client.md, "Reconnect policy"): "retry" (exponential backoff
 * with full jitter), "spread" (the same, but over at least `spreadWindow`), "auth" (no retry until
 * `getToken()` returns a new token), or "stop". `overrides` maps codes to one of these.
 */
function closePolicy(code, overrides) {
  if (overrides && Object.prototype.hasOwnProperty.call(overrides, code)) return overrides[code];
  switch (code) {
    case 4001: // token expired and not refreshed
    case 4003: // forbidden: the token does not grant this
      return "auth";
    case 1001: // going away: the node drains; every client of it reconnects at once, so spread out
    case 1013: // try again later: the server's budget is used up
    case 4029: // rate limited
      return "spread";
    case 1000: // normal (also the server's idle timeout)
    case 1002: // protocol error
    case 1005: // no status
    case 1006: // abnormal: connection lost, refused, or the upgrade was answered with an error
    case 1007:
    case 1008: // policy: repeated refused commands, message timeout
    case 1009: // message too big
    case 1011: // server error
    case 1012: // service restart
    case 1014:
    case 1015: // TLS failure
    case 4008: // slow consumer: resubscribing with `since` recovers what it missed
      return "retry";
    default:
      // 4000-4999: the backend disconnected this user (POST /api/disconnect) on purpose.
      if (code >= 4000 && code <= 4999) return "stop";
      return "retry";
  }
}

/**
 * Delay (ms) before retry number `attempt` (0 for the first): full jitter over an exponentially growing
 * window, `random() * min(max, initial * factor^attempt)`, and over at least `spread` ms when the close
 * asked to spread out (1001, 1013, 4029).
 */
function backoffDelay(attempt, backoff = DEFAULTS.backoff, random = Math.random, spread = 0) {
  const { initial, max, factor } = { ...DEFAULTS.backoff, ...backoff };
  const n = Math.max(0, Math.floor(attempt));
  const window = Math.min(max, initial * Math.pow(factor, Math.min(n, 1000)));
  return Math.floor(random() * Math.max(window, spread));
}

/** The `exp` claim of a JWT (seconds), or undefined when it has none or cannot be read. */
function tokenExpiry(token) {
  if (typeof token !== "string") return undefined;
  const part = token.split(".")[1];
  if (!part) return undefined;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const json =
      typeof atob === "function"
        ? decodeURIComponent(
            Array.from(atob(b64), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
          )
        : Buffer.from(b64, "base64").toString("utf8");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** An error of the client: `code` is the server's error code, or "timeout", "disconnected", "closed",
 * "not_available" (presence and history over the SSE fallback), "http_<status>". */
class ThrongError extends Error {
  constructor(code, reason) {
    super(`${code}: ${reason}`);
    this.name = "ThrongError";
    this.code = code;
    this.reason = reason;
  }
}

/** Minimal event emitter. */
class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  /** Adds a handler; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  once(event, fn) {
    const off = this.on(event, (e) => {
      off();
      fn(e);
    });
    return off;
  }
  off(event, fn) {
    const set = this._handlers.get(event);
    if (set) set.delete(fn);
  }
  emit(event, payload) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(payload);
      } catch (err) {
        // A failing handler must not break the client; report it, asynchronously.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

const now = () => Date.now();

function textOf(data) {
  if (typeof data === "string") return data;
  if (typeof Buffer !== "undefined" && Buffer.isBuffer(data)) return data.toString("utf8");
  if (data instanceof ArrayBuffer) return new TextDecoder().decode(data);
  if (ArrayBuffer.isView(data)) return new TextDecoder().decode(data);
  return String(data);
}

/** Turns `url` into the base HTTP URL and the `/ws` URL. */
function endpoints(url) {
  let base = url;
  if (!base) {
    if (typeof location !== "undefined" && location.origin && location.origin !== "null") base = location.origin;
    else throw new TypeError("Throng: options.url is required outside a browser page");
  }
  const u = new URL(base, typeof location !== "undefined" ? location.href : undefined);
  const secure = u.protocol === "https:" || u.protocol === "wss:";
  const host = u.host;
  return { http: `${secure ? "https" : "http"}://${host}`, ws: `${secure ? "wss" : "ws"}://${host}/ws` };
}

/** One subscription's state. */
class Sub {
  constructor(channel) {
    this.channel = channel;
    this.handlers = new Set();
    this.epoch = undefined; // of the position
    this.offset = undefined; // last offset delivered (or the subscribed offset)
    this.active = false; // confirmed on the current connection
    this.buffering = false; // catching up: live messages wait in `buffer`
    this.buffer = [];
    this.waiters = []; // subscribe() promises waiting for the first `subscribed`
  }
}

/**
 * A Throng client: one connection (WebSocket, or the SSE fallback), its subscriptions restored with
 * `since` across reconnects, requests with timeouts, and events for everything that happens.
 */
class ThrongClient extends Emitter {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    const o = this.options;
    this._urls = endpoints(o.url);
    this.token = o.token;
    this.state = "idle";
    this.transport = undefined; // "websocket" | "sse" while connected
    this.clientId = undefined; // the welcome's `client`
    this.user = undefined;
    this.serverPingInterval = undefined;
    this._subs = new Map();
    this._pending = new Map(); // id -> { resolve, reject, timer, kind, channel }
    this._nextId = 1;
    this._attempt = 0; // retries since the last success
    this._wsFailures = 0; // WebSocket attempts in a row that did not reach welcome
    this._useSse = false; // the next attempt goes to SSE
    this._ws = undefined;
    this._sse = undefined; // { abort, channels }
    this._probe = undefined;
    this._timers = new Set();
    this._retryTimer = undefined;
    this._probeTimer = undefined;
    this._refreshTimer = undefined;
    this._hbTimer = undefined;
    this._lastRecv = 0;
    this._pingAt = 0;
    this._sseRestart = undefined;
    this._statsPrev = undefined;
    this._tokenWait = undefined;
    if (o.autoConnect) this.connect();
  }

  // ---------------------------------------------------------------- public API

  /** Starts connecting (again, after close() or "stopped"/"unauthorized"). */
  connect() {
    if (this.state === "connecting" || this.state === "connected" || this.state === "fallback") return;
    this._attempt = 0;
    this._open();
  }

  /** Closes the connection for good (until connect()); pending requests fail with "closed". */
  close() {
    this._teardown(1000, "client closed");
    this._clearTimer("_retryTimer");
    this._clearTimer("_probeTimer");
    this._clearTimer("_refreshTimer");
    this._failPending("closed", "the client was closed");
    this._setState("closed");
  }

  /** Replaces the token; reconnects at once when the client waits for one ("unauthorized"). */
  setToken(token) {
    this.token = token;
    if (this.state === "unauthorized") {
      this._attempt = 0;
      this._open();
    } else {
      this._scheduleRefresh();
    }
  }

  /**
   * Subscribes to `channel`; `handler({channel, offset, data})` gets its messages. Resolves with the first
   * `subscribed` ({channel, offset, epoch, recovered}); rejects with the server's error. The subscription
   * is restored after every reconnect with `since` (the last offset delivered).
   */
  subscribe(channel, handler, { timeout } = {}) {
    let sub = this._subs.get(channel);
    const fresh = !sub;
    if (fresh) {
      sub = new Sub(channel);
      this._subs.set(channel, sub);
    }
    if (handler) sub.handlers.add(handler);
    const p = new Promise((resolve, reject) => {
      if (!fresh && sub.active) return resolve({ channel, offset: sub.offset, epoch: sub.epoch, recovered: true });
      const w = { resolve, reject };
      w.timer = setTimeout(() => {
        sub.waiters = sub.waiters.filter((x) => x !== w);
        reject(new ThrongError("timeout", `no subscribed for ${channel}`));
      }, timeout ?? this.options.requestTimeout);
      sub.waiters.push(w);
    });
    if (fresh) {
      if (this.transport === "websocket") this._sendSubscribe(sub);
      else if (this.transport === "sse") this._restartSseSoon();
    }
    // A subscription is often made and not awaited: its rejection (a timeout while offline, an unsubscribe)
    // must not become an unhandled rejection. The subscription itself stays until unsubscribe().
    p.catch(() => {});
    return p;
  }

  /** Stops delivering `channel` (or only `handler`, when given and others remain). */
  async unsubscribe(channel, handler) {
    const sub = this._subs.get(channel);
    if (!sub) return;
    if (handler) {
      sub.handlers.delete(handler);
      if (sub.handlers.size > 0) return;
    }
    this._subs.delete(channel);
    for (const w of sub.waiters) {
      clearTimeout(w.timer);
      w.reject(new ThrongError("unsubscribed", channel));
    }
    if (this.transport === "websocket" && sub.active) {
      await this._request({ type: "unsubscribe", channel }).catch(() => {});
    } else if (this.transport === "sse") {
      this._restartSseSoon();
    }
  }

  /** The channels subscribed to, with their positions. */
  subscriptions() {
    return [...this._subs.values()].map((s) => ({ channel: s.channel, offset: s.offset, epoch: s.epoch, active: s.active }));
  }

  /** Publishes `data` (any JSON) to `channel`; resolves with {offset} (over SSE: {channel, offset}). */
  async publish(channel, data, { timeout } = {}) {
    const t = timeout ?? this.options.requestTimeout;
    await this._ready(t);
    if (this.transport === "sse") return this._httpPublish(channel, data, t);
    const r = await this._request({ type: "publish", channel, data }, t);
    return { offset: r.offset };
  }

  /** Who is subscribed to `channel`: {count, users: [{user, connections}], truncated?}. WebSocket only. */
  async presence(channel, { timeout } = {}) {
    const t = timeout ?? this.options.requestTimeout;
    await this._ready(t);
    if (this.transport !== "websocket") throw new ThrongError("not_available", "presence needs the WebSocket");
    return this._request({ type: "presence", channel }, t);
  }

  /**
   * The channel's newest messages: {offset, epoch, messages: [{offset, data}], recovered?, truncated?}.
   * `since` ({offset, epoch}) asks only for newer ones. WebSocket only.
   */
  async history(channel, { limit, since, timeout } = {}) {
    const t = timeout ?? this.options.requestTimeout;
    await this._ready(t);
    if (this.transport !== "websocket") throw new ThrongError("not_available", "history needs the WebSocket");
    const msg = { type: "history", channel };
    if (limit !== undefined) msg.limit = limit;
    if (since) msg.since = since;
    return this._request(msg, t);
  }

  /**
   * The node's figures from `/stats`: connections, users, and, against the previous call, deliveries and
   * publishes per second and the mean publish-to-write latency (ms) of the deliveries in between.
   */
  async stats({ timeout } = {}) {
    const res = await this._fetch(this._urls.http + "/stats", {}, timeout ?? this.options.requestTimeout);
    if (!res.ok) throw new ThrongError(`http_${res.status}`, await res.text());
    const s = await res.json();
    const sum = (k) => (s.per_shard || []).reduce((a, m) => a + (m[k] || 0), 0);
    const sample = {
      at: now(),
      deliveries: s.delivery_latency ? s.delivery_latency.count : 0,
      latencySumUs: s.delivery_latency ? s.delivery_latency.sum_us : 0,
      publishes: sum("publishes_total"),
      messagesIn: sum("messages_in_total"),
    };
    const prev = this._statsPrev;
    this._statsPrev = sample;
    const out = {
      connections: s.connections,
      websockets: sum("ws_connections"),
      users: s.users,
      shards: s.shards,
      uptimeSeconds: s.uptime_seconds,
      rssBytes: s.rss_bytes,
      auth: s.auth,
      deliveriesPerSecond: null,
      publishesPerSecond: null,
      messagesInPerSecond: null,
      latencyMs: null,
      raw: s,
    };
    if (prev && sample.at > prev.at) {
      const secs = (sample.at - prev.at) / 1000;
      const d = sample.deliveries - prev.deliveries;
      out.deliveriesPerSecond = d / secs;
      out.publishesPerSecond = (sample.publishes - prev.publishes) / secs;
      out.messagesInPerSecond = (sample.messagesIn - prev.messagesIn) / secs;
      out.latencyMs = d > 0 ? (sample.latencySumUs - prev.latencySumUs) / d / 1000 : null;
    }
    return out;
  }

  // ---------------------------------------------------------------- connection attempts

  _setState(state, extra = {}) {
    const prev = this.state;
    if (prev === state) return;
    this.state = state;
    this.emit("state", { state, prev, transport: this.transport, ...extra });
  }

  _later(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimer(name) {
    if (this[name] !== undefined) {
      clearTimeout(this[name]);
      this._timers.delete(this[name]);
      this[name] = undefined;
    }
  }

  /** Whether the token is expired (or about to be, within a second) by its `exp`. */
  _tokenExpired() {
    const exp = tokenExpiry(this.token);
    return exp !== undefined && exp * 1000 <= now() + 1000;
  }

  /** One connection attempt, after making sure the token is not known to be expired. */
  async _open() {
    this._clearTimer("_retryTimer");
    const o = this.options;
    if (this.token === undefined && o.user === undefined && typeof o.getToken === "function") {
      // No token yet: the first one comes from getToken.
      this._setState("connecting");
      let token;
      try {
        token = await o.getToken({});
      } catch (err) {
        if (this.state !== "connecting") return;
        this.emit("auth_error", { code: 0, reason: "getToken failed", error: err, willRetry: true });
        this._retry(1006, "getToken failed", false);
        return;
      }
      if (this.state !== "connecting") return;
      if (typeof token === "string" && token) this.token = token;
    }
    if (this.token !== undefined && this._tokenExpired()) {
      this._setState("unauthorized", { code: 4001, reason: "token expired" });
      if (!(await this._newToken(4001, "token expired"))) return;
    }
    const sse = this._useSse && this.options.fallback === "sse";
    this._setState("connecting");
    this.emit("connecting", { attempt: this._attempt, transport: sse ? "sse" : "websocket" });
    if (sse) this._openSse();
    else this._openWs();
  }

  /**
   * Asks `getToken()` for a new token (retried with the backoff schedule while it throws). True when one
   * came: the caller goes on. False: the client stays "unauthorized" until setToken() or connect().
   */
  async _newToken(code, reason) {
    const get = this.options.getToken;
    const old = this.token;
    if (typeof get !== "function") {
      this.emit("auth_error", { code, reason, willRetry: false });
      return false;
    }
    for (let i = 0; ; i++) {
      const gen = (this._tokenWait = {});
      let token;
      try {
        token = await get({ code, reason, expired: this.token });
      } catch (err) {
        if (this._tokenWait !== gen || this.state !== "unauthorized") return false;
        const delay = backoffDelay(i, this.options.backoff);
        this.emit("auth_error", { code, reason, error: err, willRetry: true, delay });
        await new Promise((r) => {
          this._retryTimer = this._later(r, delay);
        });
        if (this._tokenWait !== gen || this.state !== "unauthorized") return false;
        continue;
      }
      if (this._tokenWait !== gen || this.state !== "unauthorized") return false;
      if (typeof token === "string" && token && token !== old) {
        this.token = token;
        const exp = tokenExpiry(token);
        if (exp === undefined || exp * 1000 > now() + 1000) {
          this.emit("token", { expires: exp });
          return true;
        }
      }
      this.emit("auth_error", { code, reason, willRetry: false });
      return false;
    }
  }

  _openWs() {
    const WS = this.options.WebSocket || globalThis.WebSocket;
    if (typeof WS !== "function") {
      this._failed("websocket", 1006, "no WebSocket implementation: pass options.WebSocket (e.g. the ws package)");
      return;
    }
    const { url, protocols } = this._wsTarget();
    let ws;
    try {
      ws = protocols ? new WS(url, protocols) : new WS(url);
    } catch (err) {
      this._failed("websocket", 1006, String(err && err.message ? err.message : err));
      return;
    }
    this._ws = ws;
    let welcomed = false;
    const timer = this._later(() => {
      if (!welcomed && this._ws === ws) {
        this._detach(ws);
        this._failed("websocket", 1006, "no welcome within connectTimeout");
      }
    }, this.options.connectTimeout);
    ws.onmessage = (ev) => {
      const msg = this._received(ws, ev);
      if (!msg) return;
      if (msg.type === "welcome") {
        welcomed = true;
        clearTimeout(timer);
        this._timers.delete(timer);
        this._onWelcome(msg, "websocket");
        return;
      }
      this._onFrame(msg);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      clearTimeout(timer);
      this._timers.delete(timer);
      this._detach(ws);
      if (welcomed) this._lost(ev.code || 1006, ev.reason || "");
      else this._failed("websocket", ev.code || 1006, ev.reason || "connection failed");
    };
    ws.onerror = () => {
      // onclose follows and decides.
    };
  }

  _wsTarget() {
    const o = this.options;
    const q = new URLSearchParams();
    let protocols = ["throng.v1"];
    if (this.token !== undefined) {
      if (o.tokenTransport === "query") q.set("token", this.token);
      else protocols = ["throng.v1", "bearer." + this.token];
    } else if (o.user !== undefined) {
      q.set("user", o.user);
    }
    const qs = q.toString();
    return { url: this._urls.ws + (qs ? "?" + qs : ""), protocols };
  }

  /** Forgets a socket: no more events from it, closed if still open. */
  _detach(ws, code = 1000, reason = "") {
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
    if (this._ws === ws) this._ws = undefined;
    try {
      if (ws.readyState === 0 || ws.readyState === 1) ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  /** Forgets the transport that ended: its timers, and every subscription's place on it. */
  _teardown() {
    this.transport = undefined;
    this._stopHeartbeat();
    this._clearTimer("_probeTimer");
    this._clearTimer("_refreshTimer");
    for (const sub of this._subs.values()) {
      sub.active = false;
      sub.buffering = false;
      sub.buffer = [];
    }
  }

  /** An attempt that never reached welcome. */
  _failed(transport, code, reason) {
    if (this.state === "closed") return;
    this._teardown();
    if (transport === "websocket") {
      this._wsFailures++;
      if (this.options.fallback === "sse" && this._wsFailures >= this.options.fallbackAfter) this._useSse = true;
    } else {
      // SSE failed too: the server is probably down, not the WebSocket blocked; alternate.
      this._useSse = false;
    }
    this._retry(code, reason, false);
  }

  /** An established connection (WebSocket or SSE) is gone. */
  _lost(code, reason) {
    if (this.state === "closed") return;
    const was = this.transport;
    this._teardown();
    this._failPending("disconnected", `connection lost (${code}${reason ? " " + reason : ""})`);
    if (was === "websocket") this._useSse = false;
    this._retry(code, reason, true);
  }

  _retry(code, reason, wasConnected) {
    const policy = closePolicy(code, this.options.closePolicy);
    if (policy === "auth") {
      this._setState("unauthorized", { code, reason });
      this.emit("disconnected", { code, reason, wasConnected, willRetry: false, policy });
      this._newToken(code, reason).then((ok) => {
        if (ok && this.state === "unauthorized") {
          this._attempt = 0;
          this._open();
        }
      });
      return;
    }
    if (policy === "stop") {
      this._setState("stopped", { code, reason });
      this.emit("disconnected", { code, reason, wasConnected, willRetry: false, policy });
      this._failPending("disconnected", reason || `closed with ${code}`);
      return;
    }
    const spread = policy === "spread" ? this.options.spreadWindow : 0;
    const delay = backoffDelay(this._attempt, this.options.backoff, Math.random, spread);
    this._attempt++;
    this._setState("disconnected", { code, reason });
    this.emit("disconnected", { code, reason, wasConnected, willRetry: true, delay, policy });
    this._retryTimer = this._later(() => {
      this._retryTimer = undefined;
      if (this.state === "disconnected") this._open();
    }, delay);
  }

  _teardown(code, reason) {
    this._stopHeartbeat();
    if (this._ws) this._detach(this._ws, code, reason);
    if (this._sse) this._sse.abort();
    this._sse = undefined;
    if (this._probe) this._detach(this._probe, code, reason);
    this._probe = undefined;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._retryTimer = this._probeTimer = this._refreshTimer = undefined;
    this._tokenWait = undefined;
    this.transport = undefined;
    for (const sub of this._subs.values()) {
      sub.active = false;
      sub.buffering = false;
      sub.buffer = [];
    }
  }

  _onWelcome(msg, transport) {
    this.transport = transport;
    this.clientId = msg.client;
    this.user = msg.user;
    this.serverPingInterval = msg.ping_interval;
    this._attempt = 0;
    const wasFallback = this.state === "fallback";
    if (transport === "websocket") {
      this._wsFailures = 0;
      this._useSse = false;
      this._setState("connected");
      this.emit("connected", { transport, client: msg.client, user: msg.user, fromFallback: wasFallback });
      this._startHeartbeat();
      for (const sub of this._subs.values()) this._sendSubscribe(sub);
    } else {
      this._setState("fallback");
      this.emit("fallback", { transport, client: msg.client, user: msg.user });
      this.emit("connected", { transport, client: msg.client, user: msg.user });
      this._scheduleProbe();
    }
    this._scheduleRefresh();
    this._flushReady();
  }

  // ---------------------------------------------------------------- heartbeat (half-open detection)

  _startHeartbeat() {
    this._lastRecv = now();
    this._pingAt = 0;
    this._heartbeat();
  }

  _stopHeartbeat() {
    this._clearTimer("_hbTimer");
  }

  /**
   * Nothing from the server for `pingIdle` ms: send `ping`; nothing for `pongTimeout` more: the connection
   * is half-open, give it up. A silent connection is so noticed within pingIdle + pongTimeout (15 s by
   * default). Over SSE the server's comment lines every `ping_interval` are the heartbeat: nothing for
   * ping_interval + pingIdle (35 s by default) gives the stream up.
   */
  _heartbeat() {
    this._clearTimer("_hbTimer");
    const o = this.options;
    const t = now();
    if (this.transport === "sse") {
      const limit = (this.serverPingInterval || 25) * 1000 + o.pingIdle;
      if (t - this._lastRecv >= limit) {
        this._sse && this._sse.abort();
        this._sse = undefined;
        this._lost(1006, "no data from the SSE stream");
        return;
      }
      this._hbTimer = this._later(() => this._heartbeat(), this._lastRecv + limit - t);
      return;
    }
    if (!this._ws) return;
    if (this._pingAt && t - this._pingAt >= o.pongTimeout) {
      const ws = this._ws;
      this._detach(ws, 4000, "ping timeout");
      this._lost(1006, "ping timeout: no answer from the server");
      return;
    }
    if (!this._pingAt && t - this._lastRecv >= o.pingIdle) {
      this._pingAt = t;
      this._send({ type: "ping", id: this._nextId++ });
      this._hbTimer = this._later(() => this._heartbeat(), o.pongTimeout);
      return;
    }
    const due = this._pingAt ? this._pingAt + o.pongTimeout : this._lastRecv + o.pingIdle;
    this._hbTimer = this._later(() => this._heartbeat(), Math.max(10, due - t));
  }

  // ---------------------------------------------------------------- token refresh

  _scheduleRefresh() {
    this._clearTimer("_refreshTimer");
    const o = this.options;
    if (!o.refresh || typeof o.getToken !== "function" || !this.transport) return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const left = exp * 1000 - now();
    const delay = Math.max(0, Math.floor(left * o.refreshFraction));
    this._refreshTimer = this._later(() => this._refreshToken(), delay);
  }

  async _refreshToken() {
    this._refreshTimer = undefined;
    const transport = this.transport;
    if (!transport) return;
    let token;
    try {
      token = await this.options.getToken({ refresh: true, expires: tokenExpiry(this.token) });
    } catch (err) {
      this.emit("auth_error", { code: 0, reason: "getToken failed during refresh", error: err, willRetry: true });
      this._refreshTimer = this._later(() => this._refreshToken(), 1000);
      return;
    }
    if (typeof token !== "string" || !token || token === this.token || this.transport !== transport) return;
    if (transport === "sse") {
      this.token = token;
      this.emit("refreshed", { expires: tokenExpiry(token), transport });
      this._restartSseSoon();
      this._scheduleRefresh();
      return;
    }
    try {
      const r = await this._request({ type: "refresh", token });
      this.token = token;
      this.emit("refreshed", { expires: r.expires, transport });
      this._scheduleRefresh();
    } catch (err) {
      this.emit("auth_error", { code: err.code, reason: err.reason, willRetry: false });
    }
  }

  // ---------------------------------------------------------------- v1 messages

  _send(obj) {
    if (!this._ws || this._ws.readyState !== 1) return false;
    this._ws.send(JSON.stringify(obj));
    return true;
  }

  /**
   * Sends a command with a new id; resolves with its reply, rejects with its error, or after `timeout`.
   * `onReply`, when given, runs synchronously as the reply is read (before any frame after it), where the
   * promise's continuation would run only after the frames read with it.
   */
  _request(msg, timeout = this.options.requestTimeout, onReply) {
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      const entry = { resolve, reject, onReply, kind: msg.type, channel: msg.channel };
      entry.timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new ThrongError("timeout", `no answer to ${msg.type} within ${timeout} ms`));
      }, timeout);
      this._pending.set(id, entry);
      if (!this._send({ ...msg, id })) {
        clearTimeout(entry.timer);
        this._pending.delete(id);
        reject(new ThrongError("disconnected", "not connected"));
      }
    });
  }

  _failPending(code, reason) {
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      this._pending.delete(id);
      p.reject(new ThrongError(code, reason));
    }
    if (code === "closed") {
      for (const w of this._readyWaiters || []) w.reject(new ThrongError(code, reason));
      this._readyWaiters = [];
      for (const sub of this._subs.values()) {
        for (const w of sub.waiters) {
          clearTimeout(w.timer);
          w.reject(new ThrongError(code, reason));
        }
        sub.waiters = [];
      }
    }
  }

  /** Resolves once connected (WebSocket or SSE), or rejects after `timeout`. */
  _ready(timeout) {
    if (this.transport) return Promise.resolve();
    if (this.state === "closed") return Promise.reject(new ThrongError("closed", "the client was closed"));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      w.timer = setTimeout(() => {
        this._readyWaiters = this._readyWaiters.filter((x) => x !== w);
        reject(new ThrongError("timeout", `not connected within ${timeout} ms`));
      }, timeout);
      (this._readyWaiters ||= []).push(w);
    });
  }

  _flushReady() {
    const ws = this._readyWaiters || [];
    this._readyWaiters = [];
    for (const w of ws) {
      clearTimeout(w.timer);
      w.resolve();
    }
  }

  _sendSubscribe(sub) {
    const msg = { type: "subscribe", channel: sub.channel };
    if (sub.epoch && sub.offset !== undefined) msg.since = { offset: sub.offset, epoch: sub.epoch };
    const since = msg.since;
    this._request(msg, this.options.requestTimeout, (r) => this._onSubscribed(sub, r, since)).catch(
      (err) => {
        if (err.code === "disconnected" || err.code === "closed") return;
        if (this._subs.get(sub.channel) !== sub) return;
        if (err.code === "timeout" || err.code === "overloaded") {
          // Try again on this connection.
          if (this.transport === "websocket") this._later(() => this._sendSubscribe(sub), 1000);
          return;
        }
        this._dropSub(sub, err.code, err.reason);
      },
    );
  }

  /** A subscription the server refused: forgotten, its subscribe() promises rejected, `subscribe_error`. */
  _dropSub(sub, code, reason) {
    if (!sub || this._subs.get(sub.channel) !== sub) return;
    this._subs.delete(sub.channel);
    this.emit("subscribe_error", { channel: sub.channel, code, reason });
    for (const w of sub.waiters) {
      clearTimeout(w.timer);
      w.reject(new ThrongError(code, reason));
    }
    sub.waiters = [];
  }

  /**
   * A `subscribed` (from `/ws` or `/sse`). With `since` and recovered: the missed messages follow. Not
   * recovered: in another epoch (a restarted node, or the channel forgotten and created again), the new
   * epoch's history from offset 0 is fetched and delivered before the live messages (which wait meanwhile),
   * deduplicated by offset; either way the app gets an `unrecovered` event so it can reload what it shows.
   */
  _onSubscribed(sub, r, since) {
    if (this._subs.get(sub.channel) !== sub) {
      // Unsubscribed while the subscribe was on its way: undo it on the server.
      if (this.transport === "websocket" && !this._subs.has(sub.channel)) {
        this._request({ type: "unsubscribe", channel: sub.channel }).catch(() => {});
      }
      return;
    }
    sub.active = true;
    const info = { channel: sub.channel, offset: r.offset, epoch: r.epoch, recovered: r.recovered };
    if (since && !r.recovered) {
      if (r.epoch !== since.epoch && r.offset > 0) {
        sub.epoch = r.epoch;
        sub.offset = 0;
        this._catchUp(sub, { reason: "epoch", previous: since, upTo: r.offset });
      } else {
        sub.epoch = r.epoch;
        sub.offset = r.offset;
        this.emit("unrecovered", {
          channel: sub.channel,
          reason: r.epoch !== since.epoch ? "epoch" : "history",
          previous: since,
          replayed: 0,
          complete: r.offset === 0,
        });
      }
    } else if (!since) {
      sub.epoch = r.epoch;
      sub.offset = r.offset;
    } else {
      sub.epoch = r.epoch;
    }
    this.emit("subscribed", info);
    for (const w of sub.waiters) {
      clearTimeout(w.timer);
      w.resolve(info);
    }
    sub.waiters = [];
  }

  /** Frames other than welcome and the replies to our requests. */
  _onFrame(msg) {
    if (msg.id !== undefined && this._pending.has(msg.id)) {
      const p = this._pending.get(msg.id);
      this._pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.type === "error") {
        p.reject(new ThrongError(msg.code, msg.reason));
      } else {
        if (p.onReply) p.onReply(msg);
        p.resolve(msg);
      }
      return;
    }
    switch (msg.type) {
      case "message":
        this._onMessage(msg);
        break;
      case "gap":
        this._onGap(msg);
        break;
      case "pong":
        break;
      case "error":
        this.emit("error", new ThrongError(msg.code, msg.reason));
        break;
      default:
        break;
    }
  }

  _onMessage(msg) {
    const sub = this._subs.get(msg.channel);
    if (!sub) return;
    if (sub.buffering) {
      sub.buffer.push(msg);
      return;
    }
    this._deliver(sub, msg);
  }

  /** Hands a message to the app unless it was delivered already (offset at or below the position). */
  _deliver(sub, msg) {
    if (sub.offset !== undefined && msg.offset <= sub.offset) return false;
    sub.offset = msg.offset;
    const m = { channel: msg.channel, offset: msg.offset, data: msg.data };
    for (const h of [...sub.handlers]) {
      try {
        h(m);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
    }
    this.emit("message", m);
    return true;
  }

  _onGap(msg) {
    const sub = this._subs.get(msg.channel);
    if (!sub || sub.offset === undefined || msg.to <= sub.offset) return;
    if (sub.buffering) return; // a catch-up is under way and covers it
    this._catchUp(sub, { reason: "gap", from: msg.from, to: msg.to });
  }

  /**
   * Fetches what `sub` missed after its position from history (WebSocket: `history` with `since`; SSE: a
   * `/poll` with `since`), delivers it in order, then the live messages that arrived meanwhile, without
   * duplicates. Emits `unrecovered` (epoch change) or `gap` with what it could replay.
   */
  async _catchUp(sub, why) {
    sub.buffering = true;
    sub.buffer = [];
    // Where the live messages take over: the subscribed offset (epoch change) or the gap's end.
    const target = why.upTo ?? why.to;
    let replayed = 0;
    let complete = false;
    try {
      if (this.transport === "sse") {
        // /poll answers at most 256 KiB at a time: ask again from the new position until the target is
        // reached (never from the head itself: a poll with nothing newer would be held).
        for (let round = 0; round < 64 && sub.offset < target; round++) {
          const r = await this._pollSince(sub.channel, { offset: sub.offset, epoch: sub.epoch });
          if (this._subs.get(sub.channel) !== sub || !sub.buffering) return;
          for (const m of r.messages) if (this._deliver(sub, m)) replayed++;
          complete = r.recovered;
          if (!r.recovered || r.messages.length === 0) break;
        }
      } else {
        const since = { offset: sub.offset, epoch: sub.epoch };
        const limit = this.options.historyLimit;
        const r = await this._request({ type: "history", channel: sub.channel, since, limit });
        if (this._subs.get(sub.channel) !== sub || !sub.buffering) return;
        for (const m of r.messages || []) {
          if (this._deliver(sub, { channel: sub.channel, offset: m.offset, data: m.data })) replayed++;
        }
        complete = r.recovered === true;
      }
      // Complete means every message up to where the live ones start was delivered.
      complete = complete && sub.offset >= target;
    } catch (err) {
      if (this._subs.get(sub.channel) !== sub || !sub.buffering) return;
      this.emit("error", err);
    }
    sub.buffering = false;
    const live = sub.buffer;
    sub.buffer = [];
    if (why.upTo !== undefined && !complete && sub.offset < why.upTo) {
      // History did not have everything: skip to where the live messages start.
      sub.offset = why.upTo;
    }
    for (const m of live) this._deliver(sub, m);
    if (why.reason === "gap") this.emit("gap", { channel: sub.channel, from: why.from, to: why.to, replayed, complete });
    else this.emit("unrecovered", { channel: sub.channel, reason: why.reason, previous: why.previous, replayed, complete });
  }

  // ---------------------------------------------------------------- HTTP: SSE fallback, poll, publish

  _fetch(url, init = {}, timeout = this.options.requestTimeout) {
    const f = this.options.fetch || globalThis.fetch;
    if (typeof f !== "function") return Promise.reject(new ThrongError("not_available", "no fetch implementation"));
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), timeout);
    return f(url, { ...init, signal: ctl.signal }).then(
      (res) => {
        clearTimeout(timer);
        return res;
      },
      (err) => {
        clearTimeout(timer);
        throw ctl.signal.aborted ? new ThrongError("timeout", `no answer from ${url} within ${timeout} ms`) : err;
      },
    );
  }

  /** Identity for HTTP requests: the query part and the headers. */
  _httpAuth(q) {
    const headers = {};
    if (this.token !== undefined) {
      if (this.options.tokenTransport === "query") q.append("token", this.token);
      else headers.Authorization = "Bearer " + this.token;
    } else if (this.options.user !== undefined) {
      q.append("user", this.options.user);
    }
    return headers;
  }

  _openSse() {
    const channels = [...this._subs.keys()];
    const q = new URLSearchParams();
    for (const c of channels) q.append("channel", c);
    const since = channels.map((c) => {
      const s = this._subs.get(c);
      return s.epoch && s.offset !== undefined ? `${s.epoch}:${s.offset}` : "-";
    });
    if (since.some((s) => s !== "-")) q.set("since", since.join(","));
    const headers = { Accept: "text/event-stream", ...this._httpAuth(q) };
    const sinceBy = new Map(channels.map((c, i) => [c, since[i]]));
    const f = this.options.fetch || globalThis.fetch;
    if (typeof f !== "function") {
      this._failed("sse", 1006, "no fetch implementation");
      return;
    }
    const ctl = new AbortController();
    const stream = { abort: () => ctl.abort(), channels, welcomed: false };
    this._sse = stream;
    const alive = () => this._sse === stream;
    const timer = this._later(() => {
      if (alive() && !stream.welcomed) {
        stream.abort();
        this._sse = undefined;
        this._failed("sse", 1006, "no welcome within connectTimeout");
      }
    }, this.options.connectTimeout);
    const ended = (code, reason) => {
      clearTimeout(timer);
      this._timers.delete(timer);
      if (!alive()) return;
      this._sse = undefined;
      if (stream.welcomed) this._lost(code, reason);
      else this._failed("sse", code, reason);
    };
    if (channels.length === 0) {
      // /sse needs a channel: with none, the stream starts with the first subscription. Meanwhile the
      // fallback counts as connected once the server answers over HTTP at all (/health, any status; opaque
      // across origins in a browser).
      const init = { signal: ctl.signal, cache: "no-store" };
      if (typeof window !== "undefined") init.mode = "no-cors";
      f(this._urls.http + "/health", init).then(
        () => {
          if (!alive()) return;
          clearTimeout(timer);
          this._timers.delete(timer);
          stream.welcomed = true;
          this._lastRecv = now();
          if (this.transport !== "sse") this._onWelcome({ client: undefined, user: this.user, ping_interval: 25 }, "sse");
        },
        (err) => {
          if (alive()) ended(1006, String(err && err.message ? err.message : err));
        },
      );
      return;
    }
    f(this._urls.http + "/sse?" + q.toString(), { headers, signal: ctl.signal, cache: "no-store" })
      .then(async (res) => {
        if (!alive()) return;
        if (!res.ok) {
          let reason = "";
          try {
            const text = await res.text();
            try {
              reason = JSON.parse(text).reason || text;
            } catch {
              reason = text;
            }
          } catch {
            // no body
          }
          if (!alive()) return;
          // A refusal that names one channel (not allowed, bad name, unknown namespace) drops that
          // subscription, as a refused subscribe does over WebSocket, and the stream starts without it.
          const refused = (res.status === 400 || res.status === 403) && channels.find((c) => reason.startsWith(`channel ${JSON.stringify(c)}`));
          if (refused) {
            clearTimeout(timer);
            this._timers.delete(timer);
            this._sse = undefined;
            this._dropSub(this._subs.get(refused), res.status === 403 ? "forbidden" : "bad_request", reason);
            this._openSse();
            return;
          }
          const code =
            res.status === 401
              ? 4001
              : res.status === 403 && !/max_connections/.test(reason)
                ? 4003
                : res.status === 429
                  ? 4029
                  : res.status === 503 || res.status === 403
                    ? 1013
                    : 1006;
          ended(code, `HTTP ${res.status} ${reason}`.trim());
          return;
        }
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        let ev = { event: "", data: [] };
        for (;;) {
          const { value, done } = await reader.read();
          if (!alive()) return;
          if (done) break;
          this._lastRecv = now();
          buf += decoder.decode(value, { stream: true });
          let start = 0;
          let nl;
          for (; (nl = buf.indexOf("\n", start)) >= 0; start = nl + 1) {
            let line = buf.slice(start, nl);
            if (line.endsWith("\r")) line = line.slice(0, -1);
            if (line === "") {
              if (ev.data.length) {
                const closed = this._onSseEvent(stream, ev.event || "message", ev.data.join("\n"), sinceBy);
                if (closed) {
                  ctl.abort();
                  ended(closed.code, closed.reason);
                  return;
                }
                if (!alive()) return;
              }
              ev = { event: "", data: [] };
            } else if (line.startsWith(":")) {
              // comment: the server's keep-alive
            } else {
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              let val = i < 0 ? "" : line.slice(i + 1);
              if (val.startsWith(" ")) val = val.slice(1);
              if (field === "event") ev.event = val;
              else if (field === "data") ev.data.push(val);
            }
          }
          buf = buf.slice(start);
        }
        ended(1006, "SSE stream ended");
      })
      .catch((err) => {
        if (alive()) ended(1006, String(err && err.message ? err.message : err));
      });
  }

  /** One SSE event; returns {code, reason} when it is the server's `close`. */
  _onSseEvent(stream, event, data, sinceBy) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return undefined;
    }
    switch (event) {
      case "welcome":
        stream.welcomed = true;
        this._lastRecv = now();
        if (this.transport !== "sse") {
          this._onWelcome(msg, "sse");
          this._startHeartbeat();
        }
        return undefined;
      case "subscribed": {
        const sub = this._subs.get(msg.channel);
        if (!sub) return undefined;
        const s = sinceBy.get(msg.channel);
        const since = s && s !== "-" ? { epoch: s.split(":")[0], offset: Number(s.split(":")[1]) } : undefined;
        this._onSubscribed(sub, msg, since);
        return undefined;
      }
      case "message":
        this._onMessage(msg);
        return undefined;
      case "gap":
        this._onGap(msg);
        return undefined;
      case "error": {
        const sub = this._subs.get(msg.channel);
        this.emit("subscribe_error", { channel: msg.channel, code: msg.code, reason: msg.reason });
        if (sub) {
          for (const w of sub.waiters) {
            clearTimeout(w.timer);
            w.reject(new ThrongError(msg.code, msg.reason));
          }
          sub.waiters = [];
        }
        return undefined;
      }
      case "close":
        return { code: msg.code, reason: msg.reason };
      default:
        return undefined;
    }
  }

  /** Restarts the SSE stream (new channel list or token), resuming every channel from its position. */
  _restartSseSoon() {
    if (this._sseRestart) return;
    this._sseRestart = true;
    queueMicrotask(() => {
      this._sseRestart = false;
      if (this.transport !== "sse") return;
      if (this._sse) this._sse.abort();
      this._sse = undefined;
      for (const sub of this._subs.values()) {
        sub.active = false;
        sub.buffering = false;
        sub.buffer = [];
      }
      this._openSse();
    });
  }

  /** `GET /poll` with `since`: answered at once with the messages after it (history), as `/poll` does. */
  async _pollSince(channel, since) {
    const q = new URLSearchParams();
    q.append("channel", channel);
    q.append("since", `${channel}:${since.epoch}:${since.offset}`);
    const headers = this._httpAuth(q);
    const res = await this._fetch(this._urls.http + "/poll?" + q.toString(), { headers, cache: "no-store" });
    if (!res.ok) throw new ThrongError(`http_${res.status}`, await res.text());
    const r = await res.json();
    const messages = (r.messages || []).filter((m) => m.channel === channel);
    return { messages, recovered: r.recovered !== false };
  }

  async _httpPublish(channel, data, timeout) {
    const q = new URLSearchParams();
    const headers = { "Content-Type": "application/json", ...this._httpAuth(q) };
    const qs = q.toString();
    const res = await this._fetch(
      this._urls.http + "/publish" + (qs ? "?" + qs : ""),
      { method: "POST", headers, body: JSON.stringify({ channel, data }) },
      timeout,
    );
    const text = await res.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = {};
    }
    if (!res.ok) throw new ThrongError(body.error || `http_${res.status}`, body.reason || text);
    return { channel: body.channel, offset: body.offset };
  }

  // ---------------------------------------------------------------- back from SSE to WebSocket

  _scheduleProbe() {
    this._clearTimer("_probeTimer");
    if (!this.options.wsProbeInterval) return;
    this._probeTimer = this._later(() => this._probeWs(), this.options.wsProbeInterval);
  }

  /** While on SSE: tries a WebSocket; when it reaches welcome it takes over and the stream is closed. */
  _probeWs() {
    this._probeTimer = undefined;
    if (this.transport !== "sse") return;
    const WS = this.options.WebSocket || globalThis.WebSocket;
    if (typeof WS !== "function") return;
    const { url, protocols } = this._wsTarget();
    let ws;
    try {
      ws = new WS(url, protocols);
    } catch {
      this._scheduleProbe();
      return;
    }
    this._probe = ws;
    const give_up = () => {
      if (this._probe !== ws) return;
      this._probe = undefined;
      this._detach(ws);
      this._scheduleProbe();
    };
    const timer = this._later(give_up, this.options.connectTimeout);
    ws.onclose = () => {
      clearTimeout(timer);
      this._timers.delete(timer);
      give_up();
    };
    ws.onerror = () => {};
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(textOf(ev.data));
      } catch {
        return;
      }
      if (msg.type !== "welcome" || this._probe !== ws) return;
      clearTimeout(timer);
      this._timers.delete(timer);
      this._probe = undefined;
      if (this.transport !== "sse") {
        this._detach(ws);
        return;
      }
      // Switch: stop the stream (positions are where it left them), adopt the socket, resubscribe with since.
      if (this._sse) this._sse.abort();
      this._sse = undefined;
      this._stopHeartbeat();
      for (const sub of this._subs.values()) {
        sub.active = false;
        sub.buffering = false;
        sub.buffer = [];
      }
      this.transport = undefined;
      this._ws = ws;
      this._adoptWs(ws);
      this._onWelcome(msg, "websocket");
    };
  }

  /** A frame on `ws`, if `ws` is the main socket: notes that the server spoke, and parses it (undefined when
   * the socket is not the main one or the frame is not JSON). */
  _received(ws, ev) {
    if (this._ws !== ws) return undefined;
    this._lastRecv = now();
    this._pingAt = 0;
    try {
      return JSON.parse(textOf(ev.data));
    } catch {
      return undefined;
    }
  }

  /** Gives an open socket (a successful probe) the handlers of the main connection. */
  _adoptWs(ws) {
    ws.onmessage = (ev) => {
      const msg = this._received(ws, ev);
      if (msg) this._onFrame(msg);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._detach(ws);
      this._lost(ev.code || 1006, ev.reason || "");
    };
    ws.onerror = () => {};
  }
}

/** `new ThrongClient(options)`. */
function connect(options) {
  return new ThrongClient(options);
}

if (typeof window !== "undefined" && !window.Throng) {
  window.Throng = { ThrongClient, ThrongError, connect, backoffDelay, closePolicy, tokenExpiry, DEFAULTS, STATES, VERSION };
}

export { ThrongClient, ThrongError, connect, backoffDelay, closePolicy, tokenExpiry, DEFAULTS, STATES, VERSION };
