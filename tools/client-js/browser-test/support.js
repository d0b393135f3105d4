// Support for the browser tests: the throng binary on a free loopback port, headless Chromium, HS256 tokens
// minted with node:crypto, and the backend API's publish.
import { spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const API_KEY = "browser-test-api-key-0123456789abcdef";
export const JWT_SECRET = "browser-test secret, at least 32 bytes long";

/**
 * The throng binary: $THRONG_BIN, else target/debug/throng under $CARGO_TARGET_DIR or the repo's target/,
 * built with cargo when missing.
 */
export function throngBinary() {
  if (process.env.THRONG_BIN) return process.env.THRONG_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(ROOT, "target");
  const bin = path.join(target, "debug", "throng");
  if (!existsSync(bin)) {
    const r = spawnSync("cargo", ["build", "-p", "throng"], { cwd: ROOT, stdio: "inherit" });
    if (r.status !== 0) throw new Error("cargo build -p throng failed");
  }
  return bin;
}

/** A port nobody listens on now (the kernel's pick). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Starts `throng --listen 127.0.0.1:<port> --shards 1 <args>` (no THRONG_* variables from the caller) and
 * waits until `/health` answers 200. `kill(signal)` stops it; its stderr is kept for failures.
 */
export async function startThrong({ port, args = [] } = {}) {
  port ??= await freePort();
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("THRONG_")));
  const proc = spawn(throngBinary(), ["--listen", `127.0.0.1:${port}`, "--shards", "1", ...args], {
    env,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  proc.stderr.on("data", (d) => (log += d));
  const exited = new Promise((r) => proc.once("exit", (code, sig) => r({ code, sig })));
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`throng exited:\n${log}`);
    try {
      const res = await fetch(base + "/health");
      if (res.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`throng did not answer /health within 20 s:\n${log}`);
    }
    await sleep(25);
  }
  return {
    port,
    base,
    proc,
    log: () => log,
    async kill(signal = "SIGKILL") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/** An HS256 JWT for `claims`, signed with `secret`. */
export function mintToken(claims, secret = JWT_SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** `POST /api/publish` of one message; returns its {channel, offset, epoch}. */
export async function apiPublish(base, channel, data) {
  const res = await fetch(base + "/api/publish", {
    method: "POST",
    headers: { Authorization: `apikey ${API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await res.json();
  if (res.status !== 200) throw new Error(`publish: ${res.status} ${JSON.stringify(body)}`);
  return body.offsets[0];
}

/** Headless Chromium (/usr/bin/chromium, or $CHROMIUM) through puppeteer-core. */
export async function launchBrowser() {
  const puppeteer = (await import("puppeteer-core")).default;
  return puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // As root (CI containers) Chromium needs --no-sandbox; /dev/shm may be small in containers.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
}

/**
 * A page on `base` (a same-origin document: `path`) with a client made in it: `window.c`, and what it
 * received in `window.got` (data of every message, in order) and `window.events` ([name, payload]).
 * `opts` are the client's options (JSON); `load` is "module" (import /throng.js) or "script" (a classic
 * <script src=/throng.global.js>, which sets window.Throng).
 */
export async function clientPage(browser, base, opts, { path: docPath = "/health", load = "module", before } = {}) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  if (before) await before(page);
  await page.goto(base + docPath);
  if (load === "script") await page.addScriptTag({ url: base + "/throng.global.js" });
  await page.evaluate(
    async (opts, load) => {
      const mod = load === "script" ? window.Throng : await import("/throng.js");
      window.got = [];
      window.events = [];
      if (window.__getToken) opts.getToken = (ctx) => window.__getToken(ctx);
      window.c = new mod.ThrongClient({ url: location.origin, ...opts });
      for (const ev of ["state", "connected", "disconnected", "fallback", "unrecovered", "gap", "refreshed", "auth_error", "subscribed"]) {
        window.c.on(ev, (e) => window.events.push([ev, JSON.parse(JSON.stringify(e ?? null))]));
      }
    },
    opts,
    load,
  );
  return { page, context };
}

/** Subscribes the page's client to `channel`, collecting message data in window.got. */
export function subscribe(page, channel) {
  return page.evaluate((channel) => window.c.subscribe(channel, (m) => window.got.push(m.data)), channel);
}

/** Waits until the page has received `n` messages; returns window.got. */
export async function received(page, n, timeout = 15_000) {
  try {
    await page.waitForFunction((n) => window.got.length >= n, { timeout, polling: 50 }, n);
  } catch (e) {
    const got = await page.evaluate(() => window.got);
    const events = await page.evaluate(() => window.events);
    throw new Error(`waited for ${n} messages, got ${JSON.stringify(got)}; events ${JSON.stringify(events)}: ${e.message}`);
  }
  return page.evaluate(() => window.got);
}

/** Waits until the page's client is in `state` (and on `transport`, when given). */
export async function inState(page, state, transport, timeout = 15_000) {
  try {
    await page.waitForFunction(
      (s, t) => window.c.state === s && (!t || window.c.transport === t),
      { timeout, polling: 50 },
      state,
      transport,
    );
  } catch (e) {
    const events = await page.evaluate(() => window.events);
    throw new Error(`waited for state ${state} ${transport || ""}; events ${JSON.stringify(events)}: ${e.message}`);
  }
}

export const events = (page, name) => page.evaluate((name) => window.events.filter((e) => e[0] === name).map((e) => e[1]), name);
export { sleep };
