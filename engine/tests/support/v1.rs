//! A wire protocol v1 client for black-box tests: tungstenite over a real socket with timeouts, JSON
//! commands with ids, replies matched by id, and channel traffic stashed meanwhile.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use super::Server;

/// Longest any single read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The first channel name `<prefix>-<i>` whose home is shard `home` of `shards` (tests pick channels by
/// the shard that owns them).
pub fn homed(prefix: &str, home: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| throng::channel::home_of(n, shards) == home)
        .expect("some name fits")
}

/// Writes `contents` to a config file named after `tag` and this test process, once per `cell`; its path.
pub fn config_file(cell: &'static std::sync::OnceLock<String>, tag: &str, contents: &str) -> &'static str {
    cell.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("throng-{tag}-test-{}.toml", std::process::id()));
        std::fs::write(&path, contents).expect("writing the test config");
        path.to_str().expect("UTF-8 temp path").to_string()
    })
}

/// Polls `check` every 20 ms until it returns `Ok`, failing with its last error after `timeout`.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not reached within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A v1 client: a tungstenite socket with timeouts, what its `welcome` said, and messages read while
/// waiting for a reply (delivered by [`Ws::recv`] later, in order).
pub struct Ws {
    pub ws: WebSocket<TcpStream>,
    /// The `client` of the welcome.
    pub client: String,
    /// The shard the connection lives on (from `client`).
    pub shard: usize,
    pub stash: VecDeque<Value>,
    next_id: u64,
    /// Shards of the server (from `/stats`), for [`Ws::barrier`].
    shards: usize,
    /// One channel per shard, homed there, that [`Ws::barrier`] publishes to (subscribed on first use).
    barrier_channels: Vec<String>,
    barrier_seq: u64,
}

impl Ws {
    /// Connects to `/ws?user=<user>` and reads the welcome.
    pub fn connect(srv: &Server, user: &str) -> Ws {
        let stream = TcpStream::connect_timeout(&srv.addr, IO_TIMEOUT).expect("connect");
        Ws::over(stream, srv, user)
    }

    /// Connects until the connection lands on a shard for which `want` holds (SO_REUSEPORT picks it).
    pub fn connect_where(srv: &Server, user: &str, want: impl Fn(usize) -> bool) -> Ws {
        for _ in 0..100 {
            let c = Ws::connect(srv, user);
            if want(c.shard) {
                return c;
            }
        }
        panic!("100 connections never landed on a wanted shard");
    }

    /// Upgrades an already connected stream to `/ws?user=<user>` and reads the welcome.
    pub fn over(stream: TcpStream, srv: &Server, user: &str) -> Ws {
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        let url = format!("ws://{}/ws?user={user}", srv.addr);
        let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap_or_else(|e| panic!("upgrade {url}: {e}"));
        let shards = srv.stats()["shards"].as_u64().expect("/stats shards") as usize;
        let mut c = Ws {
            ws,
            client: String::new(),
            shard: usize::MAX,
            stash: VecDeque::new(),
            next_id: 1,
            shards,
            barrier_channels: Vec::new(),
            barrier_seq: 0,
        };
        let w = c.next_frame();
        assert_eq!(w["type"], "welcome", "first message: {w}");
        assert_eq!(w["user"], user, "{w}");
        assert_eq!(w["version"], 1, "{w}");
        c.client = w["client"].as_str().unwrap_or_else(|| panic!("welcome without client: {w}")).to_string();
        let shard = c.client.split('-').next().and_then(|s| usize::from_str_radix(s, 16).ok());
        c.shard = shard.unwrap_or_else(|| panic!("client id {:?} is not shard-gen-idx", c.client));
        c
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap_or_else(|e| panic!("{}: sending {text}: {e}", self.client));
    }

    /// Sends a command, giving it the next `id` if it has none; returns the id.
    pub fn send(&mut self, mut cmd: Value) -> u64 {
        let id = match cmd.get("id").and_then(Value::as_u64) {
            Some(id) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                cmd["id"] = json!(id);
                id
            }
        };
        self.send_text(&cmd.to_string());
        id
    }

    /// Reads the next text message from the socket (ignoring pings and pongs). Panics on a close frame, a
    /// timeout or an error.
    pub fn next_frame(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.client, t.as_str()))
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("{}: unexpected frame {other:?}", self.client),
                Err(e) => panic!("{}: reading a message: {e}", self.client),
            }
        }
    }

    /// The next message: stashed ones first.
    pub fn recv(&mut self) -> Value {
        match self.stash.pop_front() {
            Some(v) => v,
            None => self.next_frame(),
        }
    }

    /// The next message if one arrives within `wait`.
    pub fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(v) = self.stash.pop_front() {
            return Some(v);
        }
        self.ws.get_mut().set_read_timeout(Some(wait)).expect("set_read_timeout");
        let r = loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => break Some(serde_json::from_str(t.as_str()).expect("JSON")),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("{}: unexpected frame {other:?}", self.client),
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break None
                }
                Err(e) => panic!("{}: reading a message: {e}", self.client),
            }
        };
        self.ws.get_mut().set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        r
    }

    /// Sends `cmd` and returns the reply carrying its id; channel traffic read meanwhile is stashed.
    pub fn call(&mut self, cmd: Value) -> Value {
        let id = self.send(cmd);
        loop {
            let v = self.next_frame();
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                return v;
            }
            self.stash.push_back(v);
        }
    }

    /// Subscribes (optionally with `since`) and checks the reply is `subscribed`.
    pub fn subscribe(&mut self, channel: &str, since: Option<Value>) -> Value {
        let mut cmd = json!({"type": "subscribe", "channel": channel});
        if let Some(s) = since {
            cmd["since"] = s;
        }
        let r = self.call(cmd);
        assert_eq!(r["type"], "subscribed", "{}: subscribe {channel}: {r}", self.client);
        assert_eq!(r["channel"], channel, "{r}");
        r
    }

    /// Publishes and returns the offset of the `published` reply.
    pub fn publish(&mut self, channel: &str, data: Value) -> u64 {
        let r = self.call(json!({"type": "publish", "channel": channel, "data": data}));
        assert_eq!(r["type"], "published", "{}: publish to {channel}: {r}", self.client);
        r["offset"].as_u64().unwrap_or_else(|| panic!("published without offset: {r}"))
    }

    /// Returns everything the server had sent or had on its way to this connection when the barrier was
    /// called, channel deliveries from every shard included.
    ///
    /// A `ping` would not do: its `pong` is written by the connection's own shard at once, while a delivery
    /// published on another shard may still be in that shard's ring. So the barrier publishes, on every
    /// shard `h`, to a channel of this client's homed on `h` (in the default namespace; subscribed on first
    /// use), and waits for those messages: each travels the same ring from `h` as every earlier delivery
    /// from `h`, is appended to this shard's logs after them, and goes out in the same flush of this
    /// connection or a later one. Whatever came in the same write is still read: the bytes already in the
    /// socket are drained before returning.
    pub fn barrier(&mut self) -> Vec<Value> {
        if self.barrier_channels.is_empty() {
            for h in 0..self.shards {
                let name = (0..)
                    .map(|i| format!("barrier-{}-{i}", self.client))
                    .find(|n| throng::channel::home_of(n, self.shards) == h)
                    .expect("some name is homed on every shard");
                let r = self.call(json!({"type": "subscribe", "channel": name}));
                assert_eq!(r["type"], "subscribed", "{}: barrier channel {name}: {r}", self.client);
                self.barrier_channels.push(name);
            }
        }
        self.barrier_seq += 1;
        let seq = self.barrier_seq;
        let mut before: Vec<Value> = self.stash.drain(..).collect();
        let mut replies = Vec::new();
        for ch in self.barrier_channels.clone() {
            replies.push(self.send(json!({"type": "publish", "channel": ch, "data": {"barrier": seq}})));
        }
        let (mut published, mut arrived) = (0, 0);
        while published < replies.len() || arrived < self.barrier_channels.len() {
            let v = self.next_frame();
            if v["type"] == "published" && v["id"].as_u64().is_some_and(|id| replies.contains(&id)) {
                published += 1;
            } else if v["type"] == "message" && v["data"]["barrier"] == seq {
                arrived += 1;
            } else if v["type"] == "message" && v["data"].get("barrier").is_some() {
                // An older barrier's message (a previous call returned before reading it).
            } else {
                before.push(v);
            }
        }
        while let Some(v) = self.recv_within(Duration::from_millis(20)) {
            if v["type"] != "message" || v["data"].get("barrier").is_none() {
                before.push(v);
            }
        }
        before
    }

    /// Reads until a close frame arrives, returning it with the text messages that preceded it.
    pub fn read_until_close(&mut self) -> (Vec<Value>, Option<CloseFrame>) {
        let mut msgs: Vec<Value> = self.stash.drain(..).collect();
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => msgs.push(serde_json::from_str(t.as_str()).expect("JSON")),
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Close(f)) => return (msgs, f),
                Ok(other) => panic!("{}: unexpected frame {other:?}", self.client),
                Err(e) => panic!("{}: reading until the close frame ({} messages read): {e}", self.client, msgs.len()),
            }
        }
    }
}
