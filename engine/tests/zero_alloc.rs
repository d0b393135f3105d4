//! Zero allocation and zero copy per delivery: a counting global allocator measures the channel log append
//! and the flush of every subscriber (`throng::channel::delivery::flush_conn`, the code a shard's flush pass
//! runs) for a
//! burst of messages to 1000 subscribers on real loopback sockets, and the frames the sockets received are
//! checked to be the bytes of the one frame each publish encoded, which the log shares rather than copies.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;
use throng::channel::delivery::flush_conn;
use throng::channel::home::HistoryLimits;
use throng::channel::{HistoryEntry, HomeChannel, LocalChannel};
use throng::config::SlowConsumerPolicy;
use throng::conn::write::{Flushed, QueuePool};
use throng::conn::{Conn, ConnKey, ConnSub, Phase};
use throng::metrics::{Recorder, ShardMetrics};

mod counting_alloc;
use counting_alloc::allocations;

/// Subscribers (loopback TCP pairs: 2000 descriptors).
const SUBSCRIBERS: usize = 1000;
const CHANNEL: &str = "room:zero";
/// The home's history bounds.
const LIMITS: HistoryLimits = HistoryLimits { size: 16, ttl_ticks: u64::MAX / 2, bytes: 1 << 20 };

/// Raises the open-file soft limit to the hard limit (the default soft limit may be 1024).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; setrlimit only reads it.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The shard-side state of the test: connections in a slab, one channel log with every connection
/// subscribed, the channel's home, and the counters.
struct Setup {
    conns: Slab<Conn>,
    channels: Slab<LocalChannel>,
    chan: usize,
    home: HomeChannel,
    metrics: ShardMetrics,
    queues: QueuePool,
    /// The shard's histograms (the flush records each delivery's latency).
    rec: Recorder,
    /// The receiving ends, by connection index.
    clients: Vec<TcpStream>,
}

impl Setup {
    fn new() -> Setup {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let mut channels = Slab::new();
        let chan = channels.insert(LocalChannel::new(Arc::from(CHANNEL), SlowConsumerPolicy::Close));
        let home = HomeChannel::new(CHANNEL, 0xe1, 0);
        let mut conns = Slab::with_capacity(SUBSCRIBERS);
        let mut clients = Vec::with_capacity(SUBSCRIBERS);
        for i in 0..SUBSCRIBERS {
            let client = TcpStream::connect(addr).expect("connect");
            client.set_read_timeout(Some(Duration::from_secs(5))).expect("set_read_timeout");
            let (server, _) = listener.accept().expect("accept");
            server.set_nonblocking(true).expect("set_nonblocking");
            let key = ConnKey { idx: i as u32, gen: 1 };
            let slot = channels[chan].subscribe(key, home.offset);
            let mut conn = Conn::new(OwnedFd::from(server), 1, 0);
            conn.phase = Phase::V1;
            conn.subs = std::iter::once(ConnSub { chan: chan as u32, slot: slot as u32 }).collect();
            conn.id = Some(std::sync::Arc::new(throng::auth::Identity::open("u")));
            let idx = conns.insert(conn);
            assert_eq!(idx, i);
            clients.push(client);
        }
        let rec = Recorder::new(std::time::Instant::now());
        Setup {
            conns,
            channels,
            chan,
            home,
            metrics: ShardMetrics::default(),
            queues: QueuePool::default(),
            rec,
            clients,
        }
    }

    /// Publishes `n` messages at the home (encoding each frame once; not measured).
    fn publish(&mut self, n: usize) -> Vec<HistoryEntry> {
        (0..n)
            .map(|_| {
                let data =
                    format!("{{\"seq\":{},\"text\":\"the same bytes for every subscriber\"}}", self.home.offset + 1);
                self.home.publish(data.as_bytes(), 0, &LIMITS).0
            })
            .collect()
    }

    /// Appends `entries` to the local log and flushes every connection; returns how many flushes completed
    /// (`Flushed::Done`). This is the measured region.
    fn deliver(&mut self, entries: &[HistoryEntry]) -> usize {
        let ch = &mut self.channels[self.chan];
        for e in entries {
            // Timed like a publish (the latency is recorded per delivery, in the measured region).
            assert!(ch.append(e.offset, &e.frame, self.rec.stamp()), "offset {} was not appended", e.offset);
        }
        let mut done = 0;
        for (_, conn) in self.conns.iter_mut() {
            if flush_conn(conn, &mut self.channels, &mut self.queues, &self.metrics, &mut self.rec) == Flushed::Done {
                done += 1;
            }
        }
        done
    }

    /// Checks the log shares the published frames, every socket got exactly those bytes, and every cursor
    /// moved past them; then trims the log (as the flush pass does).
    fn verify(&mut self, entries: &[HistoryEntry]) {
        let ch = &self.channels[self.chan];
        for e in entries {
            let logged = ch.log.iter().find(|l| l.offset == e.offset).expect("entry in the log");
            assert_eq!(logged.frame.as_ptr(), e.frame.as_ptr(), "offset {}: the log holds a copy", e.offset);
            assert_eq!(logged.frame.len(), e.frame.len());
        }
        // History (the last 16) shares the same frames too.
        for kept in &self.home.history {
            let e = entries.iter().find(|e| e.offset == kept.offset).expect("history holds this round's entries");
            assert_eq!(kept.frame.as_ptr(), e.frame.as_ptr(), "offset {}: history holds a copy", e.offset);
        }
        let expected: Vec<u8> = entries.iter().flat_map(|e| e.frame.iter().copied()).collect();
        let mut got = vec![0u8; expected.len()];
        for (i, client) in self.clients.iter_mut().enumerate() {
            client.read_exact(&mut got).unwrap_or_else(|e| panic!("subscriber {i}: reading the frames: {e}"));
            assert!(got == expected, "subscriber {i} received other bytes than the published frames");
        }
        for (i, conn) in self.conns.iter() {
            assert!(conn.outq.is_empty(), "subscriber {i}: bytes left queued");
            let slot = conn.subs[0].slot as usize;
            assert_eq!(ch.subs[slot].cursor, ch.end(), "subscriber {i}: cursor not at the end");
        }
        self.channels[self.chan].trim();
        assert!(self.channels[self.chan].log.is_empty());
    }

    fn frames_out(&self) -> u64 {
        self.metrics.frames_out_total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn delivery_allocates_nothing_and_copies_nothing() {
    raise_nofile_limit();
    // The counter sees allocations of this thread.
    let (v, n) = allocations(|| Vec::<u64>::with_capacity(4));
    assert_eq!((n, v.capacity() >= 4), (1, true));
    {
        let mut s = Setup::new();

        // Warm-up: the log's deque grows to 64 entries; trimming keeps a capacity of up to 64.
        let entries = s.publish(64);
        let (done, warmup) = allocations(|| s.deliver(&entries));
        assert_eq!(done, SUBSCRIBERS);
        assert!(warmup > 0, "the first append grows the log's deque: the counter must see it");
        s.verify(&entries);

        // A burst of 64 messages to 1000 subscribers: append + flush allocate nothing.
        for round in 0..3 {
            let entries = s.publish(64);
            let before = s.frames_out();
            let (done, allocs) = allocations(|| s.deliver(&entries));
            assert_eq!(done, SUBSCRIBERS, "round {round}: some sockets did not take everything");
            assert_eq!(allocs, 0, "round {round}: {allocs} allocations for 64 x {SUBSCRIBERS} deliveries");
            assert_eq!(s.frames_out() - before, 64 * SUBSCRIBERS as u64);
            assert_eq!(s.rec.latency.count(), 64 * SUBSCRIBERS as u64 * (round + 2), "one latency per delivery");
            s.verify(&entries);
        }

        // A burst of 100: the flush still allocates nothing; only the log's deque grows past the capacity
        // it keeps between passes (amortised per publish, not per delivery), a few times at most.
        let entries = s.publish(100);
        let ((), appends) = allocations(|| {
            let ch = &mut s.channels[s.chan];
            for e in &entries {
                assert!(ch.append(e.offset, &e.frame, s.rec.stamp()));
            }
        });
        let (done, flush_allocs) = allocations(|| {
            let mut done = 0;
            for (_, conn) in s.conns.iter_mut() {
                if flush_conn(conn, &mut s.channels, &mut s.queues, &s.metrics, &mut s.rec) == Flushed::Done {
                    done += 1;
                }
            }
            done
        });
        assert_eq!(done, SUBSCRIBERS);
        assert_eq!(flush_allocs, 0, "{flush_allocs} allocations flushing 100 x {SUBSCRIBERS} deliveries");
        assert!((1..=2).contains(&appends), "{appends} allocations appending 100 frames to the log");
        s.verify(&entries);
    }
}
