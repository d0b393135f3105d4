//! The client event loop: one per thread, an epoll loop over many nonblocking sockets.
//!
//! A thread owns a contiguous range of the run's connection indices. It ramps them up (TCP connect,
//! HTTP upgrade, and for throng subscribers a `subscribe` acknowledged by `subscribed`), reports ready to
//! its process's [`Control`], waits for the common start time, then drives the window: fixed-rate or
//! closed-loop sends, churn connections, and the accounting of every stamped message received. After the
//! window it keeps receiving for the grace period, then drops every socket.
//!
//! Accounting is by the window. Every message is stamped with the time it was scheduled (fixed rate:
//! `go + k / rate`, however late the loop got to it, as wrk2 does against coordinated omission; closed loop:
//! the arrival of the echo that released it), so time the loop loses shows in the latencies, and how late
//! each fixed-rate send went out is recorded (`send_lag`). Whatever was scheduled but not sent (backlog over
//! its bound, connection gone) counts as `skipped`. Every receiver tracks each sender's sequence: copies count
//! as `duplicates`, fills of earlier gaps as `reordered`; a distinct message that arrives before the window
//! ends counts as `received`, one that arrives in the grace period as `late`, each with its own histogram.
//!
//! Per message the loop costs one `read` shared by every frame in it (64 KiB reads), frames parsed in place
//! by [`WsConn`], one clock read per `read`, a substring search for the stamp, a histogram record and a few
//! integer updates; no allocation. A partial frame at the end of a read is kept in the connection's
//! `pending` buffer and copied in front of the next read (into reserved head room), so the next read still
//! lands in the shared buffer.
//!
//! Over `wss://` a connection first makes its TLS handshake (rustls, see [`crate::tls`]) once TCP is
//! connected, then its records are the bench's own: a read opens the complete records in place and leaves
//! their application data contiguous in the same shared buffer, where the frames are parsed as for plain
//! TCP; a flush seals the connection's queued frames into records. No allocation per message either way;
//! the plain path only tests that the connection has no TLS state. The handshake's time and the client CPU
//! it took (inside rustls) are recorded per connection, and the threads' CPU over the whole ramp.
//!
//! api-publish's HTTP connections are ready once connected; in the window each keeps `--pipeline`
//! `POST /api/publish` requests in flight, built in the thread's scratch buffer, and parses the responses
//! from its `pending` bytes (status, `Content-Length` body, the offsets counted), sending the next request
//! as each response arrives. Their subscribers are v1 `Sub` connections on every channel.
//!
//! `--transport sse` subscribers send `GET /sse?channel=<channel>` instead of an upgrade and read a
//! Server-Sent Events stream ([`Loop::process_sse`]): like frames, complete events are parsed in place in the
//! read buffer and a partial one is kept in `pending` for the next read; an event's single `data:` line is
//! read where it lies (several are joined in one reused buffer), so an event costs no allocation either.
//! They are ready on their `subscribed` event, and a `message` event's data is the v1 `message` a
//! WebSocket subscriber gets, stamp and all, accounted by the same code.
//!
//! With tokens (`--jwt-secret`, `--jwt-private-key`) a thread first mints one per connection it will open
//! (its initial connections, and as many churn connections as its churn rate can start in the window),
//! then waits until every thread of the run has (`Control::ramp`), so signing (about half a millisecond of
//! CPU per RS256 token) neither delays nor competes with the connect ramp it measures. A token is written into its
//! connection's upgrade request and dropped.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use throng_protocol::conn::{Event, Limits, MessageData, Step, WsConn};
use throng_protocol::frame::OpCode;
use throng_protocol::handshake::accept_key;

use crate::cli::{Auth, Plan, Role, Scenario, Target, Transport, ROOM_PREFIX};
use crate::error::Error;
use crate::jwt::{self, TokenIn};
use crate::load::ThreadHandle;
use crate::payload::{
    number_after, push_u64, write_payload, write_publish, write_publish_id, write_subscribe, write_unsubscribe,
    Incoming, Scanner, Stamp,
};
use crate::poll::{self, Epoll, ERR, IN, OUT};
use crate::seq::{Arrival, SeqTrack};
use crate::sys::{now_ns, thread_cpu_ns};
use crate::tally::Tally;
use crate::tls::{self, Failure, TlsConn};

/// Room reserved in front of each read for the partial frame left by the previous one.
const HEAD: usize = 64 * 1024;
/// Bytes asked for per `read`.
const READ: usize = 64 * 1024;
/// Socket events taken per `epoll_wait` (the epoll buffer and the loop's copy of it).
const EVENTS: usize = 256;
/// Unsent bytes per connection past which sends are skipped (and counted as backpressured).
const OUT_CAP: usize = 4 << 20;
/// How long a churn connection waits for the server's close frame.
const CLOSE_WAIT_NS: u64 = 2_000_000_000;
/// Longest wait for the start signal once ready (the parent has then gone wrong).
const GO_WAIT_NS: u64 = 600_000_000_000;
/// Size limits for received frames and messages.
const LIMITS: Limits = Limits { max_frame: 64 << 20, max_message: 64 << 20 };

/// Live counters for the progress line, summed over a process's threads.
#[derive(Debug, Default)]
pub struct Progress {
    /// Ready connections currently open.
    pub open: AtomicU64,
    /// Connections that failed to become ready.
    pub failed: AtomicU64,
    /// Messages sent.
    pub sent: AtomicU64,
    /// Stamped messages received.
    pub received: AtomicU64,
    /// Churn connections completed.
    pub churned: AtomicU64,
}

/// What a process's threads share with its coordinator.
#[derive(Debug, Default)]
pub struct Control {
    /// Start of the window (`CLOCK_MONOTONIC` ns); 0 until the coordinator decides it.
    pub go_ns: AtomicU64,
    /// Set to make every thread stop as soon as it can.
    pub abort: AtomicBool,
    /// Threads that finished minting their tokens (or gave up); they wait for `ramp` before connecting.
    pub minted: AtomicU32,
    /// Set by the coordinator once every thread of the run has minted: the connect ramp starts.
    pub ramp: AtomicBool,
    /// Threads that finished their connect phase (or gave up).
    pub ready: AtomicU32,
    /// The event-loop threads, for sampling their load (each registers itself when it starts).
    pub threads: Mutex<Vec<ThreadHandle>>,
    /// Live counters.
    pub progress: Progress,
}

impl Control {
    /// The event-loop threads registered so far.
    pub fn thread_handles(&self) -> Vec<ThreadHandle> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One thread's share of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadSpec {
    /// First global connection index of this thread.
    pub lo: u64,
    /// One past the last.
    pub hi: u64,
    /// This thread's share of the message rate (messages per second), if sends are rate-driven.
    pub rate: Option<f64>,
    /// This thread's share of the ramp rate.
    pub ramp_rate: f64,
    /// Handshakes this thread keeps in flight at most.
    pub max_pending: usize,
    /// This thread's share of the churn rate.
    pub churn_rate: f64,
    /// Churn connections this thread keeps open at most (file-descriptor budget).
    pub churn_cap: usize,
    /// Global index of this thread's first churn connection; the next ones follow at `churn_step`.
    pub churn_base: u64,
    /// Stride between this thread's churn connection indices (the number of threads in the run).
    pub churn_step: u64,
    /// Rooms: this thread's share of the group moves per second (`--churn-rate`), in proportion to its members.
    pub moves_rate: f64,
    /// Rooms: this thread's share of the reconnects per second (`--reconnect-rate`), the same way.
    pub reconnect_rate: f64,
}

/// Rooms with moves: where a member is in its group's life cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Membership {
    /// In no group (not a member, or a leave or join was refused).
    #[default]
    None,
    /// `subscribe` sent, `subscribed` awaited.
    Joining,
    /// Confirmed: expects every offset of the group after `from`.
    In,
    /// `unsubscribe` sent, `unsubscribed` awaited: still receiving.
    Leaving,
}

/// Rooms with moves: one member's group membership. Group deliveries are accounted by the group's offsets:
/// a membership confirmed at offset `from` expects every later offset until it is left, and the offsets
/// arrive in order, so `last` (the newest received) tells copies from new ones and counts what was skipped.
#[derive(Clone, Copy, Debug, Default)]
struct Member {
    group: u64,
    state: Membership,
    /// The `subscribed` offset.
    from: u64,
    /// The newest offset received (`from` until one arrives).
    last: u64,
    /// When the pending `subscribe` or `unsubscribe` was sent.
    t0: u64,
}

/// The `id` of a group subscribe (the first subscribe's, and every join's; the personal channel's is 1).
const GROUP_SUB_ID: u64 = 2;
/// The `id` of a leave's `unsubscribe`.
const GROUP_UNSUB_ID: u64 = 4;

/// Searchers for the reply fields rooms with moves reads.
#[derive(Debug)]
struct RoomFinders {
    offset: memchr::memmem::Finder<'static>,
    id: memchr::memmem::Finder<'static>,
    unsubscribed: memchr::memmem::Finder<'static>,
    published: memchr::memmem::Finder<'static>,
}

impl RoomFinders {
    fn new() -> Self {
        Self {
            offset: memchr::memmem::Finder::new(b"\"offset\":"),
            id: memchr::memmem::Finder::new(b"\"id\":"),
            unsubscribed: memchr::memmem::Finder::new(b"\"type\":\"unsubscribed\""),
            published: memchr::memmem::Finder::new(b"\"type\":\"published\""),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    Connecting,
    /// `wss://`: the TLS handshake.
    Tls,
    Upgrading,
    Subscribing,
    Open,
    Closing,
}

impl St {
    fn pending(self) -> bool {
        matches!(self, St::Connecting | St::Tls | St::Upgrading | St::Subscribing)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    WaitGo,
    Measure,
    Grace,
}

/// Why a connection's frame processing stopped.
#[derive(Debug)]
enum Stop {
    /// The close handshake finished (the peer's close frame, answered in `out`).
    Closed(Option<u16>),
    /// The connection failed with this kind.
    Fail(String),
}

#[derive(Debug)]
struct Conn {
    fd: Option<OwnedFd>,
    gidx: u64,
    st: St,
    role: Role,
    initial: bool,
    dirty: bool,
    interest: u32,
    ws: WsConn,
    /// Unconsumed received bytes: the HTTP response head while upgrading, later a partial frame.
    pending: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// When the connect started.
    t0: u64,
    /// Sequence number of the next message sent.
    seq: u64,
    /// Echo messages in flight.
    inflight: u32,
    /// Publisher id (broadcast), stamped into publishes.
    pub_id: u64,
    /// Index of this connection's first slot in the sequence table: one per publisher for a broadcast
    /// receiver, one (its own echoes) for an echo connection.
    seq_base: usize,
    /// Its token (empty without auth), minted before the ramp and dropped once in the upgrade request.
    token: String,
    /// `wss://`: the TLS state; `out` then holds frames not sealed yet.
    tls: Option<Box<TlsConn>>,
    /// Subscriber: `subscribed` acknowledgements still awaited.
    acks: u32,
    /// api-publish: requests in flight, oldest first (answered in order): when sent, messages.
    reqs: VecDeque<(u64, u32)>,
    /// api-publish: the next sequence number per channel (this connection's stream to each channel).
    chan_seq: Vec<u64>,
    /// api-publish: the channel of the next message.
    next_ch: usize,
    /// api-publish: the server said `Connection: close`; nothing more is sent.
    no_more: bool,
    /// `--transport sse`: a subscriber reading a Server-Sent Events stream instead of WebSocket frames.
    sse: bool,
    /// Rooms `--reconnect-rate`: a member connecting again (its readiness is a reconnect, not a ramp's).
    reconnecting: bool,
}

impl Conn {
    fn free() -> Self {
        Self {
            fd: None,
            gidx: u64::MAX,
            st: St::Free,
            role: Role::Idle,
            initial: false,
            dirty: false,
            interest: 0,
            ws: WsConn::client(1),
            pending: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            t0: 0,
            seq: 0,
            inflight: 0,
            pub_id: 0,
            seq_base: usize::MAX,
            token: String::new(),
            tls: None,
            acks: 0,
            reqs: VecDeque::new(),
            chan_seq: Vec::new(),
            next_ch: 0,
            no_more: false,
            sse: false,
            reconnecting: false,
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Bytes queued but not yet taken by the socket (frames, and TLS records).
    #[inline]
    fn unsent(&self) -> usize {
        self.out.len() - self.out_pos + self.tls.as_ref().map_or(0, |t| t.unsent())
    }
}

/// One read of the connection's socket, its data at `rbuf[HEAD..]`: plain, one `read` of up to `READ`
/// bytes; TLS, the application data of the complete records (see [`TlsConn::read`]). `Ok(None)`: nothing to
/// read; `Ok(Some((n, more)))`: `n` bytes, and the socket may have more.
#[inline(always)]
fn recv(c: &mut Conn, rbuf: &mut [u8]) -> Result<Option<(usize, bool)>, String> {
    let fd = c.raw();
    match c.tls.as_deref_mut() {
        None => match poll::read(fd, &mut rbuf[HEAD..HEAD + READ]) {
            Ok(0) => Err("eof".into()),
            Ok(n) => Ok(Some((n, n == READ))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(poll::error_kind(&e)),
        },
        Some(t) => t.read(fd, &mut rbuf[HEAD..], READ).map_err(|f| f.kind),
    }
}

/// TLS: seals the queued frames (`out` from `out_pos`) into records and writes as many records as the
/// socket takes. True when everything went.
fn flush_tls(t: &mut TlsConn, out: &mut Vec<u8>, out_pos: &mut usize, fd: RawFd) -> Result<bool, String> {
    if *out_pos < out.len() {
        t.seal(&out[*out_pos..]).map_err(|f| f.kind)?;
        out.clear();
        *out_pos = 0;
    }
    while t.pos < t.out.len() {
        match poll::write(fd, &t.out[t.pos..]) {
            Ok(n) => t.pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(poll::error_kind(&e)),
        }
    }
    t.compact();
    Ok(t.unsent() == 0)
}

/// Sixteen pseudo-random bytes for connection `gidx`, base64: its `Sec-WebSocket-Key`.
fn ws_key(seed: u64, gidx: u64) -> [u8; 24] {
    let mut x = seed ^ gidx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&next().to_le_bytes());
    raw[8..].copy_from_slice(&next().to_le_bytes());
    let mut key = [0u8; 24];
    // 16 bytes always encode to exactly 24 base64 characters.
    let n = STANDARD.encode_slice(raw, &mut key).unwrap_or(0);
    debug_assert_eq!(n, 24);
    key
}

/// Runs one thread's share of the plan to the end and returns what it counted: mints its tokens, waits for
/// the ramp (`Control::ramp`), connects, runs the window.
pub fn run_thread(plan: &Plan, spec: &ThreadSpec, ctl: &Control) -> Result<Tally, Error> {
    ctl.threads.lock().unwrap_or_else(|e| e.into_inner()).push(ThreadHandle::current());
    // Sends are due at exact times: wake up within a microsecond of them, not the default 50.
    // SAFETY: PR_SET_TIMERSLACK takes a number; no pointers are involved.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    let mut lp = match Loop::new(plan, spec, ctl).and_then(|mut lp| lp.mint_tokens().map(|()| lp)) {
        Ok(lp) => lp,
        Err(e) => {
            // Do not leave the coordinator waiting for this thread.
            ctl.abort.store(true, Relaxed);
            ctl.minted.fetch_add(1, Relaxed);
            ctl.ready.fetch_add(1, Relaxed);
            return Err(e);
        }
    };
    ctl.minted.fetch_add(1, Relaxed);
    lp.wait_ramp();
    let r = lp.run();
    if r.is_err() || lp.phase == Phase::Connecting {
        // Do not leave the coordinator waiting for this thread.
        ctl.abort.store(true, Relaxed);
        if lp.phase == Phase::Connecting {
            ctl.ready.fetch_add(1, Relaxed);
        }
    }
    r?;
    Ok(lp.finish())
}

struct Loop<'a> {
    plan: &'a Plan,
    spec: &'a ThreadSpec,
    ctl: &'a Control,
    ep: Epoll,
    conns: Vec<Conn>,
    free: Vec<usize>,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    sc: Scanner,
    /// Where the last stamp was found in its message (v1 messages repeat their layout).
    hint: usize,
    /// `--transport sse`: the data of an event with several `data:` lines, joined (reused).
    sse_data: Vec<u8>,
    tally: Tally,
    /// Sequence state per (receiver, publisher), and per echo connection.
    seqs: Vec<SeqTrack>,
    /// Slots that send at the fixed rate.
    senders: Vec<usize>,
    rr: usize,
    /// Messages scheduled so far in the window (fixed rate).
    sched: u64,
    churn_started: u64,
    churn_live: usize,
    dirty: Vec<usize>,
    /// Handshakes in flight: (slot, gidx, deadline), oldest first.
    pending_q: VecDeque<(usize, u64, u64)>,
    handshaking: usize,
    /// Churn connections waiting for the close reply: (slot, gidx, deadline).
    closing_q: VecDeque<(usize, u64, u64)>,
    n_initial: u64,
    next_initial: u64,
    unresolved: u64,
    phase: Phase,
    start: u64,
    go: u64,
    /// End of the window (`go + duration`); `u64::MAX` before the window.
    window_end: u64,
    /// Testing (`--test-busy`): when the loop next spins.
    next_busy: u64,
    ready_at: u64,
    /// When the paced loop last woke.
    last_wake: u64,
    last_flush: u64,
    flushed: [u64; 4],
    /// `\r\nHost: <host>` of each `--url` (a connection's is its URL's: [`Plan::url_index`]).
    host_lines: Vec<Vec<u8>>,
    /// Tokens for churn connections, by churn sequence number (taken as they are used).
    churn_tokens: Vec<String>,
    /// The thread's CPU time when the ramp started.
    ramp_cpu0: u64,
    /// Stamp ids receivers track ([`Plan::senders`]).
    n_senders: u64,
    /// api-publish: every request's head up to the `Content-Length` value.
    api_head: Vec<u8>,
    /// api-publish: counts offsets and per-message errors in a `200`'s body.
    offset_finder: memchr::memmem::Finder<'static>,
    error_finder: memchr::memmem::Finder<'static>,
    /// Rooms publishers: the next sequence number of each (publisher, personal channel) and (publisher,
    /// group channel) stream, indexed `publisher * channels + channel`: the stream a stamp id names.
    room_seq_personal: Vec<u64>,
    room_seq_group: Vec<u64>,
    /// Rooms: the channel name of the publish being written (reused).
    room_ch: String,
    /// Rooms publishers (and movers): the random target generator (xorshift64*).
    rng: u64,
    /// Rooms with moves (`--churn-rate`): true.
    moving: bool,
    /// Rooms with moves: each slot's group membership (receivers'; empty without moves).
    members: Vec<Member>,
    /// Rooms with moves: the slots of this thread's members, movers are picked from.
    member_slots: Vec<usize>,
    /// Rooms with moves: moves due so far in the window (started or skipped).
    moves_sched: u64,
    /// Rooms `--reconnect-rate`: reconnects due so far in the window (started or skipped).
    reconnects_sched: u64,
    /// Rooms with moves: reply field searchers.
    rf: RoomFinders,
}

impl<'a> Loop<'a> {
    fn new(plan: &'a Plan, spec: &'a ThreadSpec, ctl: &'a Control) -> Result<Self, Error> {
        let n_initial = spec.hi - spec.lo;
        let ep = Epoll::new(EVENTS).map_err(|e| Error::Io("epoll_create", e))?;
        let mut conns = Vec::with_capacity(n_initial as usize);
        let mut senders = Vec::new();
        let mut n_tracks = 0usize;
        let n_senders = plan.senders();
        for gidx in spec.lo..spec.hi {
            let mut c = Conn::free();
            c.role = plan.role(gidx);
            c.gidx = gidx;
            c.initial = true;
            c.pub_id = plan.publisher_id(gidx).unwrap_or(0);
            c.sse = plan.transport == Transport::Sse && c.role == Role::Sub;
            if c.role.receives() {
                c.seq_base = n_tracks;
                n_tracks += n_senders as usize;
            } else if c.role == Role::Echo {
                c.seq_base = n_tracks;
                n_tracks += 1;
            }
            if let (Role::Api, Some(api)) = (c.role, &plan.api) {
                c.chan_seq = vec![0; api.channels.len()];
                c.next_ch = (c.pub_id % api.channels.len() as u64) as usize;
                c.reqs = VecDeque::with_capacity(api.pipeline as usize);
            }
            let slot = conns.len();
            let rate_sender = match c.role {
                Role::Pub | Role::PubSub => true,
                Role::Echo => plan.rate.is_some(),
                _ => false,
            };
            if rate_sender {
                senders.push(slot);
            }
            conns.push(c);
        }
        // Rooms: sequence numbers per (publisher of this thread, channel).
        let (room_seq_personal, room_seq_group) = match &plan.rooms {
            Some(r) if !senders.is_empty() => {
                let pubs = conns.iter().filter(|c| c.role == Role::Pub).map(|c| c.pub_id).max().unwrap_or(0) + 1;
                (vec![0; (pubs * plan.receivers) as usize], vec![0; (pubs * r.groups) as usize])
            }
            _ => (Vec::new(), Vec::new()),
        };
        // Rooms with moves: every member starts joining its first group; publishers note each group's newest
        // published offset.
        let moving = plan.rooms.as_ref().is_some_and(|r| r.moving());
        let (mut members, mut member_slots) = (Vec::new(), Vec::new());
        let mut tally = Tally::default();
        if let (true, Some(r)) = (moving, &plan.rooms) {
            members = vec![Member::default(); conns.len()];
            for (slot, c) in conns.iter().enumerate() {
                if c.role == Role::Sub {
                    members[slot] =
                        Member { group: c.gidx / r.group_size, state: Membership::Joining, ..Member::default() };
                    member_slots.push(slot);
                }
            }
            tally.room_final = vec![0; r.groups as usize];
        }
        let host_lines: Vec<Vec<u8>> = plan
            .urls
            .iter()
            .map(|u| {
                let mut line = b"\r\nHost: ".to_vec();
                line.extend_from_slice(u.host.as_bytes());
                line
            })
            .collect();
        let host_line = &host_lines[0];
        let mut api_head = Vec::new();
        let mut scratch_room = plan.size + 256;
        if let Some(api) = &plan.api {
            api_head.extend_from_slice(b"POST /api/publish HTTP/1.1");
            api_head.extend_from_slice(host_line);
            api_head.extend_from_slice(b"\r\nAuthorization: apikey ");
            api_head.extend_from_slice(api.key.as_bytes());
            api_head.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
            let longest = api.channels.iter().map(String::len).max().unwrap_or(0);
            scratch_room = api.batch as usize * (plan.size + longest + 64) + 64;
        }
        Ok(Self {
            plan,
            spec,
            ctl,
            ep,
            conns,
            free: Vec::new(),
            // TLS: a read also carries one partial record in front of the new bytes.
            rbuf: vec![0u8; HEAD + READ + if plan.tls.is_some() { tls::READ_ROOM } else { 0 }],
            scratch: Vec::with_capacity(scratch_room),
            sc: Scanner::new(),
            hint: 1,
            sse_data: Vec::new(),
            tally,
            seqs: vec![SeqTrack::default(); n_tracks],
            senders,
            rr: 0,
            sched: 0,
            churn_started: 0,
            churn_live: 0,
            dirty: Vec::new(),
            pending_q: VecDeque::new(),
            handshaking: 0,
            closing_q: VecDeque::new(),
            n_initial,
            next_initial: 0,
            unresolved: n_initial,
            phase: Phase::Connecting,
            start: now_ns(),
            go: 0,
            window_end: u64::MAX,
            next_busy: u64::MAX,
            ready_at: 0,
            last_wake: 0,
            last_flush: 0,
            flushed: [0; 4],
            host_lines,
            churn_tokens: Vec::new(),
            ramp_cpu0: 0,
            n_senders,
            api_head,
            offset_finder: memchr::memmem::Finder::new(b"\"offset\":"),
            error_finder: memchr::memmem::Finder::new(b"\"error\":"),
            room_seq_personal,
            room_seq_group,
            room_ch: String::new(),
            rng: (plan.seed ^ spec.lo.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1,
            moving,
            members,
            member_slots,
            moves_sched: 0,
            reconnects_sched: 0,
            rf: RoomFinders::new(),
        })
    }

    /// Mints a token for every initial connection and for the churn connections this thread can start in
    /// the window, timed (wall clock and thread CPU). Stops early when the run is aborted.
    fn mint_tokens(&mut self) -> Result<(), Error> {
        let Some(auth) = &self.plan.auth else { return Ok(()) };
        let (wall0, cpu0) = (now_ns(), thread_cpu_ns());
        let now = jwt::unix_now();
        let churn = if self.spec.churn_rate > 0.0 {
            // `churn_due` starts at most this many: one at the window's start, then one per 1/rate.
            (self.plan.duration_ns as f64 * self.spec.churn_rate / 1e9) as u64 + 2
        } else {
            0
        };
        let mut minted = 0;
        for slot in 0..self.n_initial as usize {
            if minted % 256 == 0 && self.ctl.abort.load(Relaxed) {
                return Ok(());
            }
            if self.conns[slot].role == Role::Api {
                // Authenticated by the API key, not a token.
                continue;
            }
            self.conns[slot].token = mint(auth, self.conns[slot].gidx, now)?;
            minted += 1;
        }
        self.churn_tokens.reserve(churn as usize);
        for k in 0..churn {
            if minted % 256 == 0 && self.ctl.abort.load(Relaxed) {
                return Ok(());
            }
            self.churn_tokens.push(mint(auth, self.spec.churn_base + k * self.spec.churn_step, now)?);
            minted += 1;
        }
        self.tally.tokens_minted = minted;
        self.tally.token_mint_wall_ns = now_ns() - wall0;
        self.tally.token_mint_cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
        Ok(())
    }

    /// Waits until the coordinator starts the ramp (every thread of the run has minted its tokens), or the
    /// run is aborted; then the ramp's clock starts.
    fn wait_ramp(&mut self) {
        let t0 = now_ns();
        while !self.ctl.ramp.load(Relaxed) && !self.ctl.abort.load(Relaxed) {
            if now_ns() - t0 > GO_WAIT_NS {
                // The coordinator has gone wrong.
                self.ctl.abort.store(true, Relaxed);
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.start = now_ns();
        self.ramp_cpu0 = thread_cpu_ns();
    }

    /// The token of churn connection `k` (`gidx`): minted before the ramp, or now when the churn outran
    /// the foreseen count. Empty without auth.
    fn churn_token(&mut self, k: u64, gidx: u64) -> String {
        let Some(auth) = &self.plan.auth else { return String::new() };
        if let Some(t) = self.churn_tokens.get_mut(k as usize) {
            return std::mem::take(t);
        }
        self.tally.tokens_minted_in_window += 1;
        mint(auth, gidx, jwt::unix_now()).unwrap_or_else(|_| {
            self.tally.error("churn_token_mint");
            String::new()
        })
    }

    fn run(&mut self) -> Result<(), Error> {
        loop {
            let now = now_ns();
            if self.ctl.abort.load(Relaxed) {
                return Ok(());
            }
            match self.phase {
                Phase::Connecting => {
                    self.ramp(now);
                    if self.next_initial == self.n_initial && self.unresolved == 0 {
                        self.phase = Phase::WaitGo;
                        self.ready_at = now;
                        self.tally.connect_span_ns = now - self.start;
                        self.tally.ramp_cpu_ns = thread_cpu_ns().saturating_sub(self.ramp_cpu0);
                        self.ctl.ready.fetch_add(1, Relaxed);
                    }
                }
                Phase::WaitGo => {
                    let go = self.ctl.go_ns.load(Relaxed);
                    if go != 0 && now >= go {
                        self.go = go;
                        self.window_end = go + self.plan.duration_ns;
                        self.phase = Phase::Measure;
                        self.start_window(now);
                    } else if now - self.ready_at > GO_WAIT_NS {
                        return Ok(());
                    }
                }
                Phase::Measure => {
                    if now >= self.window_end {
                        // Everything scheduled inside the window goes out, however late (its stamp says when
                        // it was due), so a loop that fell behind shows as latency and lag, not as fewer sends.
                        self.send_due(self.window_end - 1, now, u64::MAX);
                        self.phase = Phase::Grace;
                        self.tally.held =
                            self.conns[..self.n_initial as usize].iter().filter(|c| c.st == St::Open).count() as u64;
                    } else {
                        let now = self.test_busy(now);
                        self.send_due(now, now, 100_000);
                        self.churn_due(now);
                        self.moves_due(now);
                        self.reconnects_due(now);
                    }
                }
                Phase::Grace => {
                    if now >= self.go + self.plan.duration_ns + self.plan.grace_ns {
                        // If this thread was descheduled, deliveries may be waiting unread: take them.
                        self.drain_ready()?;
                        return Ok(());
                    }
                }
            }
            self.expire(now);
            self.flush_dirty();
            self.publish_progress(now);
            let pacing = self.plan.pace_ns > 0 && matches!(self.phase, Phase::Measure | Phase::Grace);
            if pacing {
                // Let frames pile up in the sockets, then take them all without waiting.
                let wake = self.last_wake + self.plan.pace_ns;
                let deadline = self.go + self.plan.duration_ns + self.plan.grace_ns;
                let t = now_ns();
                if wake > t {
                    std::thread::sleep(std::time::Duration::from_nanos(wake.min(deadline).saturating_sub(t)));
                }
                self.last_wake = now_ns();
                while self.poll_once(0)? == EVENTS {}
            } else {
                let timeout = self.timeout_ns(now_ns());
                self.poll_once(timeout)?;
            }
        }
    }

    /// Waits up to `timeout` ns for socket events and handles them; returns how many there were.
    fn poll_once(&mut self, timeout: u64) -> Result<usize, Error> {
        // Edge-triggered: every event returned must be handled, so the copy holds as many as a wait returns.
        let mut ready: [(u64, u32); EVENTS] = [(0, 0); EVENTS];
        let mut n = 0;
        for ev in self.ep.wait(timeout).map_err(|e| Error::Io("epoll_wait", e))? {
            ready[n] = ev;
            n += 1;
        }
        let now = now_ns();
        for &(token, events) in &ready[..n] {
            self.on_event(token as usize, events, now);
        }
        self.flush_dirty();
        Ok(n)
    }

    /// Processes the sockets that are ready right now, without waiting, a bounded number of times.
    fn drain_ready(&mut self) -> Result<(), Error> {
        for _ in 0..64 {
            if self.poll_once(0)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Tally {
        self.publish_progress(u64::MAX);
        let unanswered: usize = self.conns.iter().filter(|c| c.role == Role::Api).map(|c| c.reqs.len()).sum();
        if unanswered > 0 {
            self.tally.api_error("unanswered", unanswered as u64);
        }
        self.tally.gaps += self.seqs.iter().map(SeqTrack::missing).sum::<u64>();
        if let (true, Some(r)) = (self.moving, &self.plan.rooms) {
            // Memberships still open expect every offset of their group up to its last one (known from the
            // publishers' replies, merged over the run; at least what they received).
            let n = r.groups as usize;
            let t = &mut self.tally;
            t.room_final.resize(n, 0);
            t.room_open = vec![0; n];
            t.room_open_from = vec![0; n];
            for m in self.members.iter().filter(|m| matches!(m.state, Membership::In | Membership::Leaving)) {
                let g = m.group as usize;
                t.room_open[g] += 1;
                t.room_open_from[g] += m.from;
                t.room_final[g] = t.room_final[g].max(m.last);
            }
        }
        for c in &mut self.conns {
            c.fd = None;
        }
        std::mem::take(&mut self.tally)
    }

    /// Nanoseconds until the loop has something to do without socket events (at most 100 ms).
    fn timeout_ns(&self, now: u64) -> u64 {
        let mut next = now + 100_000_000;
        let rate_next = |start: u64, k: u64, rate: f64| start + (k as f64 * 1e9 / rate).ceil() as u64;
        match self.phase {
            Phase::Connecting => {
                if self.next_initial < self.n_initial && self.handshaking < self.spec.max_pending {
                    next = next.min(rate_next(self.start, self.next_initial, self.spec.ramp_rate));
                }
            }
            Phase::WaitGo => {
                let go = self.ctl.go_ns.load(Relaxed);
                next = if go == 0 { now + 2_000_000 } else { next.min(go) };
            }
            Phase::Measure => {
                next = next.min(self.window_end).min(self.next_busy);
                if let Some(rate) = self.spec.rate {
                    if !self.senders.is_empty() {
                        next = next.min(rate_next(self.go, self.sched, rate));
                    }
                }
                if self.spec.churn_rate > 0.0 {
                    next = next.min(rate_next(self.go, self.churn_started, self.spec.churn_rate));
                }
                if self.spec.moves_rate > 0.0 && !self.member_slots.is_empty() {
                    next = next.min(rate_next(self.go, self.moves_sched, self.spec.moves_rate));
                }
                if self.spec.reconnect_rate > 0.0 && !self.member_slots.is_empty() {
                    next = next.min(rate_next(self.go, self.reconnects_sched, self.spec.reconnect_rate));
                }
            }
            Phase::Grace => next = next.min(self.window_end + self.plan.grace_ns),
        }
        if let Some(&(_, _, d)) = self.pending_q.front() {
            next = next.min(d);
        }
        if let Some(&(_, _, d)) = self.closing_q.front() {
            next = next.min(d);
        }
        next.saturating_sub(now)
    }

    fn publish_progress(&mut self, now: u64) {
        if now.saturating_sub(self.last_flush) < 100_000_000 {
            return;
        }
        self.last_flush = now;
        let p = &self.ctl.progress;
        let t = &self.tally;
        let cur = [t.sent, t.received + t.late, t.failed, t.churn_completed];
        let counters = [&p.sent, &p.received, &p.failed, &p.churned];
        for ((c, v), f) in counters.iter().zip(cur).zip(self.flushed.iter_mut()) {
            if v > *f {
                c.fetch_add(v - *f, Relaxed);
                *f = v;
            }
        }
    }

    // ---- connection lifecycle ----

    fn ramp(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.start) as f64;
        let due = ((elapsed * self.spec.ramp_rate / 1e9) as u64 + 1).min(self.n_initial);
        while self.next_initial < due && self.handshaking < self.spec.max_pending {
            let slot = self.next_initial as usize;
            self.next_initial += 1;
            self.tally.attempted += 1;
            self.open(slot, now);
        }
    }

    fn source_ip(&self, gidx: u64) -> Option<IpAddr> {
        let ips = &self.plan.source_ips;
        (!ips.is_empty()).then(|| ips[(gidx % ips.len() as u64) as usize])
    }

    /// Starts connecting the connection in `slot` (its role and index already set).
    fn open(&mut self, slot: usize, now: u64) {
        let src = self.source_ip(self.conns[slot].gidx);
        let c = &mut self.conns[slot];
        c.st = St::Connecting;
        c.t0 = now;
        c.ws = WsConn::client((self.plan.seed ^ c.gidx.wrapping_mul(0x2545_F491)) as u32 | 1);
        c.seq = 0;
        c.inflight = 0;
        self.handshaking += 1;
        self.pending_q.push_back((slot, c.gidx, now + self.plan.connect_timeout_ns));
        let addr = self.plan.urls[self.plan.url_index(c.gidx, c.role)].addr;
        let fd = match poll::connect(addr, src) {
            Ok(poll::Connecting::Done(fd) | poll::Connecting::InProgress(fd)) => fd,
            Err(e) => return self.fail(slot, &poll::error_kind(&e)),
        };
        let raw = fd.as_raw_fd();
        c.fd = Some(fd);
        c.interest = IN | OUT;
        if let Err(e) = self.ep.add(raw, slot as u64, IN | OUT) {
            self.fail(slot, &poll::error_kind(&e));
        }
    }

    /// One pending handshake is over (ready, failed, or a churn connection moving on to close).
    fn resolved(&mut self, slot: usize) {
        self.handshaking -= 1;
        if self.conns[slot].initial {
            self.unresolved -= 1;
        }
    }

    /// The connection is ready for the window.
    fn mark_ready(&mut self, slot: usize) {
        self.resolved(slot);
        let c = &mut self.conns[slot];
        if c.reconnecting {
            // Rooms: a member back with both subscriptions; not a ramp's connection.
            c.reconnecting = false;
            c.st = St::Open;
            self.tally.room_reconnects += 1;
            self.tally.room_reconnect_lat.record(now_ns().saturating_sub(c.t0));
            self.ctl.progress.open.fetch_add(1, Relaxed);
            return;
        }
        c.st = St::Open;
        self.tally.ready += 1;
        if self.plan.urls.len() > 1 && c.initial {
            let u = self.plan.url_index(c.gidx, c.role);
            let per = &mut self.tally.ready_per_url;
            if per.len() <= u {
                per.resize(u + 1, 0);
            }
            per[u] += 1;
        }
        if c.role.receives() {
            self.tally.ready_receivers += 1;
        }
        self.ctl.progress.open.fetch_add(1, Relaxed);
        if c.role == Role::Echo && self.phase == Phase::Measure && self.plan.rate.is_none() {
            // Ready late (cannot happen for initial connections): join the closed loop.
            let now = now_ns();
            if now < self.window_end {
                self.start_echo(slot, now);
            }
        }
    }

    /// Closes the socket of `slot` and makes the slot reusable (churn) or leaves it free (initial).
    fn release(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        c.fd = None;
        c.st = St::Free;
        c.token = String::new();
        c.tls = None;
        c.out.clear();
        c.out_pos = 0;
        c.pending.clear();
        c.dirty = false;
        if c.role == Role::Churn {
            self.churn_live -= 1;
            self.free.push(slot);
        } else {
            c.out = Vec::new();
            c.pending = Vec::new();
        }
    }

    /// The connection failed or was closed: count it by state and `kind`, and release it.
    fn fail(&mut self, slot: usize, kind: &str) {
        let (st, role) = (self.conns[slot].st, self.conns[slot].role);
        match st {
            St::Free => return,
            s if s.pending() => {
                self.resolved(slot);
                if self.conns[slot].reconnecting {
                    self.conns[slot].reconnecting = false;
                    self.tally.room_reconnects_failed += 1;
                    self.tally.error(&format!("reconnect_{kind}"));
                    if let Some(m) = self.members.get_mut(slot) {
                        m.state = Membership::None;
                    }
                } else if role == Role::Churn {
                    self.tally.churn_failed += 1;
                    self.tally.error(&format!("churn_{kind}"));
                } else {
                    self.tally.failed += 1;
                    self.tally.error(kind);
                }
            }
            St::Closing => {
                // A churn connection whose close was answered by end of stream or reset: done.
                self.tally.churn_completed += 1;
            }
            _ => {
                self.tally.dropped += 1;
                *self.tally.drop_reasons.entry(kind.to_string()).or_default() += 1;
                self.ctl.progress.open.fetch_sub(1, Relaxed);
            }
        }
        self.release(slot);
    }

    /// Fails handshakes and closes that took too long.
    fn expire(&mut self, now: u64) {
        while let Some(&(slot, gidx, deadline)) = self.pending_q.front() {
            let c = &self.conns[slot];
            if c.gidx != gidx || !c.st.pending() {
                self.pending_q.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.pending_q.pop_front();
            self.fail(slot, "timeout");
        }
        while let Some(&(slot, gidx, deadline)) = self.closing_q.front() {
            let c = &self.conns[slot];
            if c.gidx != gidx || c.st != St::Closing {
                self.closing_q.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.closing_q.pop_front();
            self.tally.churn_failed += 1;
            self.tally.error("churn_close_timeout");
            self.release(slot);
        }
    }

    // ---- events ----

    fn on_event(&mut self, slot: usize, events: u32, now: u64) {
        let Some(c) = self.conns.get(slot) else { return };
        match c.st {
            St::Free => {}
            St::Connecting => {
                if events & (OUT | ERR | IN) != 0 {
                    self.on_connected(slot, now);
                }
            }
            St::Tls => {
                if events & OUT != 0 {
                    self.flush(slot);
                }
                if events & (IN | ERR) != 0 && self.conns[slot].st == St::Tls {
                    self.on_tls_readable(slot);
                }
            }
            St::Upgrading => {
                if events & OUT != 0 {
                    self.flush(slot);
                }
                if events & (IN | ERR) != 0 && self.conns[slot].st == St::Upgrading {
                    self.on_upgrade_readable(slot, now);
                }
            }
            _ => {
                if events & OUT != 0 {
                    self.flush(slot);
                }
                if events & (IN | ERR) != 0 && self.conns[slot].st != St::Free {
                    self.on_readable(slot);
                }
            }
        }
    }

    fn on_connected(&mut self, slot: usize, now: u64) {
        if let Some(e) = poll::take_error(self.conns[slot].raw()) {
            return self.fail(slot, &poll::error_kind(&e));
        }
        if let Some(plan) = &self.plan.tls {
            match TlsConn::new(plan, now) {
                Ok(t) => {
                    let c = &mut self.conns[slot];
                    c.tls = Some(t);
                    c.st = St::Tls;
                }
                Err(f) => return self.tls_failed(slot, f),
            }
            // The ClientHello.
            return self.tls_progress(slot, None);
        }
        self.after_connect(slot, now);
    }

    /// TCP (and TLS) is up: an API connection is ready; a WebSocket sends its upgrade request.
    fn after_connect(&mut self, slot: usize, now: u64) {
        let c = &self.conns[slot];
        if c.sse {
            return self.send_sse_request(slot);
        }
        if c.role != Role::Api {
            return self.send_upgrade(slot);
        }
        self.tally.established += u64::from(c.initial);
        self.tally.connect_lat.record(now.saturating_sub(c.t0));
        self.mark_ready(slot);
        self.flush(slot);
    }

    /// TLS handshake: takes everything the socket has, then lets rustls go on.
    fn on_tls_readable(&mut self, slot: usize) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut end = None;
        let c = &mut self.conns[slot];
        let fd = c.raw();
        if let Some(t) = c.tls.as_deref_mut() {
            loop {
                match poll::read(fd, &mut rbuf[..READ]) {
                    Ok(0) => {
                        let msg = "the server closed the connection during the TLS handshake";
                        end = Some(Failure { kind: "tls_eof".into(), message: msg.into() });
                        break;
                    }
                    Ok(n) => {
                        t.feed(&rbuf[..n]);
                        if n < READ {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        let message = format!("during the TLS handshake: {e}");
                        end = Some(Failure { kind: poll::error_kind(&e), message });
                        break;
                    }
                }
            }
        }
        self.rbuf = rbuf;
        self.tls_progress(slot, end);
    }

    /// Runs the TLS handshake on what was received (`end`: the socket ended, after that): sends what rustls
    /// has to send; once done, counts it and sends the upgrade request.
    fn tls_progress(&mut self, slot: usize, end: Option<Failure>) {
        let Some(t) = self.conns[slot].tls.as_deref_mut() else { return };
        match t.handshake() {
            Err(f) => self.tls_failed(slot, f),
            Ok(None) => match end {
                // rustls's view first: an alert the server sent before closing says more.
                Some(f) => self.tls_failed(slot, f),
                None => self.flush(slot),
            },
            Ok(Some(done)) => {
                let t = &mut self.tally;
                t.tls_handshakes += 1;
                t.tls_resumed += u64::from(done.resumed);
                t.tls_handshake.record(now_ns().saturating_sub(done.started));
                t.tls_handshake_cpu.record(done.cpu_ns);
                if t.tls.is_none() {
                    t.tls = Some(done.info);
                }
                self.after_connect(slot, now_ns());
            }
        }
    }

    /// A TLS handshake failed: keeps the first message for the report, counts the failure by kind.
    #[cold]
    fn tls_failed(&mut self, slot: usize, f: Failure) {
        if self.tally.tls_error.is_none() {
            self.tally.tls_error = Some(f.message);
        }
        self.fail(slot, &f.kind);
    }

    /// Queues the upgrade request (with the token, if any) and sends it.
    fn send_upgrade(&mut self, slot: usize) {
        let key = ws_key(self.plan.seed, self.conns[slot].gidx);
        let token_in = self.plan.auth.as_ref().map(|a| a.token_in);
        let c = &mut self.conns[slot];
        let host_line = &self.host_lines[self.plan.url_index(c.gidx, c.role)];
        // Minted before the ramp; written once, then dropped.
        let token = std::mem::take(&mut c.token);
        let out = &mut c.out;
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(self.plan.path.as_bytes());
        if token_in == Some(TokenIn::Query) {
            out.push(if self.plan.path.contains('?') { b'&' } else { b'?' });
            out.extend_from_slice(b"token=");
            out.extend_from_slice(token.as_bytes());
        }
        if token_in.is_none() && self.plan.rooms.is_some() {
            // Rooms in the open mode: every connection is its own user, `bench-<i>` as a token's `sub`.
            out.push(if self.plan.path.contains('?') { b'&' } else { b'?' });
            out.extend_from_slice(b"user=");
            out.extend_from_slice(jwt::subject(c.gidx).as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1");
        out.extend_from_slice(host_line);
        out.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
        out.extend_from_slice(&key);
        out.extend_from_slice(b"\r\nSec-WebSocket-Version: 13");
        match token_in {
            Some(TokenIn::Header) => {
                out.extend_from_slice(b"\r\nAuthorization: Bearer ");
                out.extend_from_slice(token.as_bytes());
            }
            Some(TokenIn::Subprotocol) => {
                out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
                out.extend_from_slice(jwt::SUBPROTOCOL.as_bytes());
                out.extend_from_slice(b", bearer.");
                out.extend_from_slice(token.as_bytes());
            }
            Some(TokenIn::Query) | None => {}
        }
        out.extend_from_slice(b"\r\n\r\n");
        c.st = St::Upgrading;
        self.flush(slot);
    }

    fn on_upgrade_readable(&mut self, slot: usize, now: u64) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let result = loop {
            let c = &mut self.conns[slot];
            match recv(c, &mut rbuf) {
                Err(kind) if kind == "eof" => break Err("reset".to_string()),
                Err(kind) => break Err(kind),
                Ok(Some((n, _))) => {
                    c.pending.extend_from_slice(&rbuf[HEAD..HEAD + n]);
                    if memchr::memmem::find(&c.pending, b"\r\n\r\n").is_some() {
                        break Ok(true);
                    }
                    if c.pending.len() > 16 * 1024 {
                        break Err("bad_response".to_string());
                    }
                }
                Ok(None) => break Ok(false),
            }
        };
        self.rbuf = rbuf;
        match result {
            Err(kind) => self.fail(slot, &kind),
            Ok(false) => {}
            Ok(true) => {
                self.on_response(slot, now);
                if self.conns[slot].st != St::Free {
                    // Edge-triggered: drain what arrived behind the response head.
                    self.on_readable(slot);
                }
            }
        }
    }

    /// The response head is complete in `pending`: check it and start the connection's role.
    fn on_response(&mut self, slot: usize, now: u64) {
        if self.conns[slot].sse {
            return self.on_sse_response(slot, now);
        }
        let c = &mut self.conns[slot];
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let (head_len, code, accept_ok, protocol) = match resp.parse(&c.pending) {
            Ok(httparse::Status::Complete(n)) => {
                let code = resp.code.unwrap_or(0);
                let want = accept_key(&ws_key(self.plan.seed, c.gidx));
                let ok = resp
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == want.as_slice());
                let protocol = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
                    .map(|h| h.value.trim_ascii() == jwt::SUBPROTOCOL.as_bytes());
                (n, code, ok, protocol)
            }
            _ => return self.fail(slot, "bad_response"),
        };
        if code != 101 {
            return self.fail(slot, &format!("status_{code}"));
        }
        if !accept_ok {
            return self.fail(slot, "bad_accept");
        }
        if self.plan.auth.as_ref().is_some_and(|a| a.token_in == TokenIn::Subprotocol) {
            // Offered `throng.v1, bearer.<token>`: the server must select throng.v1 (as a browser requires).
            match protocol {
                None => return self.fail(slot, "no_subprotocol"),
                Some(false) => return self.fail(slot, "bad_subprotocol"),
                Some(true) => {}
            }
        }
        c.pending.drain(..head_len);
        self.tally.established += u64::from(c.initial);
        let lat = now.saturating_sub(c.t0);
        let subscribes = self.plan.subscribes() && matches!(c.role, Role::Sub | Role::Churn);
        if c.role != Role::Churn && !c.reconnecting {
            self.tally.connect_lat.record(lat);
        }
        if subscribes {
            match (&self.plan.api, &self.plan.rooms) {
                // api-publish: every channel.
                (Some(api), _) => {
                    for (i, ch) in api.channels.iter().enumerate() {
                        self.scratch.clear();
                        write_subscribe(&mut self.scratch, i as u64 + 1, ch);
                        c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
                    }
                    c.acks = api.channels.len() as u32;
                }
                (None, Some(r)) => {
                    // Rooms: its personal channel and its group; ready when both are acknowledged.
                    let personal = format!("{}{}", r.personal_prefix, jwt::subject(c.gidx));
                    // With moves, its current group (a reconnect after a move goes back to the new one).
                    let k = self.members.get(slot).filter(|_| self.moving).map_or(c.gidx / r.group_size, |m| m.group);
                    let group = format!("{ROOM_PREFIX}{k}");
                    for (i, ch) in [personal, group].iter().enumerate() {
                        self.scratch.clear();
                        write_subscribe(&mut self.scratch, i as u64 + 1, ch);
                        c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
                    }
                    c.acks = 2;
                }
                (None, None) => {
                    self.scratch.clear();
                    write_subscribe(&mut self.scratch, 1, &self.plan.channel);
                    c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
                    c.acks = 1;
                }
            }
            c.st = St::Subscribing;
        } else if c.role == Role::Churn {
            self.tally.churn_lat.record(lat);
            self.start_close(slot, now);
        } else {
            self.mark_ready(slot);
        }
        if self.conns[slot].st == St::Free {
            return;
        }
        if !self.conns[slot].pending.is_empty() {
            // Frames that came with the response (a welcome message, say).
            let mut buf = std::mem::take(&mut self.conns[slot].pending);
            let r = self.process(slot, &mut buf, now);
            if let Ok(used) = r {
                buf.drain(..used);
                self.conns[slot].pending = buf;
            }
            if let Err(stop) = r {
                return self.stop(slot, stop);
            }
        }
        self.flush(slot);
    }

    /// Reads everything available (edge-triggered: until a short read or `EAGAIN`) and processes the frames
    /// in place.
    fn on_readable(&mut self, slot: usize) {
        if self.conns[slot].role == Role::Api {
            return self.on_api_readable(slot);
        }
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let outcome = loop {
            let c = &mut self.conns[slot];
            let (n, more) = match recv(c, &mut rbuf) {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(kind) => break Err(Stop::Fail(kind)),
            };
            if n == 0 {
                // TLS: only a partial record, or a session ticket.
                if more {
                    continue;
                }
                break Ok(());
            }
            // One clock read per read: every frame in it had arrived by now.
            let now = now_ns();
            let plen = c.pending.len();
            let r = if plen <= HEAD {
                // The usual case: the partial frame goes in front of the new bytes; parse in place.
                rbuf[HEAD - plen..HEAD].copy_from_slice(&c.pending);
                let (start, end) = (HEAD - plen, HEAD + n);
                let r = self.process_any(slot, &mut rbuf[start..end], now);
                if let Ok(used) = r {
                    let c = &mut self.conns[slot];
                    c.pending.clear();
                    c.pending.extend_from_slice(&rbuf[start + used..end]);
                }
                r
            } else {
                // A message larger than the head room: collect it in `pending`.
                c.pending.extend_from_slice(&rbuf[HEAD..HEAD + n]);
                let mut buf = std::mem::take(&mut c.pending);
                let r = self.process_any(slot, &mut buf, now);
                if let Ok(used) = r {
                    buf.drain(..used);
                    self.conns[slot].pending = buf;
                }
                r
            };
            if let Err(stop) = r {
                break Err(stop);
            }
            if !more {
                break Ok(());
            }
        };
        self.rbuf = rbuf;
        match outcome {
            Ok(()) => self.flush(slot),
            Err(stop) => self.stop(slot, stop),
        }
    }

    /// Ends a connection whose processing stopped: sends what `out` holds (a close reply), counts it.
    fn stop(&mut self, slot: usize, stop: Stop) {
        if self.conns[slot].st == St::Free {
            return;
        }
        let c = &mut self.conns[slot];
        // Best effort: the close reply, if the socket takes it.
        let fd = c.raw();
        match c.tls.as_deref_mut() {
            None if c.out_pos < c.out.len() => {
                let _ = poll::write(fd, &c.out[c.out_pos..]);
            }
            None => {}
            Some(t) => {
                let _ = flush_tls(t, &mut c.out, &mut c.out_pos, fd);
            }
        }
        match stop {
            Stop::Closed(code) => {
                if c.st == St::Closing {
                    self.tally.churn_completed += 1;
                    self.release(slot);
                } else {
                    let kind = code.map_or_else(|| "close".to_string(), |c| format!("close_{c}"));
                    self.fail(slot, &kind);
                }
            }
            Stop::Fail(kind) => self.fail(slot, &kind),
        }
    }

    /// Processes the complete frames (or, for an SSE subscriber, events) at the front of `buf`; returns the
    /// bytes consumed.
    #[inline]
    fn process_any(&mut self, slot: usize, buf: &mut [u8], now: u64) -> Result<usize, Stop> {
        if self.conns[slot].sse {
            self.process_sse(slot, buf, now)
        } else {
            self.process(slot, buf, now)
        }
    }

    /// Processes complete frames at the front of `buf`; returns the bytes consumed.
    fn process(&mut self, slot: usize, buf: &mut [u8], now: u64) -> Result<usize, Stop> {
        let mut off = 0;
        while off < buf.len() {
            let c = &mut self.conns[slot];
            let step = c.ws.handle_read(&mut buf[off..], &LIMITS, &mut c.out);
            match step {
                Ok(Step::NeedMore) => break,
                Ok(Step::Consumed(n)) => off += n,
                Ok(Step::Event(n, ev)) => {
                    match ev {
                        Event::Message { data: MessageData::InPlace(r), .. } => {
                            let msg = &buf[off + r.start..off + r.end];
                            self.on_message(slot, msg, now)?;
                        }
                        Event::Message { data: MessageData::Assembled(v), .. } => self.on_message(slot, &v, now)?,
                        Event::Ping(_) => self.mark_dirty(slot),
                        Event::Pong(_) => {}
                        Event::Closed { code } => return Err(Stop::Closed(code)),
                    }
                    off += n;
                }
                Err(e) => return Err(Stop::Fail(format!("protocol_{}", e.label()))),
            }
        }
        Ok(off)
    }

    fn on_message(&mut self, slot: usize, msg: &[u8], now: u64) -> Result<(), Stop> {
        let role = self.conns[slot].role;
        match role {
            Role::Idle | Role::Api => {}
            Role::Echo => match self.sc.stamp(msg, &mut self.hint) {
                Some(s) if s.id == self.conns[slot].gidx => {
                    if !self.arrive(self.conns[slot].seq_base, s, now) {
                        // A copy: it releases nothing in the closed loop.
                        return Ok(());
                    }
                    let c = &mut self.conns[slot];
                    c.inflight = c.inflight.saturating_sub(1);
                    if self.phase == Phase::Measure && self.plan.rate.is_none() && now < self.window_end {
                        // Closed loop: the next message is due the moment this echo arrived.
                        self.send_one(slot, now);
                    }
                }
                // Not this connection's message, or no stamp.
                _ => self.tally.unparsed += 1,
            },
            Role::Sub | Role::PubSub | Role::Pub | Role::Churn => match self.sc.classify(msg, &mut self.hint) {
                // Rooms with moves: group deliveries (stamp id `2 * publisher + 1`) by their offsets.
                Incoming::Stamp(s) if self.moving && s.id % 2 == 1 && role.receives() => {
                    self.group_delivery(slot, s, msg, now)
                }
                Incoming::Stamp(s) if role.receives() => self.deliver(slot, s, now),
                Incoming::Stamp(_) => {}
                Incoming::Subscribed => {
                    if self.moving {
                        self.room_subscribed(slot, msg, now);
                    }
                    self.on_subscribed(slot, now)
                }
                Incoming::Error => {
                    self.tally.v1_errors += 1;
                    if self.conns[slot].st == St::Subscribing {
                        return Err(Stop::Fail("subscribe_rejected".into()));
                    }
                    if self.moving {
                        self.room_refused(slot);
                    }
                }
                Incoming::Other => {
                    if self.moving {
                        self.room_reply(slot, msg, now);
                    } else if self.plan.target == Target::Raw && role.receives() {
                        self.tally.unparsed += 1;
                    }
                }
            },
        }
        Ok(())
    }

    #[inline]
    fn deliver(&mut self, slot: usize, s: Stamp, now: u64) {
        if s.id >= self.n_senders {
            self.tally.unparsed += 1;
            return;
        }
        self.arrive(self.conns[slot].seq_base + s.id as usize, s, now);
    }

    /// Accounts one stamped message on sequence slot `idx`: duplicate, or a distinct message in the window
    /// or late. True when it was distinct (not a copy).
    #[inline]
    fn arrive(&mut self, idx: usize, s: Stamp, now: u64) -> bool {
        let Some(track) = self.seqs.get_mut(idx) else { return false };
        match track.arrive(s.seq) {
            Arrival::New => {}
            Arrival::Reordered => self.tally.reordered += 1,
            Arrival::Duplicate => {
                self.tally.duplicates += 1;
                return false;
            }
            Arrival::Stale => {
                self.tally.stale += 1;
                return false;
            }
        }
        self.count_new(s, now);
        true
    }

    /// Counts a distinct message: received in the window, or late; its latency from the stamp.
    #[inline]
    fn count_new(&mut self, s: Stamp, now: u64) {
        let lat = now.saturating_sub(s.t_ns);
        if now < self.window_end {
            self.tally.received += 1;
            self.tally.latency.record(lat);
        } else {
            self.tally.late += 1;
            self.tally.late_latency.record(lat);
        }
    }

    // ---- rooms with moves (`--churn-rate`) ----

    /// A group message to a member: new when its offset is past the newest received (offsets skipped on
    /// the way count in `gaps`; they stay missing, as a channel's offsets arrive in order), a copy when not.
    /// Outside a confirmed membership it is a stray.
    fn group_delivery(&mut self, slot: usize, s: Stamp, msg: &[u8], now: u64) {
        let off = number_after(&self.rf.offset, msg);
        let Some(m) = self.members.get_mut(slot) else { return };
        let (Some(off), Membership::In | Membership::Leaving) = (off, m.state) else {
            self.tally.room_strays += 1;
            return;
        };
        if off <= m.from {
            self.tally.room_strays += 1;
            return;
        }
        if off <= m.last {
            self.tally.duplicates += 1;
            return;
        }
        self.tally.gaps += off - m.last - 1;
        m.last = off;
        self.count_new(s, now);
    }

    /// A `subscribed` reply: the group's (id [`GROUP_SUB_ID`]) confirms a membership at its offset; a move's
    /// join is counted and timed.
    fn room_subscribed(&mut self, slot: usize, msg: &[u8], now: u64) {
        if number_after(&self.rf.id, msg) != Some(GROUP_SUB_ID) {
            return;
        }
        let off = number_after(&self.rf.offset, msg).unwrap_or(0);
        let open = self.conns[slot].st == St::Open;
        let Some(m) = self.members.get_mut(slot).filter(|m| m.state == Membership::Joining) else { return };
        *m = Member { state: Membership::In, from: off, last: off, ..*m };
        if open {
            self.tally.room_joins += 1;
            self.tally.room_join_lat.record(now.saturating_sub(m.t0));
        }
    }

    /// A refused command of a member (a leave or a join): it ends up in no group.
    fn room_refused(&mut self, slot: usize) {
        if let Some(m) =
            self.members.get_mut(slot).filter(|m| matches!(m.state, Membership::Joining | Membership::Leaving))
        {
            m.state = Membership::None;
            self.tally.room_moves_refused += 1;
        }
    }

    /// Other replies: a publisher's `published` notes its group's newest offset (the `id` is the group + 1);
    /// a member's `unsubscribed` closes its membership — it expected every offset after its position up to
    /// the reply's `offset` when the server gives one, else up to the newest it received before the reply
    /// (what the server had sent it when it ended the subscription) — and starts the join of another group.
    fn room_reply(&mut self, slot: usize, msg: &[u8], now: u64) {
        if self.conns[slot].role == Role::Pub {
            if self.rf.published.find(msg).is_some() {
                let (id, off) = (number_after(&self.rf.id, msg), number_after(&self.rf.offset, msg));
                if let (Some(id @ 1..), Some(off)) = (id, off) {
                    if let Some(f) = self.tally.room_final.get_mut(id as usize - 1) {
                        // The newest reply: a group recreated under a new epoch starts its offsets again.
                        *f = off;
                    }
                }
            }
            return;
        }
        if self.rf.unsubscribed.find(msg).is_none() {
            return;
        }
        let said = number_after(&self.rf.offset, msg);
        let Some(m) = self.members.get_mut(slot).filter(|m| m.state == Membership::Leaving) else { return };
        let end = said.map_or(m.last, |o| o.max(m.last));
        self.tally.expected_deliveries += end - m.from;
        self.tally.room_leaves += 1;
        self.tally.room_leave_lat.record(now.saturating_sub(m.t0));
        let old = m.group;
        self.start_join(slot, old, now);
    }

    /// A random member of this thread that is in its group and open (a few tries), for a move or a
    /// reconnect; `None` when the tries found none.
    fn pick_member(&mut self) -> Option<usize> {
        for _ in 0..8 {
            let i = (self.next_rand() % self.member_slots.len() as u64) as usize;
            let slot = self.member_slots[i];
            if self.members[slot].state == Membership::In && self.conns[slot].st == St::Open {
                return Some(slot);
            }
        }
        None
    }

    /// Group moves that are due: each takes a random member of this thread that is in a group (a few tries;
    /// none free: skipped) and starts its leave.
    fn moves_due(&mut self, now: u64) {
        let rate = self.spec.moves_rate;
        if rate <= 0.0 || self.member_slots.is_empty() {
            return;
        }
        let due = (now.saturating_sub(self.go) as f64 * rate / 1e9) as u64 + 1;
        while self.moves_sched < due {
            self.moves_sched += 1;
            let Some(slot) = self.pick_member() else {
                self.tally.room_moves_skipped += 1;
                continue;
            };
            let group = self.members[slot].group;
            self.room_command(slot, false, group);
            let m = &mut self.members[slot];
            m.state = Membership::Leaving;
            m.t0 = now;
            self.tally.room_leaves_started += 1;
        }
    }

    /// Reconnects that are due: each takes a random member of this thread that is in a group and not moving
    /// (a few tries; none free: skipped), closes its group membership at the newest offset it received (what
    /// the server had sent it), drops its socket and connects again as the same user; the upgrade subscribes
    /// to its personal channel and its group again, and the group's `subscribed` opens a new membership.
    fn reconnects_due(&mut self, now: u64) {
        let rate = self.spec.reconnect_rate;
        if rate <= 0.0 || self.member_slots.is_empty() {
            return;
        }
        let due = (now.saturating_sub(self.go) as f64 * rate / 1e9) as u64 + 1;
        while self.reconnects_sched < due {
            self.reconnects_sched += 1;
            let Some(slot) = self.pick_member() else {
                self.tally.room_moves_skipped += 1;
                continue;
            };
            let m = &mut self.members[slot];
            self.tally.expected_deliveries += m.last - m.from;
            *m = Member { state: Membership::Joining, from: 0, last: 0, t0: now, ..*m };
            self.tally.room_reconnects_started += 1;
            self.ctl.progress.open.fetch_sub(1, Relaxed);
            let token = match &self.plan.auth {
                Some(auth) => mint(auth, self.conns[slot].gidx, jwt::unix_now()).unwrap_or_else(|_| {
                    self.tally.error("reconnect_token_mint");
                    String::new()
                }),
                None => String::new(),
            };
            let c = &mut self.conns[slot];
            // Dropping the socket closes it (and takes it out of the epoll set): no close handshake.
            c.fd = None;
            c.tls = None;
            c.out.clear();
            c.out_pos = 0;
            c.pending.clear();
            c.dirty = false;
            c.initial = false;
            c.reconnecting = true;
            c.token = token;
            self.open(slot, now);
        }
    }

    /// Subscribes `slot` to a random group other than `old`.
    fn start_join(&mut self, slot: usize, old: u64, now: u64) {
        let Some(r) = &self.plan.rooms else { return };
        let groups = r.groups;
        let group = (old + 1 + self.next_rand() % (groups - 1)) % groups;
        self.room_command(slot, true, group);
        self.members[slot] = Member { group, state: Membership::Joining, from: 0, last: 0, t0: now };
    }

    /// Queues a `subscribe` (id [`GROUP_SUB_ID`]) or `unsubscribe` (id [`GROUP_UNSUB_ID`]) of `room:<group>`.
    fn room_command(&mut self, slot: usize, subscribe: bool, group: u64) {
        self.room_ch.clear();
        self.room_ch.push_str(ROOM_PREFIX);
        let _ = write!(self.room_ch, "{group}");
        self.scratch.clear();
        if subscribe {
            write_subscribe(&mut self.scratch, GROUP_SUB_ID, &self.room_ch);
        } else {
            write_unsubscribe(&mut self.scratch, GROUP_UNSUB_ID, &self.room_ch);
        }
        let c = &mut self.conns[slot];
        c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
        self.mark_dirty(slot);
    }

    // ---- Server-Sent Events (`--transport sse`) ----

    /// Queues an SSE subscriber's `GET /sse?channel=<channel>` (with the token, if any) and sends it.
    fn send_sse_request(&mut self, slot: usize) {
        let token_in = self.plan.auth.as_ref().map(|a| a.token_in);
        let c = &mut self.conns[slot];
        let host_line = &self.host_lines[self.plan.url_index(c.gidx, c.role)];
        // Minted before the ramp; written once, then dropped.
        let token = std::mem::take(&mut c.token);
        let out = &mut c.out;
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(self.plan.sse_path.as_bytes());
        if token_in == Some(TokenIn::Query) {
            out.extend_from_slice(b"&token=");
            out.extend_from_slice(token.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1");
        out.extend_from_slice(host_line);
        out.extend_from_slice(b"\r\nAccept: text/event-stream\r\nCache-Control: no-cache");
        if token_in == Some(TokenIn::Header) {
            out.extend_from_slice(b"\r\nAuthorization: Bearer ");
            out.extend_from_slice(token.as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
        c.st = St::Upgrading;
        self.flush(slot);
    }

    /// An SSE subscriber's response head is complete in `pending`: a `200` with `text/event-stream` starts
    /// the stream (the connection counts as established, and waits for its `subscribed` event); anything else
    /// fails it (`status_<code>`, `bad_content_type`, `sse_chunked`: a stream the bench does not decode).
    fn on_sse_response(&mut self, slot: usize, now: u64) {
        let c = &mut self.conns[slot];
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let (head_len, code, event_stream, chunked) = match resp.parse(&c.pending) {
            Ok(httparse::Status::Complete(n)) => {
                let h = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
                let event_stream = h("content-type").is_some_and(|v| {
                    v.trim_ascii().get(..17).is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
                });
                (n, resp.code.unwrap_or(0), event_stream, h("transfer-encoding").is_some())
            }
            _ => return self.fail(slot, "bad_response"),
        };
        if code != 200 {
            return self.fail(slot, &format!("status_{code}"));
        }
        if !event_stream {
            return self.fail(slot, "bad_content_type");
        }
        if chunked {
            return self.fail(slot, "sse_chunked");
        }
        c.pending.drain(..head_len);
        self.tally.established += u64::from(c.initial);
        self.tally.connect_lat.record(now.saturating_sub(c.t0));
        // Ready on the `subscribed` event, as a WebSocket subscriber on its `subscribed` reply.
        c.acks = 1;
        c.st = St::Subscribing;
        if !c.pending.is_empty() {
            // Events that came with the head (the welcome, the subscribed, ...).
            let mut buf = std::mem::take(&mut c.pending);
            match self.process_sse(slot, &mut buf, now) {
                Ok(used) => {
                    buf.drain(..used);
                    self.conns[slot].pending = buf;
                }
                Err(stop) => return self.stop(slot, stop),
            }
        }
        self.flush(slot);
    }

    /// Processes the complete Server-Sent Events at the front of `buf` (each ends with an empty line); returns
    /// the bytes consumed, up to the end of the last complete event: a partial one is parsed again, whole,
    /// when the rest has come. Lines end with LF or CRLF; `:` comments, `id:` and `retry:` lines and unknown
    /// fields are skipped. An event's data is its `data:` line read in place, or its lines joined with LF.
    fn process_sse(&mut self, slot: usize, buf: &mut [u8], now: u64) -> Result<usize, Stop> {
        let mut done = 0;
        let mut pos = 0;
        let mut kind = SseKind::Message;
        // The data: its range in `buf`, or (`joined`) `sse_data`.
        let mut data: Option<(usize, usize)> = None;
        let mut joined = false;
        while let Some(i) = memchr::memchr(b'\n', &buf[pos..]) {
            let nl = pos + i;
            let end = if nl > pos && buf[nl - 1] == b'\r' { nl - 1 } else { nl };
            let start = pos;
            pos = nl + 1;
            if start == end {
                // The end of an event: dispatch it (an event without data is none).
                if let Some((a, b)) = data.take() {
                    let r = if joined {
                        let d = std::mem::take(&mut self.sse_data);
                        let r = self.on_sse_event(slot, kind, &d, now);
                        self.sse_data = d;
                        r
                    } else {
                        self.on_sse_event(slot, kind, &buf[a..b], now)
                    };
                    r?;
                }
                kind = SseKind::Message;
                joined = false;
                done = pos;
                continue;
            }
            let line = &buf[start..end];
            if line[0] == b':' {
                continue;
            }
            let (name, vstart) = match memchr::memchr(b':', line) {
                Some(c) if line.get(c + 1) == Some(&b' ') => (&line[..c], start + c + 2),
                Some(c) => (&line[..c], start + c + 1),
                None => (line, end),
            };
            match name {
                b"event" => kind = SseKind::of(&buf[vstart..end]),
                b"data" => match data {
                    None => data = Some((vstart, end)),
                    Some((a, b)) => {
                        // Another data line: joined with LF (rare; the server sends one line).
                        if !joined {
                            self.sse_data.clear();
                            self.sse_data.extend_from_slice(&buf[a..b]);
                            joined = true;
                        }
                        self.sse_data.push(b'\n');
                        self.sse_data.extend_from_slice(&buf[vstart..end]);
                    }
                },
                _ => {}
            }
        }
        if done == 0 && buf.len() > LIMITS.max_message {
            return Err(Stop::Fail("sse_event_too_large".into()));
        }
        Ok(done)
    }

    /// One Server-Sent Event: a message is accounted as a WebSocket delivery; `subscribed` makes the
    /// subscriber ready; `error` counts as a v1 error (failing a subscriber not ready yet); `close` ends the
    /// stream as a close frame would (`close_<code>`).
    fn on_sse_event(&mut self, slot: usize, kind: SseKind, data: &[u8], now: u64) -> Result<(), Stop> {
        match kind {
            SseKind::Message => match self.sc.stamp(data, &mut self.hint) {
                Some(s) => self.deliver(slot, s, now),
                None => self.tally.unparsed += 1,
            },
            SseKind::Subscribed => self.on_subscribed(slot, now),
            SseKind::Error => {
                self.tally.v1_errors += 1;
                if self.conns[slot].st == St::Subscribing {
                    return Err(Stop::Fail("subscribe_rejected".into()));
                }
            }
            SseKind::Close => return Err(Stop::Closed(close_code(data))),
            SseKind::Other => {}
        }
        Ok(())
    }

    fn on_subscribed(&mut self, slot: usize, now: u64) {
        let c = &mut self.conns[slot];
        if c.st != St::Subscribing {
            return;
        }
        c.acks = c.acks.saturating_sub(1);
        if c.acks > 0 {
            // api-publish: more channels to be acknowledged.
            return;
        }
        if c.role == Role::Churn {
            self.tally.churn_lat.record(now.saturating_sub(c.t0));
            self.start_close(slot, now);
        } else {
            self.mark_ready(slot);
        }
    }

    // ---- sending ----

    fn mark_dirty(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(slot) = self.dirty.pop() {
            if self.conns[slot].dirty {
                self.flush(slot);
            }
        }
    }

    /// Writes as much of the connection's unsent bytes as the socket takes; asks for writability if not all.
    fn flush(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        c.dirty = false;
        let fd = c.raw();
        let sent = match c.tls.as_deref_mut() {
            None => {
                while c.out_pos < c.out.len() {
                    match poll::write(fd, &c.out[c.out_pos..]) {
                        Ok(n) => c.out_pos += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return self.fail(slot, &poll::error_kind(&e)),
                    }
                }
                if c.out_pos == c.out.len() {
                    c.out.clear();
                    c.out_pos = 0;
                    true
                } else {
                    if c.out_pos > (1 << 20) {
                        c.out.drain(..c.out_pos);
                        c.out_pos = 0;
                    }
                    false
                }
            }
            Some(t) => match flush_tls(t, &mut c.out, &mut c.out_pos, fd) {
                Ok(sent) => sent,
                Err(kind) => return self.fail(slot, &kind),
            },
        };
        let want = if sent { IN } else { IN | OUT };
        if want != c.interest {
            c.interest = want;
            if let Err(e) = self.ep.modify(fd, slot as u64, want) {
                self.fail(slot, &poll::error_kind(&e));
            }
        }
    }

    /// Whether `slot` can take a message now: open, and its unsent bytes under [`OUT_CAP`]. A message it
    /// cannot take is skipped (a lost message; `backpressured` too when the socket is the reason).
    fn sendable(&mut self, slot: usize) -> bool {
        let c = &self.conns[slot];
        if c.st != St::Open {
            self.tally.skipped += 1;
            return false;
        }
        if c.unsent() > OUT_CAP {
            self.tally.skipped += 1;
            self.tally.backpressured += 1;
            return false;
        }
        true
    }

    /// Queues one message scheduled at `t_ns` on `slot`, stamped with that time (flushed at the end of the
    /// loop turn). False when skipped: counted in `skipped`, a lost message.
    fn send_one(&mut self, slot: usize, t_ns: u64) -> bool {
        if self.plan.rooms.is_some() && self.conns[slot].role == Role::Pub {
            return self.send_room(slot, t_ns);
        }
        if !self.sendable(slot) {
            return false;
        }
        let c = &mut self.conns[slot];
        let id = if c.role == Role::Echo { c.gidx } else { c.pub_id };
        let stamp = Stamp { t_ns, id, seq: c.seq };
        c.seq += 1;
        self.scratch.clear();
        if c.role == Role::Pub {
            write_publish(&mut self.scratch, &self.plan.channel, stamp, self.plan.size);
        } else {
            write_payload(&mut self.scratch, stamp, self.plan.size);
        }
        c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
        if c.role == Role::Echo {
            c.inflight += 1;
        }
        self.tally.sent += 1;
        self.mark_dirty(slot);
        true
    }

    /// Rooms: one publish to a random personal channel (`--personal-share`) or group, stamped with the
    /// id `2 * publisher + kind` (0 personal, 1 group) and the publisher's sequence number on that channel;
    /// its members are expected deliveries, sent or skipped.
    fn send_room(&mut self, slot: usize, t_ns: u64) -> bool {
        let plan = self.plan;
        let Some(r) = &plan.rooms else { return false };
        let x = self.next_rand();
        let personal = r.personal_share > 0.0 && ((x >> 11) as f64 / (1u64 << 53) as f64) < r.personal_share;
        let y = self.next_rand();
        let pub_id = self.conns[slot].pub_id;
        let (kind, seq_idx, members) = if personal {
            let j = y % self.plan.receivers;
            self.room_ch.clear();
            self.room_ch.push_str(&r.personal_prefix);
            let _ = write!(self.room_ch, "bench-{j}");
            (0, (pub_id * self.plan.receivers + j) as usize, 1)
        } else {
            let k = y % r.groups;
            self.room_ch.clear();
            self.room_ch.push_str(ROOM_PREFIX);
            let _ = write!(self.room_ch, "{k}");
            (1, (pub_id * r.groups + k) as usize, self.plan.group_members(k))
        };
        // With moves, a group's expected deliveries come from its memberships' offsets instead.
        let moving = r.moving() && kind == 1;
        if !moving {
            self.tally.expected_deliveries += members;
        }
        if !self.sendable(slot) {
            return false;
        }
        let c = &mut self.conns[slot];
        let seqs = if kind == 0 { &mut self.room_seq_personal } else { &mut self.room_seq_group };
        let seq = seqs[seq_idx];
        seqs[seq_idx] += 1;
        let stamp = Stamp { t_ns, id: pub_id * 2 + kind, seq };
        c.seq += 1;
        self.scratch.clear();
        if moving {
            // The `published` reply names the group (id = group + 1) with its offset.
            write_publish_id(&mut self.scratch, &self.room_ch, (seq_idx as u64 % r.groups) + 1, stamp, self.plan.size);
        } else {
            write_publish(&mut self.scratch, &self.room_ch, stamp, self.plan.size);
        }
        c.ws.encode_frame(&mut c.out, true, OpCode::Text, &self.scratch);
        self.tally.sent += 1;
        self.mark_dirty(slot);
        true
    }

    /// xorshift64*.
    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn start_echo(&mut self, slot: usize, t_ns: u64) {
        for _ in 0..self.plan.inflight {
            self.send_one(slot, t_ns);
        }
    }

    fn start_window(&mut self, now: u64) {
        if let Some(api) = &self.plan.api {
            for slot in 0..self.n_initial as usize {
                if self.conns[slot].role == Role::Api && self.conns[slot].st == St::Open {
                    // The closed loop starts at the window's start, `--pipeline` requests on every connection.
                    for _ in 0..api.pipeline {
                        self.send_request(slot, self.go);
                    }
                }
            }
        }
        if self.plan.scenario == Scenario::Echo && self.plan.rate.is_none() {
            for slot in 0..self.n_initial as usize {
                if self.conns[slot].st == St::Open {
                    // The closed loop starts at the window's start, for every connection.
                    self.start_echo(slot, self.go);
                }
            }
        }
        if let Some((every, _)) = self.plan.test_busy {
            self.next_busy = self.go + every;
        }
        self.send_due(now, now, 100_000);
        self.churn_due(now);
        self.moves_due(now);
        self.reconnects_due(now);
    }

    // ---- api-publish ----

    /// Queues one `POST /api/publish` of `--batch` stamped messages on `slot`, scheduled (and stamped) at
    /// `t_ns`: channels round-robin, each message stamped with its (connection, channel) stream and that
    /// stream's sequence number. Built in the reused scratch buffer and appended to `out`: no allocation.
    fn send_request(&mut self, slot: usize, t_ns: u64) {
        let plan = self.plan;
        let Some(api) = &plan.api else { return };
        let c = &mut self.conns[slot];
        if c.st != St::Open || c.no_more {
            return;
        }
        let n_ch = api.channels.len();
        let body = &mut self.scratch;
        body.clear();
        if api.batch > 1 {
            body.extend_from_slice(b"{\"batch\":[");
        }
        for i in 0..api.batch {
            if i > 0 {
                body.push(b',');
            }
            let ch = c.next_ch;
            c.next_ch = if ch + 1 == n_ch { 0 } else { ch + 1 };
            let seq = c.chan_seq[ch];
            c.chan_seq[ch] += 1;
            body.extend_from_slice(b"{\"channel\":\"");
            body.extend_from_slice(api.channels[ch].as_bytes());
            body.extend_from_slice(b"\",\"data\":");
            let stamp = Stamp { t_ns, id: c.pub_id * n_ch as u64 + ch as u64, seq };
            write_payload(body, stamp, plan.size);
            body.push(b'}');
        }
        if api.batch > 1 {
            body.extend_from_slice(b"]}");
        }
        c.out.extend_from_slice(&self.api_head);
        push_u64(&mut c.out, body.len() as u64);
        c.out.extend_from_slice(b"\r\n\r\n");
        c.out.extend_from_slice(body);
        c.reqs.push_back((t_ns, api.batch));
        self.tally.api_requests += 1;
        self.tally.sent += u64::from(api.batch);
        self.mark_dirty(slot);
    }

    /// Reads an API connection's responses (edge-triggered: until a short read or `EAGAIN`), accounts each,
    /// and sends the next request for each one answered while the window lasts.
    fn on_api_readable(&mut self, slot: usize) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let outcome = loop {
            let c = &mut self.conns[slot];
            let (n, more) = match recv(c, &mut rbuf) {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(kind) => break Err(kind),
            };
            if n > 0 {
                c.pending.extend_from_slice(&rbuf[HEAD..HEAD + n]);
                if let Err(kind) = self.api_responses(slot, now_ns()) {
                    break Err(kind);
                }
            }
            // After a `Connection: close` the end of the stream may have come with the response, and no
            // edge would report it again: read on until it (or `EAGAIN`).
            if !more && !self.conns[slot].no_more {
                break Ok(());
            }
        };
        self.rbuf = rbuf;
        match outcome {
            Ok(()) => self.flush(slot),
            Err(kind) => {
                // Requests in flight when the server closed the connection (or it failed) are failed ones.
                let lost = self.conns[slot].reqs.len() as u64;
                if lost > 0 {
                    self.tally.api_error("closed", lost);
                    self.conns[slot].reqs.clear();
                }
                self.fail(slot, &kind);
            }
        }
    }

    /// Handles the complete responses at the front of the connection's `pending` bytes (status line,
    /// headers, `Content-Length` body); keeps an unfinished one.
    fn api_responses(&mut self, slot: usize, now: u64) -> Result<(), String> {
        let pending = std::mem::take(&mut self.conns[slot].pending);
        let mut off = 0;
        let result = loop {
            let buf = &pending[off..];
            if buf.is_empty() {
                break Ok(());
            }
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut resp = httparse::Response::new(&mut headers);
            let head = match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() <= 64 * 1024 => break Ok(()),
                _ => break Err("bad_response".to_string()),
            };
            let code = resp.code.unwrap_or(0);
            let mut len = Some(0usize);
            let mut close = false;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    len = None;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                }
            }
            let Some(len) = len else { break Err("bad_response".to_string()) };
            if buf.len() < head + len {
                break Ok(());
            }
            let body = &buf[head..head + len];
            off += head + len;
            if (100..200).contains(&code) {
                // Informational (`100 Continue`): the real response follows.
                continue;
            }
            let (offsets, errors) = if code == 200 {
                (self.offset_finder.find_iter(body).count() as u64, self.error_finder.find_iter(body).count() as u64)
            } else {
                (0, 0)
            };
            if close {
                self.conns[slot].no_more = true;
            }
            self.api_response(slot, code, offsets, errors, now);
        };
        let mut pending = pending;
        pending.drain(..off);
        self.conns[slot].pending = pending;
        result
    }

    /// Accounts one response (`offsets` and per-message `errors` counted in a `200`'s body) to the oldest
    /// request in flight, and sends the next one while the window lasts.
    fn api_response(&mut self, slot: usize, code: u16, offsets: u64, errors: u64, now: u64) {
        let Some((sent, batch)) = self.conns[slot].reqs.pop_front() else {
            self.tally.api_error("unexpected_response", 1);
            return;
        };
        let in_window = now < self.window_end;
        let t = &mut self.tally;
        if code == 200 {
            let batch = u64::from(batch);
            if offsets != batch {
                t.api_error("200_incomplete", 1);
            }
            t.api_message_errors += errors;
            let published = offsets.min(batch);
            let complete = u64::from(offsets == batch);
            let lat = now.saturating_sub(sent);
            if in_window {
                t.api_ok += complete;
                t.api_published += published;
                t.api_latency.record(lat);
            } else {
                t.api_ok_late += complete;
                t.api_published_late += published;
                t.api_late_latency.record(lat);
            }
        } else {
            // The status's three digits, without allocating (a new status allocates its key once).
            let digits = [b'0' + (code / 100 % 10) as u8, b'0' + (code / 10 % 10) as u8, b'0' + (code % 10) as u8];
            t.api_error(std::str::from_utf8(&digits).unwrap_or("bad_status"), 1);
        }
        if self.phase == Phase::Measure && now < self.window_end {
            // Closed loop: the next request is due the moment this response arrived.
            self.send_request(slot, now);
        }
    }

    /// Testing (`--test-busy`): spins for the configured time when due, like a loop stuck in a long burst.
    /// Returns the time after it.
    fn test_busy(&mut self, now: u64) -> u64 {
        let Some((every, busy)) = self.plan.test_busy else { return now };
        if now < self.next_busy {
            return now;
        }
        let until = now + busy;
        let mut t = now;
        while t < until {
            std::hint::spin_loop();
            t = now_ns();
        }
        self.next_busy += every;
        t
    }

    /// Fixed-rate sends scheduled up to `until` (at most `budget` of them), round-robin over this thread's
    /// senders, each stamped with its scheduled time; `now` is when they actually go.
    fn send_due(&mut self, until: u64, now: u64, budget: u64) {
        let Some(rate) = self.spec.rate else { return };
        if self.senders.is_empty() || until < self.go {
            return;
        }
        // Message k is due at go + k / rate.
        let due = ((until - self.go) as f64 * rate / 1e9) as u64 + 1;
        let mut budget = budget;
        while self.sched < due && budget > 0 {
            let slot = self.senders[self.rr % self.senders.len()];
            let t_ns = self.go + (self.sched as f64 * 1e9 / rate).ceil() as u64;
            self.rr += 1;
            self.sched += 1;
            budget -= 1;
            self.tally.send_lag.record(now.saturating_sub(t_ns));
            self.send_one(slot, t_ns);
        }
    }

    /// Churn connections that are due.
    fn churn_due(&mut self, now: u64) {
        if self.spec.churn_rate <= 0.0 {
            return;
        }
        let due = ((now.saturating_sub(self.go)) as f64 * self.spec.churn_rate / 1e9) as u64 + 1;
        while self.churn_started < due {
            let k = self.churn_started;
            let gidx = self.spec.churn_base + k * self.spec.churn_step;
            self.churn_started += 1;
            if self.churn_live >= self.spec.churn_cap {
                self.tally.error("churn_skipped_fd_cap");
                continue;
            }
            let token = self.churn_token(k, gidx);
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    self.conns.push(Conn::free());
                    self.conns.len() - 1
                }
            };
            let c = &mut self.conns[slot];
            c.role = Role::Churn;
            c.gidx = gidx;
            c.initial = false;
            c.token = token;
            self.churn_live += 1;
            self.tally.churn_opened += 1;
            self.open(slot, now);
        }
    }

    /// Starts the close handshake of a churn connection.
    fn start_close(&mut self, slot: usize, now: u64) {
        self.resolved(slot);
        let c = &mut self.conns[slot];
        c.ws.close(1000, "bench churn", &mut c.out);
        c.st = St::Closing;
        self.closing_q.push_back((slot, c.gidx, now + CLOSE_WAIT_NS));
        self.mark_dirty(slot);
    }
}

/// The Server-Sent Events the bench tells apart (by their `event:` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SseKind {
    /// Unnamed (or `message`): a v1 `message`.
    Message,
    /// `subscribed`.
    Subscribed,
    /// `error`: a channel's subscription refused.
    Error,
    /// `close`: the server ends the stream.
    Close,
    /// `welcome`, `gap`, anything else.
    Other,
}

impl SseKind {
    fn of(name: &[u8]) -> Self {
        match name {
            b"" | b"message" => SseKind::Message,
            b"subscribed" => SseKind::Subscribed,
            b"error" => SseKind::Error,
            b"close" => SseKind::Close,
            _ => SseKind::Other,
        }
    }
}

/// The `code` of a `close` event's data (`{"type":"close","code":4008,...}`), if it has one.
fn close_code(data: &[u8]) -> Option<u16> {
    let at = memchr::memmem::find(data, b"\"code\":")? + 7;
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits]).ok()?.parse().ok()
}

/// The token of connection `gidx`.
fn mint(auth: &Auth, gidx: u64, now_unix: u64) -> Result<String, Error> {
    auth.minter
        .mint(&jwt::subject(gidx), now_unix)
        .map_err(|e| Error::Config(format!("minting a {} token: {e}", auth.minter.alg().name())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_base64_of_16_bytes_and_distinct() {
        let a = ws_key(1, 0);
        let b = ws_key(1, 1);
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(a).unwrap().len(), 16);
    }

    #[test]
    fn sse_event_names_and_close_codes() {
        assert_eq!(SseKind::of(b""), SseKind::Message);
        assert_eq!(SseKind::of(b"message"), SseKind::Message);
        assert_eq!(SseKind::of(b"subscribed"), SseKind::Subscribed);
        assert_eq!(SseKind::of(b"gap"), SseKind::Other);
        assert_eq!(close_code(br#"{"type":"close","code":4008,"reason":"slow consumer"}"#), Some(4008));
        assert_eq!(close_code(br#"{"type":"close"}"#), None);
    }
}
