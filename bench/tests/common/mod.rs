//! A small WebSocket server for testing the bench: std `TcpListener`, one thread per connection, frames
//! through `throng-protocol`. Paths: `/echo` echoes; `/broadcast` relays every message to every
//! `/broadcast` connection (sender included); `/ws` is a minimal Throng v1 (welcome, subscribe →
//! subscribed, publish → message to the channel's subscribers). [`Fault`]s can drop, swap, duplicate or stall
//! relayed messages (by global index) and echoes (by index on their connection); every n-th upgrade can be
//! refused with 503, every n-th v1 subscribe with an error, and the server can stop reading after the upgrade.
//! Every upgrade request's head is recorded ([`Head`]: where it carried a token); an offered `throng.v1`
//! subprotocol is selected unless [`Options::no_subprotocol`].

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use throng_protocol::conn::{Event, Limits, MessageData, Step, WsConn};
use throng_protocol::frame::{encode_server_frame, OpCode};
use throng_protocol::handshake::{parse_request, write_rejection, write_switching_protocols, Status};

/// A deliberate misbehaviour, by message index (0-based): the relayed message's global index, or the echo's
/// index on its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Never deliver message `k`.
    Drop(u64),
    /// Deliver message `k + 1` before message `k`.
    Swap(u64),
    /// Deliver message `k` twice.
    Dup(u64),
    /// Relay only: hold message `k` (and, behind it, everything after) for `ms` milliseconds.
    Stall(u64, u64),
}

/// Server options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Faults applied to relayed messages (`/broadcast`, and v1 deliveries).
    pub faults: Vec<Fault>,
    /// Faults applied to each `/echo` connection's echoes.
    pub echo_faults: Vec<Fault>,
    /// Refuse every n-th upgrade (1-based count) with 503; 0 = never.
    pub reject_every: u64,
    /// v1: answer every n-th subscribe (1-based count) with an error; 0 = never.
    pub reject_subscribe_every: u64,
    /// v1 with many channels (the rooms scenario): per-channel offsets and subscribers, `unsubscribe`,
    /// `published` with the command's `id` and offset, `unsubscribed` with the channel's offset. The
    /// [`Fault`]s then apply to publishes by their global index: a dropped one takes its offset but reaches
    /// no subscriber; a duplicated one reaches every subscriber twice.
    pub rooms: bool,
    /// Never read from a connection after its upgrade (its sender's backlog grows).
    pub no_read: bool,
    /// Never select a subprotocol, even `throng.v1` when offered.
    pub no_subprotocol: bool,
}

/// What an upgrade request carried, as the server parsed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// The request target (path and query).
    pub target: String,
    /// `token` query parameter.
    pub query_token: Option<String>,
    /// `Authorization: Bearer` token.
    pub bearer: Option<String>,
    /// Every subprotocol offered, in order.
    pub subprotocols: Vec<String>,
    /// The token of a `bearer.<token>` subprotocol.
    pub subprotocol_token: Option<String>,
    /// The subprotocol the server selected.
    pub selected: Option<String>,
}

type Writer = Arc<Mutex<TcpStream>>;
/// Rooms mode: channel -> (offset, subscribers).
type RoomChannels = std::collections::HashMap<String, (u64, Vec<(u64, Writer)>)>;

#[derive(Default)]
struct Relay {
    /// Broadcast members (raw) or channel subscribers (v1).
    members: Vec<(u64, Writer)>,
    next_index: u64,
    held: Option<Vec<u8>>,
}

struct Shared {
    opts: Options,
    stop: AtomicBool,
    upgrades: AtomicU64,
    subscribes: AtomicU64,
    next_id: AtomicU64,
    relay: Mutex<Relay>,
    heads: Mutex<Vec<Head>>,
    /// Rooms mode: channel -> (offset, subscribers), and the publishes so far.
    rooms: Mutex<(RoomChannels, u64)>,
}

/// A running test server; stopped when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on an ephemeral loopback port.
    pub fn start(opts: Options) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            opts,
            stop: AtomicBool::new(false),
            upgrades: AtomicU64::new(0),
            subscribes: AtomicU64::new(0),
            rooms: Mutex::new(Default::default()),
            next_id: AtomicU64::new(0),
            relay: Mutex::new(Relay::default()),
            heads: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        TestServer { addr, shared, accept: Some(accept) }
    }

    /// `ws://addr`
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Messages the relay has seen.
    pub fn relayed(&self) -> u64 {
        self.shared.relay.lock().unwrap().next_index
    }

    /// The heads of the upgrade requests received so far, in arrival order.
    pub fn heads(&self) -> Vec<Head> {
        self.shared.heads.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let mut r = self.shared.relay.lock().unwrap();
        for (_, w) in r.members.drain(..) {
            let _ = w.lock().unwrap().shutdown(Shutdown::Both);
        }
    }
}

fn send(w: &Writer, frame: &[u8]) {
    let _ = w.lock().unwrap().write_all(frame);
}

/// Applies `faults` to message `k` (one frame): the frames to send now, in order. `held` keeps a swapped
/// frame; a stall sleeps here, holding up its caller.
fn apply(faults: &[Fault], k: u64, frame: Vec<u8>, held: &mut Option<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut frames = vec![frame];
    for f in faults {
        match *f {
            Fault::Drop(d) if d == k => return Vec::new(),
            Fault::Swap(s) if s == k => {
                *held = frames.pop();
                return Vec::new();
            }
            Fault::Swap(s) if s + 1 == k => frames.extend(held.take()),
            Fault::Dup(d) if d == k => frames.insert(0, frames[0].clone()),
            Fault::Stall(d, ms) if d == k => std::thread::sleep(std::time::Duration::from_millis(ms)),
            _ => {}
        }
    }
    frames
}

/// Relays one message to every member, applying the faults (a stall holds the relay: everything waits).
fn relay(shared: &Shared, payload: &[u8]) {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    encode_server_frame(&mut frame, true, OpCode::Text, payload);
    let mut r = shared.relay.lock().unwrap();
    let k = r.next_index;
    r.next_index += 1;
    let frames = apply(&shared.opts.faults, k, frame, &mut r.held);
    for f in &frames {
        for (_, w) in &r.members {
            send(w, f);
        }
    }
}

/// Per-connection state of the echo faults.
#[derive(Default)]
struct EchoState {
    next_index: u64,
    held: Option<Vec<u8>>,
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // The request head.
    let (path, key, head_len, protocol) = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf, 8192) {
            Ok(Some(req)) => {
                if req.validate_upgrade().is_err() {
                    let mut out = Vec::new();
                    write_rejection(&mut out, Status::NotFound, "not a WebSocket endpoint");
                    let _ = stream.write_all(&out);
                    return;
                }
                let path = req.path.to_string();
                let key = req.ws_key.map(|k| k.to_string()).unwrap_or_default();
                let selected = (!shared.opts.no_subprotocol && req.offers_subprotocol("throng.v1"))
                    .then(|| "throng.v1".to_string());
                shared.heads.lock().unwrap().push(Head {
                    target: req.target.to_string(),
                    query_token: req.query_param("token").map(|t| t.into_owned()),
                    bearer: req.bearer_token().map(str::to_string),
                    subprotocols: req.subprotocols().map(str::to_string).collect(),
                    subprotocol_token: req.subprotocol_bearer().map(str::to_string),
                    selected: selected.clone(),
                });
                break (path, key, req.header_len, selected);
            }
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    buf.drain(..head_len);
    let n = shared.upgrades.fetch_add(1, Ordering::SeqCst) + 1;
    let mut out = Vec::new();
    if shared.opts.reject_every > 0 && n.is_multiple_of(shared.opts.reject_every) {
        write_rejection(&mut out, Status::ServiceUnavailable, "busy");
        let _ = stream.write_all(&out);
        return;
    }
    write_switching_protocols(&mut out, key.as_bytes(), protocol.as_deref());
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let writer: Writer = Arc::new(Mutex::new(stream.try_clone().unwrap()));
    if path == "/ws" {
        let welcome = format!("{{\"type\":\"welcome\",\"client\":\"c{id}\",\"version\":1}}");
        encode_server_frame(&mut out, true, OpCode::Text, welcome.as_bytes());
    }
    send(&writer, &out);
    if path == "/broadcast" {
        shared.relay.lock().unwrap().members.push((id, Arc::clone(&writer)));
    }
    if shared.opts.no_read {
        while !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        return;
    }
    let mut echo = EchoState::default();
    let mut ws = WsConn::server();
    let limits = Limits::default();
    'conn: loop {
        let mut off = 0;
        let mut ctl = Vec::new();
        while off < buf.len() {
            match ws.handle_read(&mut buf[off..], &limits, &mut ctl) {
                Ok(Step::NeedMore) => break,
                Ok(Step::Consumed(n)) => off += n,
                Ok(Step::Event(n, ev)) => {
                    let msg: Vec<u8> = match ev {
                        Event::Message { data: MessageData::InPlace(r), .. } => {
                            buf[off + r.start..off + r.end].to_vec()
                        }
                        Event::Message { data: MessageData::Assembled(v), .. } => v,
                        Event::Closed { .. } => {
                            send(&writer, &ctl);
                            break 'conn;
                        }
                        _ => Vec::new(),
                    };
                    off += n;
                    if !msg.is_empty() {
                        on_message(shared, &path, id, &writer, &msg, &mut echo);
                    }
                }
                Err(_) => {
                    send(&writer, &ctl);
                    break 'conn;
                }
            }
        }
        if !ctl.is_empty() {
            send(&writer, &ctl);
        }
        buf.drain(..off);
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    shared.relay.lock().unwrap().members.retain(|(m, _)| *m != id);
    for (_, subs) in shared.rooms.lock().unwrap().0.values_mut() {
        subs.retain(|(m, _)| *m != id);
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn on_message(shared: &Shared, path: &str, id: u64, writer: &Writer, msg: &[u8], echo: &mut EchoState) {
    match path {
        "/echo" => {
            let mut f = Vec::new();
            encode_server_frame(&mut f, true, OpCode::Text, msg);
            let k = echo.next_index;
            echo.next_index += 1;
            for f in apply(&shared.opts.echo_faults, k, f, &mut echo.held) {
                send(writer, &f);
            }
        }
        "/broadcast" => relay(shared, msg),
        "/ws" if shared.opts.rooms => rooms(shared, id, writer, msg),
        "/ws" => {
            let text = std::str::from_utf8(msg).unwrap();
            if text.contains("\"type\":\"subscribe\"") {
                let n = shared.subscribes.fetch_add(1, Ordering::SeqCst) + 1;
                let every = shared.opts.reject_subscribe_every;
                if every > 0 && n.is_multiple_of(every) {
                    let mut f = Vec::new();
                    let reply = "{\"type\":\"error\",\"id\":1,\"code\":\"forbidden\"}";
                    encode_server_frame(&mut f, true, OpCode::Text, reply.as_bytes());
                    send(writer, &f);
                    return;
                }
                shared.relay.lock().unwrap().members.push((id, Arc::clone(writer)));
                let mut f = Vec::new();
                let reply = "{\"type\":\"subscribed\",\"id\":1,\"channel\":\"bench:0\",\"offset\":0,\"epoch\":\"e\"}";
                encode_server_frame(&mut f, true, OpCode::Text, reply.as_bytes());
                send(writer, &f);
            } else if text.contains("\"type\":\"publish\"") {
                let at = text.find("\"data\":").unwrap() + 7;
                let data = &text[at..text.len() - 1];
                let offset = shared.relay.lock().unwrap().next_index;
                let m = format!("{{\"type\":\"message\",\"channel\":\"bench:0\",\"offset\":{offset},\"data\":{data}}}");
                relay(shared, m.as_bytes());
            }
        }
        _ => {}
    }
}

fn text_frame(text: &str) -> Vec<u8> {
    let mut f = Vec::new();
    encode_server_frame(&mut f, true, OpCode::Text, text.as_bytes());
    f
}

/// Rooms mode: one v1 command of connection `id` (see [`Options::rooms`]).
fn rooms(shared: &Shared, id: u64, writer: &Writer, msg: &[u8]) {
    let text = std::str::from_utf8(msg).unwrap();
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let (ty, cid, ch) = (v["type"].as_str().unwrap_or(""), v["id"].as_u64(), v["channel"].as_str().unwrap_or(""));
    let with_id = cid.map_or(String::new(), |i| format!(",\"id\":{i}"));
    let mut g = shared.rooms.lock().unwrap();
    let (map, publishes) = &mut *g;
    let entry = map.entry(ch.to_string()).or_default();
    match ty {
        "subscribe" => {
            entry.1.push((id, Arc::clone(writer)));
            let r = format!(
                "{{\"type\":\"subscribed\"{with_id},\"channel\":\"{ch}\",\"offset\":{},\"epoch\":\"e\",\"recovered\":false}}",
                entry.0
            );
            send(writer, &text_frame(&r));
        }
        "unsubscribe" => {
            entry.1.retain(|(m, _)| *m != id);
            let r = format!("{{\"type\":\"unsubscribed\"{with_id},\"channel\":\"{ch}\",\"offset\":{}}}", entry.0);
            send(writer, &text_frame(&r));
        }
        "publish" => {
            entry.0 += 1;
            let k = *publishes;
            *publishes += 1;
            let at = text.find("\"data\":").unwrap() + 7;
            let data = &text[at..text.len() - 1];
            let m = format!("{{\"type\":\"message\",\"channel\":\"{ch}\",\"offset\":{},\"data\":{data}}}", entry.0);
            let copies = if shared.opts.faults.contains(&Fault::Drop(k)) {
                0
            } else if shared.opts.faults.contains(&Fault::Dup(k)) {
                2
            } else {
                1
            };
            let f = text_frame(&m);
            for _ in 0..copies {
                for (_, w) in &entry.1 {
                    send(w, &f);
                }
            }
            send(writer, &text_frame(&format!("{{\"type\":\"published\"{with_id},\"offset\":{}}}", entry.0)));
        }
        _ => {}
    }
}
