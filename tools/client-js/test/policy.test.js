// The close-code policy: which codes retry, which spread out, which wait for a new token, which stop.
import { test } from "node:test";
import assert from "node:assert/strict";
import { closePolicy, tokenExpiry } from "../throng.js";

test("close codes map to the documented behaviour (docs/client.md, Reconnect policy)", () => {
  const table = {
    1000: "retry", // normal, also the server's idle timeout
    1001: "spread", // going away: the node drains
    1002: "retry",
    1006: "retry", // connection lost or refused
    1007: "retry",
    1008: "retry",
    1009: "retry",
    1011: "retry",
    1013: "spread", // try again later
    4001: "auth", // token expired
    4003: "auth", // forbidden
    4008: "retry", // slow consumer
    4029: "spread", // rate limited
    4000: "stop", // the backend disconnected the user
    4403: "stop",
    4999: "stop",
    3000: "retry",
  };
  for (const [code, want] of Object.entries(table)) {
    assert.equal(closePolicy(Number(code)), want, `close ${code}`);
  }
});

test("overrides replace the policy of the codes they name only", () => {
  const o = { 4000: "retry", 1001: "retry", 4401: "auth" };
  assert.equal(closePolicy(4000, o), "retry");
  assert.equal(closePolicy(1001, o), "retry");
  assert.equal(closePolicy(4401, o), "auth");
  assert.equal(closePolicy(4001, o), "auth");
  assert.equal(closePolicy(4002, o), "stop");
});

test("tokenExpiry reads exp from a JWT's payload, and nothing else", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const jwt = (claims) => `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
  assert.equal(tokenExpiry(jwt({ sub: "alice", exp: 1700000000 })), 1700000000);
  assert.equal(tokenExpiry(jwt({ sub: "ünï-cödé", exp: 42 })), 42, "UTF-8 payloads");
  assert.equal(tokenExpiry(jwt({ sub: "alice" })), undefined, "no exp");
  assert.equal(tokenExpiry("not a token"), undefined);
  assert.equal(tokenExpiry(undefined), undefined);
  assert.equal(tokenExpiry("a.%%%.c"), undefined);
});
