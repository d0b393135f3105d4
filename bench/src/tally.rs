//! Raw counts of one thread, process or run: what the event loops counted, mergeable, and shipped from
//! worker processes to the parent as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hist::Hist;
use crate::load::ThreadLoad;
use crate::tls::TlsInfo;

/// Counters and histograms of a run (or of one thread or worker of it).
///
/// Message accounting is by the window: every message counted was scheduled inside it. A message that
/// arrives before the window ends counts in `received` (and `latency`), one that arrives in the grace
/// period in `late` (and `late_latency`); a copy of one already received counts only in `duplicates`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Tally {
    /// Connections attempted in the connect phase.
    pub attempted: u64,
    /// Connections that got their `101 Switching Protocols`.
    pub established: u64,
    /// Connections ready for the window (established and, for throng subscribers, subscribed).
    pub ready: u64,
    /// Ready connections that receive broadcast deliveries (the multiplier of expected deliveries).
    pub ready_receivers: u64,
    /// Connections that failed before becoming ready.
    pub failed: u64,
    /// Failures by kind (`refused`, `timeout`, `status_503`, `reset`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Ready connections that were closed before the end of the run.
    pub dropped: u64,
    /// Why they were closed (`eof`, `close_1001`, `reset`, ...).
    pub drop_reasons: BTreeMap<String, u64>,
    /// Connections still open at the end of the window.
    pub held: u64,
    /// TCP connect + upgrade latency.
    pub connect_lat: Hist,
    /// Messages sent in the window.
    pub sent: u64,
    /// Messages scheduled in the window but not sent: the connection's unsent backlog was over its bound,
    /// or the sending connection was not open. They are lost messages.
    pub skipped: u64,
    /// Distinct stamped messages that arrived before the end of the window (echoes or deliveries).
    pub received: u64,
    /// Distinct stamped messages that arrived after the window, in the grace period.
    pub late: u64,
    /// Copies of messages already received (not counted in `received` or `late`).
    pub duplicates: u64,
    /// Messages too far behind their sender's newest to tell a late one from a copy (counted as neither).
    pub stale: u64,
    /// Sequence numbers skipped in a sender's sequence and still missing at the end of the grace period.
    pub gaps: u64,
    /// Messages that arrived after a later one of the same sender (they fill a gap).
    pub reordered: u64,
    /// Text messages that carried no readable stamp (or named an unknown publisher).
    pub unparsed: u64,
    /// v1 `error` replies received.
    pub v1_errors: u64,
    /// Sends skipped because the connection's unsent backlog was over its bound (part of `skipped`).
    pub backpressured: u64,
    /// Scheduled-send-to-receive latency of `received` (echo round trip, or publish to delivery).
    pub latency: Hist,
    /// The same for `late` messages.
    pub late_latency: Hist,
    /// How far behind its schedule each fixed-rate send went out (the bench's own lag).
    pub send_lag: Hist,
    /// Rooms: deliveries the messages scheduled in the window should make (the members of each one's
    /// channel: the group size, or 1 for a personal channel), sent or skipped.
    pub expected_deliveries: u64,
    /// Rooms with moves (`--churn-rate`): leaves started (`unsubscribe` sent).
    pub room_leaves_started: u64,
    /// Leaves confirmed (`unsubscribed`).
    pub room_leaves: u64,
    /// Joins confirmed (`subscribed` to the next group).
    pub room_joins: u64,
    /// Moves due while none of the thread's members was free to move (each still joining or leaving).
    pub room_moves_skipped: u64,
    /// Leaves or joins refused (`error`): the member is then in no group.
    pub room_moves_refused: u64,
    /// Group messages that arrived while the member was in no group (or for offsets at or below its
    /// position): the server delivered outside the membership it confirmed.
    pub room_strays: u64,
    /// Rooms with `--reconnect-rate`: connections dropped to reconnect.
    pub room_reconnects_started: u64,
    /// Reconnected: upgraded again and both subscriptions confirmed.
    pub room_reconnects: u64,
    /// Reconnects that failed (connect, upgrade or a subscription refused).
    pub room_reconnects_failed: u64,
    /// Connect to both `subscribed` of a reconnect.
    pub room_reconnect_lat: Hist,
    /// `unsubscribe` to `unsubscribed`, the leave latency.
    pub room_leave_lat: Hist,
    /// `subscribe` to `subscribed` of a move's join.
    pub room_join_lat: Hist,
    /// Per group: the offset in the newest `published` reply to a publish to it (merged by the maximum);
    /// a membership still open at the end expects every offset after its position up to this one.
    pub room_final: Vec<u64>,
    /// Per group: memberships still open at the end (confirmed, not left).
    pub room_open: Vec<u64>,
    /// Per group: the sum of their positions (the `subscribed` offsets).
    pub room_open_from: Vec<u64>,
    /// Churn connections started.
    pub churn_opened: u64,
    /// Churn connections that completed connect, upgrade (subscribe) and close.
    pub churn_completed: u64,
    /// Churn connections that failed.
    pub churn_failed: u64,
    /// Churn handshake latency (connect + upgrade, + subscribe for throng).
    pub churn_lat: Hist,
    /// This bench's CPU time during the window, nanoseconds (filled per process).
    pub cpu_window_ns: u64,
    /// This bench's CPU time from the start of the window to the end of the grace period.
    pub cpu_total_ns: u64,
    /// Nanoseconds from the first connection attempt until every initial connection was resolved (max).
    pub connect_span_ns: u64,
    /// Each event-loop thread's load over the window, sampled in short intervals.
    pub threads: Vec<ThreadLoad>,
    /// Tokens minted before the connect ramp (every connection's, and the churn connections' foreseen).
    pub tokens_minted: u64,
    /// CPU time the threads spent minting them, nanoseconds (summed).
    pub token_mint_cpu_ns: u64,
    /// Wall-clock time of the longest thread's minting, nanoseconds (max): how long the ramp waited.
    pub token_mint_wall_ns: u64,
    /// Tokens minted during the window because the churn connections outran the foreseen count (their
    /// signing time is then part of the churn handshakes).
    pub tokens_minted_in_window: u64,
    /// The threads' CPU time from the start of the ramp until their initial connections were resolved, ns
    /// (summed): what connecting cost the bench (TLS handshakes, token-free upgrades, ...).
    pub ramp_cpu_ns: u64,
    /// What the first TLS handshake to complete negotiated (`wss://`).
    pub tls: Option<TlsInfo>,
    /// TLS handshakes completed (churn connections included).
    pub tls_handshakes: u64,
    /// Those that resumed a session.
    pub tls_resumed: u64,
    /// TLS handshake time: TCP connected to handshake done.
    pub tls_handshake: Hist,
    /// Client CPU time per TLS handshake (the thread's CPU time inside rustls).
    pub tls_handshake_cpu: Hist,
    /// The first TLS failure's message (`invalid peer certificate: UnknownIssuer`, ...).
    pub tls_error: Option<String>,
    /// api-publish: requests sent in the window.
    pub api_requests: u64,
    /// api-publish: `200` responses carrying an offset for every message of their request, in the window.
    pub api_ok: u64,
    /// The same, arrived in the grace period.
    pub api_ok_late: u64,
    /// api-publish: messages published (an offset received) in the window.
    pub api_published: u64,
    /// The same, in the grace period.
    pub api_published_late: u64,
    /// api-publish: messages refused inside a `200` (a batch's per-message `error` entries).
    pub api_message_errors: u64,
    /// api-publish: failed requests by HTTP status (`401`, `503`, ...) or kind (`200_incomplete`: a `200`
    /// short of offsets; `closed`: in flight when the server closed the connection; `unanswered`: still
    /// waiting at the end of the grace period; `bad_response`, `unexpected_response`).
    pub api_errors: BTreeMap<String, u64>,
    /// Several `--url`: the initial connections that became ready, per URL (index as in `Plan::urls`; empty
    /// with one URL).
    pub ready_per_url: Vec<u64>,
    /// api-publish: request sent to `200` parsed, for the responses in the window.
    pub api_latency: Hist,
    /// The same for the responses in the grace period.
    pub api_late_latency: Hist,
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

/// Merges `b` into `a` element by element with `f`, `a` growing to `b`'s length.
fn merge_vec(a: &mut Vec<u64>, b: &[u64], f: impl Fn(u64, u64) -> u64) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, &y) in a.iter_mut().zip(b) {
        *x = f(*x, y);
    }
}

impl Tally {
    /// Rooms with moves: the deliveries the memberships still open at the end expect, each every group
    /// offset after its position up to the group's last published offset (or the newest it received).
    pub fn room_open_expected(&self) -> u64 {
        let mut e = 0;
        for (k, (&n, &from)) in self.room_open.iter().zip(&self.room_open_from).enumerate() {
            let last = self.room_final.get(k).copied().unwrap_or(0);
            e += (n * last).saturating_sub(from);
        }
        e
    }

    /// Counts one error of `kind`.
    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    /// Counts one failed API request of `kind` (allocates only the first time a kind is seen).
    pub fn api_error(&mut self, kind: &str, n: u64) {
        match self.api_errors.get_mut(kind) {
            Some(v) => *v += n,
            None => {
                self.api_errors.insert(kind.to_string(), n);
            }
        }
    }

    /// Adds `o` into `self` (times: the maximum).
    pub fn merge(&mut self, o: &Tally) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.ready += o.ready;
        self.ready_receivers += o.ready_receivers;
        self.failed += o.failed;
        add_map(&mut self.errors, &o.errors);
        self.dropped += o.dropped;
        add_map(&mut self.drop_reasons, &o.drop_reasons);
        self.held += o.held;
        self.connect_lat.merge(&o.connect_lat);
        self.sent += o.sent;
        self.skipped += o.skipped;
        self.received += o.received;
        self.late += o.late;
        self.duplicates += o.duplicates;
        self.stale += o.stale;
        self.gaps += o.gaps;
        self.reordered += o.reordered;
        self.unparsed += o.unparsed;
        self.v1_errors += o.v1_errors;
        self.backpressured += o.backpressured;
        self.latency.merge(&o.latency);
        self.late_latency.merge(&o.late_latency);
        self.send_lag.merge(&o.send_lag);
        self.expected_deliveries += o.expected_deliveries;
        self.room_leaves_started += o.room_leaves_started;
        self.room_leaves += o.room_leaves;
        self.room_joins += o.room_joins;
        self.room_moves_skipped += o.room_moves_skipped;
        self.room_moves_refused += o.room_moves_refused;
        self.room_strays += o.room_strays;
        self.room_leave_lat.merge(&o.room_leave_lat);
        self.room_reconnects_started += o.room_reconnects_started;
        self.room_reconnects += o.room_reconnects;
        self.room_reconnects_failed += o.room_reconnects_failed;
        self.room_reconnect_lat.merge(&o.room_reconnect_lat);
        self.room_join_lat.merge(&o.room_join_lat);
        merge_vec(&mut self.room_final, &o.room_final, u64::max);
        merge_vec(&mut self.room_open, &o.room_open, |a, b| a + b);
        merge_vec(&mut self.room_open_from, &o.room_open_from, |a, b| a + b);
        self.churn_opened += o.churn_opened;
        self.churn_completed += o.churn_completed;
        self.churn_failed += o.churn_failed;
        self.churn_lat.merge(&o.churn_lat);
        self.cpu_window_ns += o.cpu_window_ns;
        self.cpu_total_ns += o.cpu_total_ns;
        self.connect_span_ns = self.connect_span_ns.max(o.connect_span_ns);
        self.threads.extend_from_slice(&o.threads);
        self.tokens_minted += o.tokens_minted;
        self.token_mint_cpu_ns += o.token_mint_cpu_ns;
        self.token_mint_wall_ns = self.token_mint_wall_ns.max(o.token_mint_wall_ns);
        self.tokens_minted_in_window += o.tokens_minted_in_window;
        self.ramp_cpu_ns += o.ramp_cpu_ns;
        if self.tls.is_none() {
            self.tls.clone_from(&o.tls);
        }
        self.tls_handshakes += o.tls_handshakes;
        self.tls_resumed += o.tls_resumed;
        self.tls_handshake.merge(&o.tls_handshake);
        self.tls_handshake_cpu.merge(&o.tls_handshake_cpu);
        if self.tls_error.is_none() {
            self.tls_error.clone_from(&o.tls_error);
        }
        self.api_requests += o.api_requests;
        self.api_ok += o.api_ok;
        self.api_ok_late += o.api_ok_late;
        self.api_published += o.api_published;
        self.api_published_late += o.api_published_late;
        self.api_message_errors += o.api_message_errors;
        add_map(&mut self.api_errors, &o.api_errors);
        self.api_latency.merge(&o.api_latency);
        self.api_late_latency.merge(&o.api_late_latency);
        if self.ready_per_url.len() < o.ready_per_url.len() {
            self.ready_per_url.resize(o.ready_per_url.len(), 0);
        }
        for (a, b) in self.ready_per_url.iter_mut().zip(&o.ready_per_url) {
            *a += b;
        }
    }
}
