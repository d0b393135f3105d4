// Browser tests of throng.js in headless Chromium against the real throng binary:
//   1. two pages exchange messages (and see each other in presence);
//   2. throng killed (SIGKILL) and restarted on the same port: the pages reconnect and receive every message
//      published after the restart (before they are back, then live), once each, in order (the new epoch
//      caught up from history);
//   3. an expired token: the server closes with 4001, getToken() is called, the client reconnects with the
//      new token and misses nothing; and a token refreshed before exp keeps its connection;
//   4. a page whose WebSocket is blocked falls back to SSE and still receives everything, publishes over
//      POST /publish, and goes back to WebSocket once it works again;
//   5. the demo page at / with two users chatting: its screenshot (docs/demo.png).
//
//   cd tools/client-js/browser-test && npm ci && node --test
// (tools/test does this.) The binary is $THRONG_BIN, else target/debug/throng (built when missing); Chromium
// is /usr/bin/chromium or $CHROMIUM.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import {
  API_KEY,
  JWT_SECRET,
  ROOT,
  apiPublish,
  clientPage,
  events,
  inState,
  launchBrowser,
  mintToken,
  received,
  sleep,
  startThrong,
  subscribe,
} from "./support.js";

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

const fast = { backoff: { initial: 200, max: 1000 }, requestTimeout: 5000, connectTimeout: 5000 };

test("two pages exchange messages and see each other in presence", async () => {
  const srv = await startThrong();
  try {
    const a = await clientPage(browser, srv.base, { user: "alice", ...fast });
    const b = await clientPage(browser, srv.base, { user: "bob", ...fast });
    await subscribe(a.page, "chat:room");
    await subscribe(b.page, "chat:room");
    await inState(a.page, "connected", "websocket");
    const r1 = await a.page.evaluate(() => window.c.publish("chat:room", { from: "alice", text: "hi bob" }));
    const r2 = await b.page.evaluate(() => window.c.publish("chat:room", { from: "bob", text: "hi alice" }));
    assert.deepEqual([r1.offset, r2.offset], [1, 2]);
    const want = [
      { from: "alice", text: "hi bob" },
      { from: "bob", text: "hi alice" },
    ];
    assert.deepEqual(await received(a.page, 2), want);
    assert.deepEqual(await received(b.page, 2), want);
    const presence = await a.page.evaluate(() => window.c.presence("chat:room"));
    assert.equal(presence.count, 2);
    assert.deepEqual(presence.users.map((u) => u.user), ["alice", "bob"]);
    const history = await b.page.evaluate(() => window.c.history("chat:room", { limit: 10 }));
    assert.deepEqual(history.messages.map((m) => m.data), want);
    await a.context.close();
    await b.context.close();
  } finally {
    await srv.kill();
  }
});

test("SIGKILL and a restart on the same port: the pages reconnect and get every message published after it", async () => {
  let srv = await startThrong({ args: ["--api-key", API_KEY] });
  const port = srv.port;
  try {
    // While window.__hold is set, the page's WebSocket attempts fail as against a node still down: the
    // messages published after the restart are then surely published before the pages are back.
    const holdable = (page) =>
      page.evaluateOnNewDocument(() => {
        const Real = window.WebSocket;
        window.__hold = false;
        window.WebSocket = function (url, protocols) {
          if (!window.__hold) return new Real(url, protocols);
          const fake = { readyState: 0, send() {}, close() {} };
          setTimeout(() => fake.onclose && fake.onclose({ code: 1006, reason: "" }), 10);
          return fake;
        };
      });
    const opts = { ...fast, fallbackAfter: 1000 };
    const pages = [
      await clientPage(browser, srv.base, { user: "alice", ...opts }, { before: holdable }),
      await clientPage(browser, srv.base, { user: "bob", ...opts }, { before: holdable }),
    ];
    for (const p of pages) await subscribe(p.page, "chat:room");
    for (let i = 1; i <= 3; i++) await apiPublish(srv.base, "chat:room", `before ${i}`);
    for (const p of pages) assert.deepEqual(await received(p.page, 3), ["before 1", "before 2", "before 3"]);

    for (const p of pages) await p.page.evaluate(() => (window.__hold = true));
    await srv.kill("SIGKILL");
    for (const p of pages) {
      await p.page.waitForFunction(() => window.c.state !== "connected", { timeout: 10_000, polling: 20 });
    }
    srv = await startThrong({ port, args: ["--api-key", API_KEY] });
    // Published before the pages are back: a new epoch, offsets from 1 again.
    const first = await apiPublish(srv.base, "chat:room", "after 1");
    assert.equal(first.offset, 1, "a restarted node starts the channel over");
    await apiPublish(srv.base, "chat:room", "after 2");
    await apiPublish(srv.base, "chat:room", "after 3");
    for (const p of pages) await p.page.evaluate(() => (window.__hold = false));
    for (const p of pages) {
      await p.page.waitForFunction(() => window.c.transport && window.c.subscriptions()[0].active, {
        timeout: 20_000,
        polling: 50,
      });
    }
    // And live ones after the reconnect.
    await apiPublish(srv.base, "chat:room", "after 4");
    await apiPublish(srv.base, "chat:room", "after 5");
    const want = ["before 1", "before 2", "before 3", "after 1", "after 2", "after 3", "after 4", "after 5"];
    for (const p of pages) {
      assert.deepEqual(await received(p.page, want.length), want);
      const unrecovered = await events(p.page, "unrecovered");
      assert.equal(unrecovered.length, 1, JSON.stringify(unrecovered));
      assert.equal(unrecovered[0].reason, "epoch");
      assert.equal(unrecovered[0].replayed, 3, "after 1..3 from the new epoch's history");
      assert.equal(unrecovered[0].complete, true, "history covered everything after the restart");
      await sleep(300);
      assert.deepEqual(await p.page.evaluate(() => window.got), want, "nothing twice, nothing more");
      await p.context.close();
    }
  } finally {
    await srv.kill();
  }
});

test("an expired token: 4001, getToken() called, a clean reconnect that misses nothing; refresh before exp", async () => {
  const srv = await startThrong({ args: ["--jwt-secret", JWT_SECRET, "--jwt-leeway", "0", "--api-key", API_KEY] });
  try {
    const claims = (ttl) => ({
      sub: "alice",
      exp: Math.floor(Date.now() / 1000) + ttl,
      channels: ["chat:*"],
      publish: ["chat:*"],
    });
    let minted = 0;
    const before = (page) =>
      page.exposeFunction("__getToken", () => {
        minted++;
        return mintToken(claims(600));
      });
    // refresh: false, so the token runs out on the server's clock and the connection gets 4001.
    const a = await clientPage(browser, srv.base, { token: mintToken(claims(3)), refresh: false, ...fast }, { before });
    await subscribe(a.page, "chat:room");
    await inState(a.page, "connected", "websocket");
    await apiPublish(srv.base, "chat:room", 1);
    assert.deepEqual(await received(a.page, 1), [1]);
    await a.page.waitForFunction(() => window.events.some((e) => e[0] === "disconnected" && e[1].code === 4001), {
      timeout: 10_000,
      polling: 50,
    });
    // Published while the client is out: recovered with `since` once it is back.
    await apiPublish(srv.base, "chat:room", 2);
    await a.page.waitForFunction(
      () => window.c.state === "connected" && window.c.subscriptions()[0].active,
      { timeout: 10_000, polling: 50 },
    );
    await apiPublish(srv.base, "chat:room", 3);
    assert.deepEqual(await received(a.page, 3), [1, 2, 3]);
    assert.equal(minted, 1, "getToken called once");
    const states = (await events(a.page, "state")).map((e) => e.state);
    assert.deepEqual(states.slice(-3), ["unauthorized", "connecting", "connected"], states.join(" "));
    const subscribed = await events(a.page, "subscribed");
    assert.equal(subscribed.at(-1).recovered, true, "resubscribed with since and recovered");
    assert.deepEqual((await events(a.page, "auth_error")).length, 0);

    // refresh: true (the default): getToken at 80% of the token's life, `refresh` on the same connection.
    minted = 0;
    const b = await clientPage(browser, srv.base, { token: mintToken(claims(4)), ...fast }, { before });
    await subscribe(b.page, "chat:room");
    await b.page.waitForFunction(() => window.events.some((e) => e[0] === "refreshed"), { timeout: 10_000, polling: 50 });
    await sleep(3000); // past the first token's exp
    await apiPublish(srv.base, "chat:room", 4);
    assert.deepEqual(await received(b.page, 1), [4]);
    assert.equal(minted, 1);
    assert.deepEqual(await events(b.page, "disconnected"), [], "never disconnected");
    await a.context.close();
    await b.context.close();
  } finally {
    await srv.kill();
  }
});

test("a page whose WebSocket is blocked falls back to SSE, receives everything, and returns to WebSocket", async () => {
  const srv = await startThrong({ args: ["--api-key", API_KEY] });
  try {
    // A WebSocket that fails as a blocking proxy makes it fail (closed 1006 before opening), until unblocked.
    const block = (page) =>
      page.evaluateOnNewDocument(() => {
        const Real = window.WebSocket;
        window.__wsBlocked = true;
        window.__wsAttempts = 0;
        window.WebSocket = function (url, protocols) {
          window.__wsAttempts++;
          if (!window.__wsBlocked) return new Real(url, protocols);
          const fake = { readyState: 0, send() {}, close() {} };
          setTimeout(() => {
            fake.readyState = 3;
            fake.onerror && fake.onerror({});
            fake.onclose && fake.onclose({ code: 1006, reason: "" });
          }, 20);
          return fake;
        };
      });
    // Loaded as a classic script (/throng.global.js, window.Throng).
    const a = await clientPage(
      browser,
      srv.base,
      { user: "carol", ...fast, backoff: { initial: 50, max: 200 }, wsProbeInterval: 1500 },
      { before: block, load: "script" },
    );
    const b = await clientPage(browser, srv.base, { user: "dave", ...fast });
    await subscribe(a.page, "chat:room");
    await subscribe(b.page, "chat:room");
    await inState(a.page, "fallback", "sse");
    assert.ok((await a.page.evaluate(() => window.__wsAttempts)) >= 3, "WebSocket tried first");
    assert.equal((await events(a.page, "fallback")).length, 1);
    await a.page.evaluate(() => window.c.subscriptions()[0].active || new Promise((r) => window.c.once("subscribed", r)));

    // From the backend, from a WebSocket client, and from the SSE client itself (POST /publish).
    await apiPublish(srv.base, "chat:room", "api 1");
    await b.page.evaluate(() => window.c.publish("chat:room", "ws 2"));
    const r = await a.page.evaluate(() => window.c.publish("chat:room", "sse 3"));
    assert.deepEqual(r, { channel: "chat:room", offset: 3 });
    assert.deepEqual(await received(a.page, 3), ["api 1", "ws 2", "sse 3"]);
    assert.deepEqual(await received(b.page, 3), ["api 1", "ws 2", "sse 3"]);
    assert.equal(await a.page.evaluate(() => window.c.transport), "sse");
    // Presence and history need the WebSocket: refused with a clear code, not hung.
    const err = await a.page.evaluate(() => window.c.presence("chat:room").then(() => "ok", (e) => e.code));
    assert.equal(err, "not_available");

    // The WebSocket works again: the next probe takes over, the stream is closed, nothing lost or doubled.
    await a.page.evaluate(() => (window.__wsBlocked = false));
    await inState(a.page, "connected", "websocket");
    for (let i = 4; i <= 6; i++) await apiPublish(srv.base, "chat:room", `api ${i}`);
    const want = ["api 1", "ws 2", "sse 3", "api 4", "api 5", "api 6"];
    assert.deepEqual(await received(a.page, 6), want);
    await sleep(300);
    assert.deepEqual(await a.page.evaluate(() => window.got), want);
    const connected = await events(a.page, "connected");
    assert.deepEqual(connected.map((e) => e.transport), ["sse", "websocket"]);
    await a.context.close();
    await b.context.close();
  } finally {
    await srv.kill();
  }
});

test("the demo page: two users chat, presence and the node's figures show; screenshot", async () => {
  const srv = await startThrong();
  try {
    const home = await fetch(srv.base + "/");
    assert.equal(home.status, 200);
    assert.match(home.headers.get("content-type"), /^text\/html/);
    const js = await fetch(srv.base + "/throng.js");
    assert.equal(js.headers.get("content-type"), "application/javascript; charset=utf-8");
    assert.match(js.headers.get("cache-control"), /max-age=/);

    const ctxB = await browser.createBrowserContext();
    const bob = await ctxB.newPage();
    await bob.goto(srv.base + "/?user=bob");
    const ctxA = await browser.createBrowserContext();
    const alice = await ctxA.newPage();
    await alice.setViewport({ width: 1200, height: 720 });
    await alice.goto(srv.base + "/?user=alice");
    for (const p of [alice, bob]) await p.waitForFunction(() => window.throngDemo && window.throngDemo.state === "connected");
    const say = async (page, text) => {
      await page.type("#text", text);
      await page.keyboard.press("Enter");
    };
    await say(alice, "Hi Bob, the room works.");
    await bob.waitForFunction(() => document.querySelectorAll("#messages .msg:not(.system)").length >= 1);
    await say(bob, "Hi Alice! Reconnects keep their place, too.");
    await say(alice, "Try killing the server and starting it again.");
    await alice.waitForFunction(() => document.querySelectorAll("#messages .msg:not(.system)").length >= 3);
    await alice.click("#burst");
    // Presence lists both; the figures panel has rates once two samples were taken.
    await alice.waitForFunction(() => document.querySelectorAll("#presence li").length === 2, { timeout: 10_000 });
    await alice.waitForFunction(() => document.getElementById("f-deliveries").textContent !== "–", { timeout: 10_000 });
    await alice.waitForFunction(() => document.getElementById("f-latency").textContent.endsWith("ms"), { timeout: 10_000 });
    // The burst's 200 publishes (and their deliveries to alice) show in the next sample.
    await alice.waitForFunction(() => Number(document.getElementById("f-publishes").textContent) >= 20, { timeout: 10_000 });
    const texts = await bob.$$eval("#messages .msg:not(.system)", (els) => els.map((e) => e.textContent));
    assert.equal(texts.length, 3, texts.join(" | "));
    assert.match(texts[0], /^aliceHi Bob, the room works\.#1$/);
    // docs/demo.png is written when missing or with UPDATE_DEMO_SCREENSHOT=1; otherwise into target/.
    const docs = path.join(ROOT, "docs", "demo.png");
    const out =
      process.env.UPDATE_DEMO_SCREENSHOT === "1" || !existsSync(docs)
        ? docs
        : path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, "target"), "client-js", "demo.png");
    mkdirSync(path.dirname(out), { recursive: true });
    await alice.screenshot({ path: out });
    assert.ok(existsSync(out));
    await ctxA.close();
    await ctxB.close();
  } finally {
    await srv.kill();
  }
});
