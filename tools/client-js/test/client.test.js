// The client's connection logic against a scripted WebSocket and fake timers (no server): the close-code
// policy as it acts, getToken on 4001, the half-open detection time, subscriptions restored with `since`,
// the epoch-change catch-up without duplicates, and the SSE fallback decision.
import { test, beforeEach, afterEach } from "node:test";
import assert from "node:assert/strict";
import { ThrongClient } from "../throng.js";

class FakeWS {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = undefined;
    this.autoPong = true; // answer pings as a live server does
    FakeWS.all.push(this);
  }
  send(d) {
    const m = JSON.parse(d);
    this.sent.push(m);
    if (m.type === "ping" && this.autoPong) this.recv({ type: "pong", id: m.id });
  }
  close(code, reason) {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }
  recv(obj) {
    this.onmessage && this.onmessage({ data: JSON.stringify(obj) });
  }
  welcome(user = "alice") {
    this.readyState = 1;
    this.onopen && this.onopen({});
    this.recv({ type: "welcome", client: "0-1-1", user, ping_interval: 25, version: 1 });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason });
  }
  /** The last command of `type` sent. */
  last(type) {
    return [...this.sent].reverse().find((m) => m.type === type);
  }
  static latest() {
    return FakeWS.all[FakeWS.all.length - 1];
  }
}

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
const jwt = (claims) => `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
// A fake clock (portable to every Node the tests may meet: Node 18's test runner cannot mock Date): the
// client's setTimeout, clearTimeout and Date.now are replaced for each test, and advance(ms) runs every timer
// that falls due, in order, at its own time, timers set by timers included.
const real = { setTimeout: globalThis.setTimeout, clearTimeout: globalThis.clearTimeout, now: Date.now };
const clock = { t: 0, seq: 0, timers: new Map() };
function installClock(start) {
  clock.t = start;
  clock.timers = new Map();
  globalThis.setTimeout = (fn, ms = 0) => {
    const id = ++clock.seq;
    clock.timers.set(id, { at: clock.t + Math.max(0, ms), fn });
    return id;
  };
  globalThis.clearTimeout = (id) => clock.timers.delete(id);
  Date.now = () => clock.t;
}
function uninstallClock() {
  globalThis.setTimeout = real.setTimeout;
  globalThis.clearTimeout = real.clearTimeout;
  Date.now = real.now;
}
function advance(ms) {
  const end = clock.t + ms;
  for (;;) {
    let next;
    for (const [id, tm] of clock.timers) if (tm.at <= end && (!next || tm.at < next[1].at)) next = [id, tm];
    if (!next) break;
    clock.timers.delete(next[0]);
    clock.t = next[1].at;
    next[1].fn();
  }
  clock.t = end;
}
const flush = () => new Promise((r) => setImmediate(r));
async function settle() {
  for (let i = 0; i < 5; i++) await flush();
}

beforeEach(() => {
  FakeWS.all = [];
  installClock(1_700_000_000_000);
});
afterEach(() => {
  uninstallClock();
});

function client(opts = {}) {
  const noFetch = () => Promise.reject(new Error("no network in this test"));
  return new ThrongClient({ url: "http://127.0.0.1:9", WebSocket: FakeWS, fetch: noFetch, ...opts });
}

test("the token goes in the subprotocol list by default, in ?token= as an option, and ?user= in open mode", async () => {
  const t = jwt({ sub: "alice" });
  const a = client({ token: t });
  await settle();
  assert.equal(FakeWS.latest().url, "ws://127.0.0.1:9/ws");
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1", "bearer." + t]);
  a.close();
  const b = client({ token: t, tokenTransport: "query", url: "https://rt.example.com" });
  await settle();
  assert.equal(FakeWS.latest().url, "wss://rt.example.com/ws?token=" + t);
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1"]);
  b.close();
  const c = client({ user: "bob" });
  await settle();
  assert.equal(FakeWS.latest().url, "ws://127.0.0.1:9/ws?user=bob");
  c.close();
});

test("4001: no retry until getToken() returns a new token, then a clean reconnect with it", async () => {
  const old = jwt({ sub: "alice", exp: 1_700_000_600 });
  const fresh = jwt({ sub: "alice", exp: 1_700_001_200 });
  const answers = [old, fresh]; // first the same token again (not new), then a new one
  const asked = [];
  const c = client({ token: old, refresh: false, getToken: async (ctx) => (asked.push(ctx), answers.shift()) });
  await settle();
  FakeWS.latest().welcome();
  FakeWS.latest().serverClose(4001, "token expired");
  await settle();
  assert.equal(asked.length, 1, "getToken asked once");
  assert.equal(asked[0].code, 4001);
  assert.equal(c.state, "unauthorized", "the same token is not new: the client waits");
  advance(120_000);
  await settle();
  assert.equal(FakeWS.all.length, 1, "no reconnect while no new token came");
  c.setToken(fresh);
  await settle();
  assert.equal(FakeWS.all.length, 2);
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1", "bearer." + fresh]);
  c.close();

  // With getToken answering a new token at once, the reconnect follows directly.
  FakeWS.all = [];
  const d = client({ token: old, refresh: false, getToken: async () => fresh });
  await settle();
  FakeWS.latest().welcome();
  const states = [];
  d.on("state", (e) => states.push(e.state));
  FakeWS.latest().serverClose(4001, "token expired");
  await settle();
  assert.equal(FakeWS.all.length, 2, "reconnected");
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1", "bearer." + fresh]);
  assert.deepEqual(states, ["unauthorized", "connecting"]);
  d.close();
});

test("without a token, the first comes from getToken() before the first attempt", async () => {
  const t = jwt({ sub: "alice", exp: 1_700_000_600 });
  let asked = 0;
  const c = client({ getToken: async () => (asked++, t) });
  await settle();
  assert.equal(asked, 1);
  assert.equal(FakeWS.all.length, 1);
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1", "bearer." + t]);
  c.close();
});

test("unsubscribing while the subscribe is on its way undoes it on the server", async () => {
  const c = client({ user: "a" });
  await settle();
  const ws = FakeWS.latest();
  ws.welcome();
  c.subscribe("chat:x").catch(() => {});
  const sub = ws.last("subscribe");
  c.unsubscribe("chat:x");
  assert.equal(ws.last("unsubscribe"), undefined, "not subscribed yet: nothing to undo so far");
  ws.recv({ type: "subscribed", id: sub.id, channel: "chat:x", offset: 0, epoch: "aaaaaaaaaaaaaaaa", recovered: false });
  assert.equal(ws.last("unsubscribe").channel, "chat:x");
  assert.deepEqual(c.subscriptions(), []);
  c.close();
});

test("an expired token is replaced before connecting; a token is refreshed at 80% of its life", async () => {
  const expired = jwt({ sub: "alice", exp: 1_700_000_000 - 60 });
  const t1 = jwt({ sub: "alice", exp: 1_700_000_100 });
  const t2 = jwt({ sub: "alice", exp: 1_700_000_200 });
  const tokens = [t1, t2];
  const c = client({ token: expired, getToken: async () => tokens.shift() });
  await settle();
  assert.deepEqual(FakeWS.latest().protocols, ["throng.v1", "bearer." + t1], "never tried the expired one");
  FakeWS.latest().welcome();
  advance(79_000);
  await settle();
  assert.equal(FakeWS.latest().last("refresh"), undefined, "not before 80% of 100 s");
  advance(1_000);
  await settle();
  const r = FakeWS.latest().last("refresh");
  assert.equal(r.token, t2);
  const refreshed = new Promise((res) => c.once("refreshed", res));
  FakeWS.latest().recv({ type: "refreshed", id: r.id, expires: 1_700_000_200 });
  assert.equal((await refreshed).expires, 1_700_000_200);
  assert.equal(c.token, t2);
  assert.equal(FakeWS.all.length, 1, "refreshed on the same connection");
  c.close();
});

test("1001 and 1013 retry spread over the spread window; 4000 stops; 1006 backs off", async () => {
  const c = client({ user: "a", spreadWindow: 10_000 });
  await settle();
  const seen = [];
  c.on("disconnected", (e) => seen.push(e));
  FakeWS.latest().welcome();
  FakeWS.latest().serverClose(1001, "shutting down");
  await settle();
  assert.equal(seen[0].policy, "spread");
  assert.ok(seen[0].willRetry && seen[0].delay >= 0 && seen[0].delay < 10_000);
  advance(10_000);
  await settle();
  assert.equal(FakeWS.all.length, 2, "retried within the window");
  FakeWS.latest().welcome();
  FakeWS.latest().serverClose(1013, "try again later");
  await settle();
  assert.equal(seen[1].policy, "spread");
  advance(10_000);
  await settle();
  FakeWS.latest().welcome();
  FakeWS.latest().serverClose(1006);
  await settle();
  assert.equal(seen[2].policy, "retry");
  assert.ok(seen[2].delay < 500, "first backoff window is 500 ms");
  advance(500);
  await settle();
  FakeWS.latest().welcome();
  FakeWS.latest().serverClose(4000, "disconnected by the server");
  await settle();
  assert.equal(c.state, "stopped");
  assert.equal(seen[3].willRetry, false);
  const n = FakeWS.all.length;
  advance(600_000);
  await settle();
  assert.equal(FakeWS.all.length, n, "no retry after 4000");
  c.close();
});

test("a half-open connection is noticed within pingIdle + pongTimeout (15 s by default)", async () => {
  const c = client({ user: "a" });
  await settle();
  const ws = FakeWS.latest();
  ws.autoPong = false;
  ws.welcome();
  advance(9_999);
  assert.equal(ws.last("ping"), undefined, "no ping while within pingIdle");
  advance(1);
  assert.ok(ws.last("ping"), "a ping after 10 s of silence");
  // Traffic answers it: no close.
  ws.recv({ type: "pong", id: ws.last("ping").id });
  const silentFrom = Date.now();
  advance(9_000);
  assert.equal(c.state, "connected");
  // Now the server goes silent for good (half-open): the next ping goes unanswered.
  const lost = new Promise((res) => c.once("disconnected", (e) => res({ ...e, at: Date.now() })));
  advance(15_000);
  const e = await lost;
  assert.match(e.reason, /ping timeout/);
  assert.equal(ws.closedWith.code, 4000, "the dead socket is closed by the client");
  assert.equal(e.at - silentFrom, 15_000, "given up 10 s (pingIdle) + 5 s (pongTimeout) after the last frame");
  assert.equal(e.willRetry, true);
  c.close();
});

test("resubscribe with since after a reconnect; duplicates dropped; an epoch change is caught up from history", async () => {
  const c = client({ user: "a" });
  await settle();
  const got = [];
  const unrecovered = [];
  c.on("unrecovered", (e) => unrecovered.push(e));
  const p = c.subscribe("chat:x", (m) => got.push(m.offset));
  let ws = FakeWS.latest();
  ws.welcome();
  const sub = ws.last("subscribe");
  assert.equal(sub.since, undefined);
  ws.recv({ type: "subscribed", id: sub.id, channel: "chat:x", offset: 3, epoch: "aaaaaaaaaaaaaaaa", recovered: false });
  assert.deepEqual(await p, { channel: "chat:x", offset: 3, epoch: "aaaaaaaaaaaaaaaa", recovered: false });
  for (const o of [4, 5]) ws.recv({ type: "message", channel: "chat:x", offset: o, data: o });
  ws.serverClose(1006);
  advance(500);
  await settle();

  // Same node: recovered, replay 6..7, and a replayed duplicate (5) is dropped.
  ws = FakeWS.latest();
  ws.welcome();
  let s = ws.last("subscribe");
  assert.deepEqual(s.since, { offset: 5, epoch: "aaaaaaaaaaaaaaaa" });
  ws.recv({ type: "subscribed", id: s.id, channel: "chat:x", offset: 7, epoch: "aaaaaaaaaaaaaaaa", recovered: true });
  for (const o of [5, 6, 7]) ws.recv({ type: "message", channel: "chat:x", offset: o, data: o });
  assert.deepEqual(got, [4, 5, 6, 7]);
  ws.serverClose(1006);
  advance(500);
  await settle();

  // A restarted node: new epoch, 3 messages published since; live message 4 arrives before history answers.
  ws = FakeWS.latest();
  ws.welcome();
  s = ws.last("subscribe");
  assert.deepEqual(s.since, { offset: 7, epoch: "aaaaaaaaaaaaaaaa" });
  ws.recv({ type: "subscribed", id: s.id, channel: "chat:x", offset: 3, epoch: "bbbbbbbbbbbbbbbb", recovered: false });
  const h = ws.last("history");
  assert.deepEqual(h.since, { offset: 0, epoch: "bbbbbbbbbbbbbbbb" });
  ws.recv({ type: "message", channel: "chat:x", offset: 4, data: "live4" });
  assert.deepEqual(got, [4, 5, 6, 7], "live messages wait for the catch-up");
  const msgs = [1, 2, 3, 4].map((o) => ({ offset: o, data: o }));
  ws.recv({ type: "history", id: h.id, channel: "chat:x", offset: 4, epoch: "bbbbbbbbbbbbbbbb", recovered: true, messages: msgs });
  ws.recv({ type: "message", channel: "chat:x", offset: 5, data: 5 });
  await settle();
  assert.deepEqual(got, [4, 5, 6, 7, 1, 2, 3, 4, 5], "history 1..4, then live 5; live 4 not twice");
  assert.equal(unrecovered.length, 1);
  assert.deepEqual(
    { reason: unrecovered[0].reason, replayed: unrecovered[0].replayed, complete: unrecovered[0].complete },
    { reason: "epoch", replayed: 4, complete: true },
  );
  c.close();
});

test("after fallbackAfter failed WebSocket attempts the client tries SSE, and alternates while both fail", async () => {
  const urls = [];
  const fetch = (url) => {
    urls.push(url);
    return Promise.reject(new Error("refused"));
  };
  const c = client({ user: "a", fetch, fallbackAfter: 3, backoff: { initial: 10, max: 10 } });
  c.subscribe("chat:x").catch(() => {});
  const transports = [];
  c.on("connecting", (e) => transports.push(e.transport));
  await settle();
  for (let i = 0; i < 6; i++) {
    const ws = FakeWS.latest();
    if (ws && ws.readyState === 0) ws.serverClose(1006);
    await settle();
    advance(10);
    await settle();
  }
  assert.deepEqual(transports.slice(0, 5), ["websocket", "websocket", "sse", "websocket", "sse"]);
  assert.match(urls[0], /^http:\/\/127\.0\.0\.1:9\/sse\?channel=chat%3Ax&user=a$/);
  c.close();
});

/** A fetch whose /sse responses are streams the test writes to, chunk by chunk. */
function sseFetch() {
  const streams = [];
  const fetch = (url, init) => {
    const chunks = [];
    let wake;
    const stream = {
      url,
      init,
      push(text) {
        chunks.push(new TextEncoder().encode(text));
        if (wake) wake();
      },
      end() {
        chunks.push(null);
        if (wake) wake();
      },
    };
    streams.push(stream);
    const reader = {
      async read() {
        while (chunks.length === 0) {
          await new Promise((r) => (wake = r));
          wake = undefined;
        }
        const c = chunks.shift();
        return c === null ? { done: true } : { done: false, value: c };
      },
    };
    init.signal.addEventListener("abort", () => stream.end());
    return Promise.resolve({ ok: true, status: 200, body: { getReader: () => reader }, text: async () => "" });
  };
  return { fetch, streams };
}

test("SSE: events split across chunks are parsed; a `close` event with 4001 asks getToken and resumes with since", async () => {
  const { fetch, streams } = sseFetch();
  const t1 = jwt({ sub: "alice", exp: 1_700_000_600 });
  const t2 = jwt({ sub: "alice", exp: 1_700_001_200 });
  class Blocked {
    constructor() {
      throw new Error("blocked");
    }
  }
  const c = client({
    token: t1,
    refresh: false,
    fetch,
    WebSocket: Blocked,
    fallbackAfter: 1,
    wsProbeInterval: 0,
    getToken: async () => t2,
  });
  const got = [];
  c.subscribe("chat:x", (m) => got.push(m.data));
  await settle();
  advance(500);
  await settle();
  assert.equal(streams.length, 1, "SSE after one failed WebSocket attempt");
  const s = streams[0];
  assert.equal(s.url, "http://127.0.0.1:9/sse?channel=chat%3Ax");
  assert.equal(s.init.headers.Authorization, "Bearer " + t1, "the token in a header, not the URL");
  s.push('event: welcome\ndata: {"type":"welcome","client":"0-1-2","user":"alice","ping_interval":25,"version":1}\n\n');
  s.push('event: subscribed\ndata: {"type":"subscribed","channel":"chat:x","offset":0,"epoch":"cccccccccccccccc","reco');
  s.push('vered":false}\n\n: keep-alive\n\ndata: {"type":"message","channel":"chat:x","offset":1,"data":"a"}\nid: cccccccccccccccc:1\n\n');
  s.push('data: {"type":"message","channel":"chat:x","offset":2,"data":"b"}\r\n\r\n');
  await settle();
  assert.equal(c.state, "fallback");
  assert.deepEqual(got, ["a", "b"]);
  s.push('event: close\ndata: {"type":"close","code":4001,"reason":"token expired"}\n\n');
  await settle();
  assert.equal(streams.length, 2, "reconnected at once with the new token");
  const s2 = streams[1];
  assert.equal(s2.init.headers.Authorization, "Bearer " + t2);
  assert.equal(s2.url, "http://127.0.0.1:9/sse?channel=chat%3Ax&since=cccccccccccccccc%3A2");
  c.close();
});

test("SSE: a refusal naming one channel drops that subscription only, as over WebSocket", async () => {
  const { fetch: streamFetch, streams } = sseFetch();
  const urls = [];
  const fetch = (url, init) => {
    urls.push(url);
    if (urls.length === 1) {
      const body = JSON.stringify({ error: "forbidden", reason: 'channel "secret:x": the token does not grant it' });
      return Promise.resolve({ ok: false, status: 403, text: async () => body });
    }
    return streamFetch(url, init);
  };
  class Blocked {
    constructor() {
      throw new Error("blocked");
    }
  }
  const c = client({ user: "a", fetch, WebSocket: Blocked, fallbackAfter: 1, wsProbeInterval: 0 });
  const errors = [];
  c.on("subscribe_error", (e) => errors.push(e));
  const refused = c.subscribe("secret:x").then(
    () => "subscribed",
    (e) => e.code,
  );
  c.subscribe("chat:x");
  await settle();
  advance(500);
  await settle();
  assert.equal(urls[0], "http://127.0.0.1:9/sse?channel=secret%3Ax&channel=chat%3Ax&user=a");
  assert.equal(await refused, "forbidden");
  assert.deepEqual(errors.map((e) => e.channel), ["secret:x"]);
  assert.equal(streams.length, 1);
  assert.equal(streams[0].url, "http://127.0.0.1:9/sse?channel=chat%3Ax&user=a", "the stream starts without it at once");
  assert.deepEqual(c.subscriptions().map((s) => s.channel), ["chat:x"]);
  c.close();
});
