//! Zero allocation per delivery on every delivery path a shard runs, measured with a counting global
//! allocator around the same functions the shard loop calls:
//!
//! - **cross-shard delivery**: a channel homed on shard 0 with its subscribers on shard 1; shard 1 takes
//!   the `Deliver` messages from its ring (`v1::inbox::handle`) and appends them to its log;
//! - **the flush pass** (`channel::delivery::flush_turn`) writing the log to every subscriber;
//! - **blocked sockets and partial writes**: some subscribers have tiny socket buffers and do not read while
//!   the pass runs, so their writes stop mid-frame; the rest of the frame goes to their output queue, and
//!   when the client reads, the output edge (`channel::delivery::on_writable`) drains it.
//!
//! Publishing (encoding the one frame per message at the home) happens outside the measured region: it
//! is one allocation per publish, not per delivery. After two warm-up rounds (the log and the queue pool
//! reach their working size), every round of 32 messages to 300 subscribers must allocate nothing, and
//! every subscriber must receive exactly the frames published, in order.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use throng::channel::bus::{Inbox, Outbox, ReplyTo};
use throng::channel::delivery::{self, FlushState};
use throng::channel::{home_of, Channels};
use throng::config::{Cli, Config};
use throng::conn::{Conn, ConnKey, ConnSub, Conns, Phase};
use throng::metrics::ShardMetrics;
use throng::shard::timer::TimerWheel;
use throng::shard::{Ctx, Env, Shared};
use throng_protocol::conn::Limits;
use throng_protocol::message::Decoder;

mod counting_alloc;
use counting_alloc::allocations;

const SUBSCRIBERS: usize = 300;
/// Subscribers with tiny buffers that do not read while the pass runs.
const BLOCKED: usize = 20;
const PER_ROUND: usize = 32;
/// Rounds that may allocate: the log grows to its working size (per message, not per delivery: entries the
/// blocked subscribers had not been sent yet at the end of one pass are still there when the next round
/// appends), and the blocked subscribers take their output queues, which then go back to the shard's pool.
const WARM_UP: usize = 2;

struct Shard {
    env: Env,
    ctx: Ctx,
    conns: Conns,
}

fn shards(config: Config) -> (Arc<Shared>, Vec<Shard>) {
    let inboxes: Arc<[Inbox]> = (0..2).map(|_| Inbox::new(config.ring_capacity).expect("eventfd")).collect();
    let shared = Arc::new(Shared {
        metrics: (0..2).map(|_| Arc::new(ShardMetrics::default())).collect(),
        draining: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        listening: AtomicUsize::new(2),
        open_connections: AtomicUsize::new(0),
        started: Instant::now(),
        driver_name: "none",
        inboxes: inboxes.clone(),
        auth: None,
        limits: throng::auth::limits::Limiter::new(0, 0, 0),
        config: config.clone(),
        relay: None,
    });
    let shards = (0..2)
        .map(|id| Shard {
            env: Env {
                id,
                shared: shared.clone(),
                metrics: shared.metrics[id].clone(),
                limits: Limits { max_frame: config.max_message_size, max_message: config.max_message_size },
                now: 1,
                ring_reads: false,
            },
            ctx: Ctx {
                out: Vec::with_capacity(64 * 1024),
                wheel: TimerWheel::new(0),
                rng: 1,
                decoder: Decoder::new(),
                chans: Channels::new(
                    Outbox::new(inboxes.clone(), config.ring_capacity, config.max_queue_bytes),
                    config.max_history_bytes,
                ),
                unfinished: 0,
                flush: FlushState::default(),
                queues: Default::default(),
                proxied: Default::default(),
                rec: throng::metrics::Recorder::new(shared.started),
                frames_from: 0,
                api: Default::default(),
                resume: Vec::new(),
                sse: Default::default(),
                ring_cancels: Vec::new(),
            },
            conns: Conns::default(),
        })
        .collect();
    (shared, shards)
}

fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; setrlimit only reads it.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

#[test]
fn every_delivery_path_allocates_nothing() {
    raise_nofile_limit();
    let config = Config::load(Cli::parse_from(["throng", "--shards", "2"])).expect("defaults");
    let (shared, mut sh) = shards(config);
    let channel = (0..).map(|i| format!("zero:{i}")).find(|n| home_of(n, 2) == 0).expect("a name homed on 0");
    let ns = shared.config.namespaces.of_channel(&channel).expect("open namespaces").clone();

    // Subscribers on shard 1; the home (shard 0) learns that shard 1 listens.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (s1, rest) = sh.split_at_mut(1);
    let (home, subs) = (&mut s1[0], &mut rest[0]);
    let reply = ReplyTo { shard: 1, conn: ConnKey { idx: 0, gen: 1 }, id: None };
    let (_, _, offset) = home.ctx.chans.subscribe_at_home(&home.env, &channel, reply, None, None).expect("home");
    let idx = subs.ctx.chans.local_entry(&subs.env, &channel, &ns).expect("local channel");
    let mut clients = Vec::with_capacity(SUBSCRIBERS);
    let mut keys = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let blocked = i < BLOCKED;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        if blocked {
            sock.set_recv_buffer_size(2048).expect("SO_RCVBUF");
        }
        sock.connect(&addr.into()).expect("connect");
        let client: TcpStream = sock.into();
        client.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        if blocked {
            socket2::SockRef::from(&server).set_send_buffer_size(2048).expect("SO_SNDBUF");
        }
        let key = subs.conns.insert(|gen| {
            let mut c = Conn::new(OwnedFd::from(server), gen, 1);
            c.phase = Phase::V1;
            c
        });
        let slot = subs.ctx.chans.locals[idx].subscribe(key, offset);
        subs.conns.get_mut(key).expect("conn").subs.push(ConnSub { chan: idx as u32, slot: slot as u32 });
        clients.push(client);
        keys.push(key);
    }

    let inbox = &shared.inboxes[1];
    let mut warm_up = 0;
    // Each with its own capacity (`vec![v; n]` would clone empty ones, which allocate on first use).
    let mut got: Vec<Vec<u8>> = (0..SUBSCRIBERS).map(|_| Vec::with_capacity(1 << 16)).collect();
    let mut buf = vec![0u8; 1 << 16];
    for round in 0..6 {
        // Publish at the home: one frame per message, one pointer per message to shard 1 (not measured).
        let mut expected = Vec::new();
        for n in 0..PER_ROUND {
            let data = format!("{{\"round\":{round},\"n\":{n},\"text\":\"the same bytes for every subscriber\"}}");
            home.ctx.chans.publish(&home.env, &channel, data.as_bytes()).expect("publish");
        }
        for (_, h) in home.ctx.chans.homes.iter() {
            for e in h.history.iter().rev().take(PER_ROUND).collect::<Vec<_>>().into_iter().rev() {
                expected.extend_from_slice(&e.frame);
            }
        }
        for g in &mut got {
            g.clear();
        }
        // Measured: shard 1 takes the deliveries from its ring, runs the flush pass, and drains the
        // blocked subscribers on their output edges while their clients read.
        let ((), allocs) = allocations(|| {
            while let Some(msg) = inbox.try_recv() {
                throng::v1::inbox::handle(&subs.env, &mut subs.ctx, &mut subs.conns, msg);
            }
            delivery::flush_turn(&subs.env, &mut subs.ctx, &mut subs.conns, Instant::now() + Duration::from_secs(5));
            for (i, client) in clients.iter_mut().enumerate() {
                while got[i].len() < expected.len() {
                    if i < BLOCKED {
                        delivery::on_writable(&subs.env, &mut subs.ctx, &mut subs.conns, keys[i]);
                    }
                    match client.read(&mut buf) {
                        Ok(0) => panic!("subscriber {i}: EOF"),
                        Ok(n) => got[i].extend_from_slice(&buf[..n]),
                        Err(e) => panic!("subscriber {i}: {e} after {} of {} bytes", got[i].len(), expected.len()),
                    }
                }
            }
        });
        for (i, g) in got.iter().enumerate() {
            assert!(*g == expected, "round {round}: subscriber {i} received other bytes than the published frames");
        }
        let blocked = (0..BLOCKED).filter(|&i| subs.conns.get(keys[i]).is_some_and(|c| !c.outq.is_empty())).count();
        assert_eq!(blocked, 0, "round {round}: queues left after draining");
        let cursor_end = subs.ctx.chans.locals[idx].end();
        for &k in &keys {
            let s = subs.conns.get(k).expect("conn").subs[0];
            assert_eq!(subs.ctx.chans.locals[idx].subs[s.slot as usize].cursor, cursor_end);
        }
        if round < WARM_UP {
            warm_up += allocs;
            assert!(!subs.ctx.queues.is_empty(), "blocked subscribers' queues went back to the pool");
        } else {
            assert_eq!(allocs, 0, "round {round}: {allocs} allocations for {PER_ROUND} x {SUBSCRIBERS} deliveries");
        }
    }
    assert!(warm_up > 0, "the warm-up grows the log and takes queues: the counter must see it");
    // The blocked subscribers really were blocked mid-frame (their queues were used).
    assert!(subs.env.metrics.write_waits_total.load(std::sync::atomic::Ordering::Relaxed) >= BLOCKED as u64);
}
