//! A small WebSocket server for testing the bench: std `TcpListener`, one thread per connection, frames
//! through `throng-protocol`. Paths: `/echo` echoes; `/broadcast` relays every message to every
//! `/broadcast` connection (sender included); `/ws` is a minimal Throng v1 (welcome, subscribe →
//! subscribed, publish → message to the channel's subscribers). A [`Fault`] can drop or swap one relayed
//! message, and every n-th upgrade can be refused with 503.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use throng_protocol::conn::{Event, Limits, MessageData, Step, WsConn};
use throng_protocol::frame::{encode_server_frame, OpCode};
use throng_protocol::handshake::{parse_request, write_rejection, write_switching_protocols, Status};

/// A deliberate misbehaviour of the relay, by the relayed message's global index (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Relay everything in order.
    None,
    /// Never relay message `k`.
    Drop(u64),
    /// Relay message `k + 1` before message `k`.
    Swap(u64),
}

/// Server options.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Fault applied to relayed messages.
    pub fault: Fault,
    /// Refuse every n-th upgrade (1-based count) with 503; 0 = never.
    pub reject_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { fault: Fault::None, reject_every: 0 }
    }
}

type Writer = Arc<Mutex<TcpStream>>;

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
    next_id: AtomicU64,
    relay: Mutex<Relay>,
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
            next_id: AtomicU64::new(0),
            relay: Mutex::new(Relay::default()),
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

/// Relays one message to every member, applying the fault.
fn relay(shared: &Shared, payload: &[u8]) {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    encode_server_frame(&mut frame, true, OpCode::Text, payload);
    let mut r = shared.relay.lock().unwrap();
    let k = r.next_index;
    r.next_index += 1;
    let mut frames = vec![frame];
    match shared.opts.fault {
        Fault::Drop(d) if d == k => return,
        Fault::Swap(s) if s == k => {
            r.held = frames.pop();
            return;
        }
        Fault::Swap(s) if s + 1 == k => frames.extend(r.held.take()),
        _ => {}
    }
    for f in &frames {
        for (_, w) in &r.members {
            send(w, f);
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // The request head.
    let (path, key, head_len) = loop {
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
                break (path, key, req.header_len);
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
    write_switching_protocols(&mut out, key.as_bytes(), None);
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
                        on_message(shared, &path, id, &writer, &msg);
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
    let _ = stream.shutdown(Shutdown::Both);
}

fn on_message(shared: &Shared, path: &str, id: u64, writer: &Writer, msg: &[u8]) {
    match path {
        "/echo" => {
            let mut f = Vec::new();
            encode_server_frame(&mut f, true, OpCode::Text, msg);
            send(writer, &f);
        }
        "/broadcast" => relay(shared, msg),
        "/ws" => {
            let text = std::str::from_utf8(msg).unwrap();
            if text.contains("\"type\":\"subscribe\"") {
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
