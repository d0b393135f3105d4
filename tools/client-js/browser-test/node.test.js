// throng.js in Node against the real throng binary: over WebSocket with the `ws` package passed in (what
// Node 20 needs; Node 22 has a built-in WebSocket), and over the SSE fallback with fetch when no WebSocket
// works (Node 20 without `ws`).
//
//   cd tools/client-js/browser-test && npm ci && node --test
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { ThrongClient } from "../throng.js";
import { API_KEY, apiPublish, startThrong } from "./support.js";

const opts = { backoff: { initial: 100, max: 500 }, requestTimeout: 5000 };

function collect(client, channel) {
  const got = [];
  const sub = client.subscribe(channel, (m) => got.push(m.data));
  return { got, sub };
}

async function until(check, what, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not reached within ${timeout} ms: ${what()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("Node with the ws package: subscribe, publish, presence, history; a restart recovered", async () => {
  let srv = await startThrong({ args: ["--api-key", API_KEY] });
  const port = srv.port;
  const alice = new ThrongClient({ url: srv.base, user: "alice", WebSocket, ...opts });
  const bob = new ThrongClient({ url: srv.base, user: "bob", WebSocket, ...opts });
  try {
    const a = collect(alice, "chat:node");
    const b = collect(bob, "chat:node");
    const [{ epoch }] = await Promise.all([a.sub, b.sub]);
    assert.equal(alice.transport, "websocket");
    assert.deepEqual(await alice.publish("chat:node", { n: 1 }), { offset: 1 });
    await bob.publish("chat:node", { n: 2 });
    await until(() => a.got.length === 2 && b.got.length === 2, () => JSON.stringify([a.got, b.got]));
    assert.deepEqual(a.got, [{ n: 1 }, { n: 2 }]);
    assert.deepEqual(b.got, a.got);
    const p = await alice.presence("chat:node");
    assert.deepEqual(p.users.map((u) => u.user), ["alice", "bob"]);
    const h = await bob.history("chat:node", { since: { offset: 1, epoch } });
    assert.equal(h.recovered, true);
    assert.deepEqual(h.messages.map((m) => m.data), [{ n: 2 }]);

    // A request to a channel the server refuses is rejected with the server's code.
    await assert.rejects(alice.publish("user:bob", 1), (e) => e.code === "forbidden");

    await srv.kill("SIGKILL");
    srv = await startThrong({ port, args: ["--api-key", API_KEY] });
    await apiPublish(srv.base, "chat:node", { n: "after restart" });
    await until(() => a.got.length === 3 && b.got.length === 3, () => JSON.stringify([a.got, b.got]), 15_000);
    assert.deepEqual(a.got.at(-1), { n: "after restart" });
    assert.deepEqual(b.got, a.got);
  } finally {
    alice.close();
    bob.close();
    await srv.kill();
  }
});

test("Node without a working WebSocket: the SSE fallback over fetch receives, publishes, survives a restart", async () => {
  let srv = await startThrong({ args: ["--api-key", API_KEY] });
  const port = srv.port;
  class Blocked {
    constructor() {
      throw new Error("WebSocket blocked");
    }
  }
  // A fetch that can hold the client off the server (refusing its requests as a network would).
  let held = false;
  const fetch = (url, init) => (held ? Promise.reject(new TypeError("held off")) : globalThis.fetch(url, init));
  const c = new ThrongClient({ url: srv.base, user: "erin", WebSocket: Blocked, fetch, ...opts, wsProbeInterval: 0 });
  const fallback = new Promise((r) => c.once("fallback", r));
  try {
    const { got, sub } = collect(c, "chat:sse");
    await fallback;
    await sub;
    assert.equal(c.transport, "sse");
    await apiPublish(srv.base, "chat:sse", "from the backend");
    assert.deepEqual(await c.publish("chat:sse", "from erin"), { channel: "chat:sse", offset: 2 });
    await until(() => got.length === 2, () => JSON.stringify(got));
    assert.deepEqual(got, ["from the backend", "from erin"]);
    // A second channel restarts the stream with both, resuming the first from its position.
    const second = collect(c, "chat:sse2");
    await second.sub;
    await apiPublish(srv.base, "chat:sse2", "second");
    await apiPublish(srv.base, "chat:sse", "third");
    await until(() => second.got.length === 1 && got.length === 3, () => JSON.stringify([got, second.got]));
    assert.deepEqual(got, ["from the backend", "from erin", "third"]);
    assert.deepEqual(second.got, ["second"]);
    // Another user's personal channel is refused (403 naming it): dropped, the others go on.
    await assert.rejects(c.subscribe("user:frank"), (e) => e.code === "forbidden");
    assert.deepEqual(c.subscriptions().map((s) => s.channel), ["chat:sse", "chat:sse2"]);
    await apiPublish(srv.base, "chat:sse2", "still here");
    await until(() => second.got.length === 2, () => JSON.stringify(second.got));

    // A restart on the same port while on SSE: the new epoch's messages are caught up through /poll.
    const unrecovered = [];
    c.on("unrecovered", (e) => unrecovered.push(e));
    held = true;
    await srv.kill("SIGKILL");
    srv = await startThrong({ port, args: ["--api-key", API_KEY] });
    await apiPublish(srv.base, "chat:sse", "r1");
    await apiPublish(srv.base, "chat:sse", "r2");
    held = false;
    await until(
      () => c.state === "fallback" && c.subscriptions().every((s) => s.active) && unrecovered.length === 2,
      () => JSON.stringify([c.state, c.subscriptions(), unrecovered]),
      15_000,
    );
    await apiPublish(srv.base, "chat:sse", "r3");
    await until(() => got.length === 6, () => JSON.stringify(got));
    assert.deepEqual(got, ["from the backend", "from erin", "third", "r1", "r2", "r3"]);
    // r1 and r2 were published before the client could come back: replayed from the new epoch's history.
    const bySse = unrecovered.find((e) => e.channel === "chat:sse");
    assert.deepEqual([bySse.reason, bySse.replayed, bySse.complete], ["epoch", 2, true]);
  } finally {
    c.close();
    await srv.kill();
  }
});
