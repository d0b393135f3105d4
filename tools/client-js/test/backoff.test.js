// The reconnect schedule: exponential backoff with full jitter, bounded, configurable, and spread out after
// 1001/1013/4029. Run: node --test tools/client-js/test/
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, DEFAULTS } from "../throng.js";

const top = () => 0.999999; // the largest value Math.random can return, near enough
const bottom = () => 0;

test("the window doubles from 500 ms and stops at 30 s by default", () => {
  const windows = [0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 1e6].map((n) => backoffDelay(n, undefined, top));
  assert.deepEqual(windows, [499, 999, 1999, 3999, 7999, 15999, 29999, 29999, 29999, 29999, 29999]);
  assert.deepEqual(DEFAULTS.backoff, { initial: 500, max: 30000, factor: 2 });
});

test("full jitter: any delay from 0 up to the window, uniformly", () => {
  assert.equal(backoffDelay(5, undefined, bottom), 0);
  assert.equal(backoffDelay(5, undefined, () => 0.5), 8000);
  // Many draws with the real Math.random stay within [0, window) and spread over it.
  const draws = Array.from({ length: 2000 }, () => backoffDelay(3, undefined));
  assert.ok(draws.every((d) => d >= 0 && d < 4000), "within the window");
  const low = draws.filter((d) => d < 2000).length;
  assert.ok(low > 800 && low < 1200, `about half below the middle: ${low} of 2000`);
  assert.ok(Math.min(...draws) < 200 && Math.max(...draws) > 3800, "reaches both ends");
});

test("configurable: initial, factor and max", () => {
  const b = { initial: 100, factor: 3, max: 1000 };
  assert.deepEqual(
    [0, 1, 2, 3, 4].map((n) => backoffDelay(n, b, top)),
    [99, 299, 899, 999, 999],
  );
  // A partial setting keeps the other defaults.
  assert.equal(backoffDelay(10, { max: 5000 }, top), 4999);
  assert.equal(backoffDelay(0, { initial: 50 }, top), 49);
});

test("spread: after 1001/1013/4029 the first retries draw from at least the spread window", () => {
  assert.equal(backoffDelay(0, undefined, top, 10000), 9999, "attempt 0 spreads over 10 s, not 0.5 s");
  assert.equal(backoffDelay(0, undefined, bottom, 10000), 0);
  assert.equal(backoffDelay(6, undefined, top, 10000), 29999, "a larger backoff window still wins");
});

test("odd attempts are clamped, never NaN or negative", () => {
  assert.equal(backoffDelay(-3, undefined, top), 499);
  assert.equal(backoffDelay(2.7, undefined, top), 1999);
  assert.equal(backoffDelay(Number.MAX_SAFE_INTEGER, undefined, top), 29999);
});
