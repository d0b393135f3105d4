// Rooms peer: Bun.serve (uWebSockets inside) speaking the subset of Throng's v1 protocol that
// `throng-bench rooms` uses, so the same bench command runs against Throng and against Bun.
//
//   GET /health                 -> 200 ok
//   WS  /ws?user=<name>         -> {"type":"welcome",...}, then v1 commands (text frames, one JSON object each):
//     subscribe   {"type":"subscribe","id":1,"channel":"room:4"}
//                 -> {"type":"subscribed","id":1,"channel":"room:4","offset":20,"epoch":"…","recovered":false}
//                    then every message of the channel with an offset > 20
//     unsubscribe -> {"type":"unsubscribed","id":2,"channel":"room:4","offset":27}: nothing more from it
//                    (`offset`, not in Throng's reply: the channel's offset when the subscription ended; every
//                    message up to it was sent to this socket before the reply)
//     publish     {"type":"publish","id":3,"channel":"room:4","data":<JSON>}
//                 -> {"type":"published","id":3,"offset":28}; every subscriber (the sender too, as Throng)
//                    gets {"type":"message","channel":"room:4","offset":28,"data":<JSON>}
//     ping        -> {"type":"pong","id":…}
//   Refusals: {"type":"error","id":…,"code":…,"reason":…} (bad_json, bad_request, bad_channel,
//   unknown_command, forbidden, already_subscribed, not_subscribed), the connection stays open.
//
// The rooms are Bun topics (`ws.subscribe(topic)`, `server.publish(topic, …)`); the server keeps one offset
// counter per channel, created on first use with a random epoch and forgotten when the channel's last
// subscriber leaves (as Throng forgets a channel with no subscribers and no history). `user:<id>` is the
// personal channel of user <id>: only that user may subscribe, nobody may publish (as in Throng). No
// history, no presence, no `since` recovery, no authentication: `?user=` names the user, unchecked (Throng's
// open development mode).
const port = Number(process.argv[2] ?? process.env.PORT ?? 9001);

type Data = { user: string; client: string; subs: Set<string> };
type Chan = { offset: number; epoch: string };

const channels = new Map<string, Chan>();
const CHANNEL = /^([A-Za-z0-9_.@=\/-]+:)?[A-Za-z0-9_.@=\/-]+$/;
const USER = /^[A-Za-z0-9_.@=\/-]{1,128}$/;
let nextClient = 0;

function epoch(): string {
  const b = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function chan(name: string): Chan {
  let c = channels.get(name);
  if (c === undefined) {
    c = { offset: 0, epoch: epoch() };
    channels.set(name, c);
  }
  return c;
}

const server = Bun.serve<Data, {}>({
  hostname: "127.0.0.1",
  port,
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/health") return new Response("ok");
    if (url.pathname === "/ws") {
      const user = url.searchParams.get("user") ?? "anonymous";
      if (!USER.test(user)) {
        return Response.json({ error: "bad_request", reason: "bad user" }, { status: 400 });
      }
      const data: Data = { user, client: `bun-${nextClient++}`, subs: new Set() };
      if (server.upgrade(req, { data })) return;
      return new Response("expected websocket upgrade", { status: 400 });
    }
    return new Response("not found", { status: 404 });
  },
  websocket: {
    // The bench never sends large frames; Bun's default limits otherwise.
    open(ws) {
      ws.send(JSON.stringify({ type: "welcome", client: ws.data.client, user: ws.data.user, ping_interval: 25, version: 1 }));
    },
    message(ws, message) {
      if (typeof message !== "string") return refuse(ws, undefined, "bad_request", "binary messages are not accepted");
      let cmd: any;
      try {
        cmd = JSON.parse(message);
      } catch {
        return refuse(ws, undefined, "bad_json", "not JSON");
      }
      if (cmd === null || typeof cmd !== "object") return refuse(ws, undefined, "bad_json", "not an object");
      const id = typeof cmd.id === "number" ? cmd.id : undefined;
      // Throng's field order: type, id, the rest.
      const withId = (o: Record<string, unknown>) => JSON.stringify(id === undefined ? o : { type: o.type, id, ...o });
      if (cmd.type === "ping") return void ws.send(withId({ type: "pong" }));
      if (!["subscribe", "unsubscribe", "publish"].includes(cmd.type)) {
        return refuse(ws, id, "unknown_command", `unknown command ${JSON.stringify(cmd.type)}`);
      }
      const name = cmd.channel;
      if (typeof name !== "string") return refuse(ws, id, "bad_request", "channel is missing");
      if (name.length > 128 || !CHANNEL.test(name)) return refuse(ws, id, "bad_channel", "bad channel name");
      const personal = name.startsWith("user:");
      switch (cmd.type) {
        case "subscribe": {
          if (personal && name !== `user:${ws.data.user}`) return refuse(ws, id, "forbidden", "another user's channel");
          if (ws.data.subs.has(name)) return refuse(ws, id, "already_subscribed", "already subscribed");
          // Single-threaded: nothing is published between taking the offset and subscribing, so every
          // message after `offset` reaches this socket.
          const c = chan(name);
          ws.subscribe(name);
          ws.data.subs.add(name);
          ws.send(withId({ type: "subscribed", channel: name, offset: c.offset, epoch: c.epoch, recovered: false }));
          return;
        }
        case "unsubscribe": {
          if (!ws.data.subs.has(name)) return refuse(ws, id, "not_subscribed", "not subscribed");
          ws.unsubscribe(name);
          ws.data.subs.delete(name);
          const offset = channels.get(name)?.offset ?? 0;
          forget(name);
          ws.send(withId({ type: "unsubscribed", channel: name, offset }));
          return;
        }
        case "publish": {
          if (personal) return refuse(ws, id, "forbidden", "clients may not publish to personal channels");
          if (!("data" in cmd)) return refuse(ws, id, "bad_request", "data is missing");
          const c = chan(name);
          c.offset += 1;
          const msg = `{"type":"message","channel":${JSON.stringify(name)},"offset":${c.offset},"data":${JSON.stringify(cmd.data)}}`;
          // server.publish reaches every subscriber, the sender included (ws.publish would leave it out).
          server.publish(name, msg);
          ws.send(withId({ type: "published", offset: c.offset }));
          forget(name);
          return;
        }
      }
    },
    close(ws) {
      // Bun drops a closed socket's topics itself; forget the channels it was the last subscriber of.
      for (const name of ws.data.subs) {
        ws.unsubscribe(name);
        forget(name);
      }
      ws.data.subs.clear();
    },
  },
});

/** Forgets a channel's offset once nobody is subscribed (a publish to an empty channel creates and drops it). */
function forget(name: string) {
  if (server.subscriberCount(name) === 0) channels.delete(name);
}

function refuse(ws: any, id: number | undefined, code: string, reason: string) {
  ws.send(JSON.stringify(id === undefined ? { type: "error", code, reason } : { type: "error", id, code, reason }));
}

console.error(`bun ${Bun.version} rooms peer listening on ${server.hostname}:${server.port}`);
