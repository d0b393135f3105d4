//! The shard-wide history budget: `max_history_bytes` over all the channels a shard is home of, oldest
//! message of the shard dropped first.
//!
//! Every message kept in some channel's history is recorded here in publish order (home index, epoch,
//! offset, bytes: 24 bytes a record). When the total passes the budget, records are taken from the front:
//! a record whose message is still at the front of its channel's history evicts it; one whose message the
//! channel already dropped by its own bounds (count, age, bytes) is stale and skipped. Stale records are
//! compacted away once they outnumber the live ones, so the queue stays within twice the messages kept.
//!
//! An evicted message simply leaves history, as if its channel's own bounds had dropped it: `recovered`
//! stays correct because recovery checks that every missed offset is still there.

use std::collections::VecDeque;

use slab::Slab;

use super::home::{Freed, HomeChannel};

#[derive(Clone, Copy, Debug)]
struct Rec {
    home: u32,
    bytes: u32,
    offset: u64,
    epoch: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct HistoryBudget {
    max: usize,
    total: usize,
    live: usize,
    fifo: VecDeque<Rec>,
}

impl HistoryBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { max, total: 0, live: 0, fifo: VecDeque::new() }
    }

    /// Bytes of history held now.
    pub fn total(&self) -> usize {
        self.total
    }

    /// A message was kept in the history of `homes[home]`.
    pub fn kept(&mut self, home: usize, h: &HomeChannel, offset: u64, bytes: usize) {
        self.total += bytes;
        self.live += 1;
        self.fifo.push_back(Rec { home: home as u32, bytes: bytes as u32, offset, epoch: h.epoch });
    }

    /// A channel dropped messages by its own bounds.
    pub fn freed(&mut self, f: Freed) {
        self.total -= f.bytes;
        self.live -= f.entries;
    }

    /// Evicts the shard's oldest messages until the total is within the budget. Returns how many went.
    pub fn enforce(&mut self, homes: &mut Slab<HomeChannel>) -> usize {
        let mut evicted = 0;
        while self.total > self.max {
            let Some(r) = self.fifo.pop_front() else { break };
            let Some(h) = homes.get_mut(r.home as usize).filter(|h| h.epoch == r.epoch) else { continue };
            if h.history.front().is_some_and(|e| e.offset == r.offset) {
                h.pop_oldest();
                self.total -= r.bytes as usize;
                self.live -= 1;
                evicted += 1;
            }
        }
        if self.fifo.len() > 2 * self.live + 1024 {
            self.fifo.retain(|r| {
                homes.get(r.home as usize).is_some_and(|h| {
                    h.epoch == r.epoch && h.history.front().is_some_and(|first| first.offset <= r.offset)
                })
            });
        }
        evicted
    }

    /// Records queued (live and stale), for tests.
    pub fn records(&self) -> usize {
        self.fifo.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::home::HistoryLimits;

    /// Test homes' bounds, by `HomeChannel::limits`: that many messages.
    fn limits(size: u32) -> HistoryLimits {
        HistoryLimits { size: size as usize, ttl_ticks: 1000, bytes: 1 << 20 }
    }

    fn home(homes: &mut Slab<HomeChannel>, name: &str, epoch: u64, size: u32) -> usize {
        homes.insert(HomeChannel::new(name, epoch, size))
    }

    fn publish(b: &mut HistoryBudget, homes: &mut Slab<HomeChannel>, idx: usize, data: &[u8]) {
        let l = limits(homes[idx].limits);
        let (e, kept, freed) = homes[idx].publish(data, 0, &l);
        b.freed(freed);
        if kept {
            b.kept(idx, &homes[idx], e.offset, e.frame.len());
        }
        b.enforce(homes);
    }

    #[test]
    fn oldest_of_the_shard_goes_first() {
        let mut homes = Slab::new();
        let a = home(&mut homes, "a", 1, 100);
        let c = home(&mut homes, "c", 2, 100);
        let data = [b'1'; 80];
        let frame = homes[a].publish(&data, 0, &limits(100)).0.frame.len();
        // Start over with a budget of three frames.
        homes[a].pop_oldest();
        let mut b = HistoryBudget::new(3 * frame);
        publish(&mut b, &mut homes, a, &data);
        publish(&mut b, &mut homes, c, &data);
        publish(&mut b, &mut homes, a, &data);
        publish(&mut b, &mut homes, c, &data);
        // The first message (of `a`) went.
        assert_eq!(homes[a].history.iter().map(|e| e.offset).collect::<Vec<_>>(), [3]);
        assert_eq!(homes[c].history.iter().map(|e| e.offset).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.total(), 3 * frame);
        publish(&mut b, &mut homes, c, &data);
        assert_eq!(homes[c].history.iter().map(|e| e.offset).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(b.total(), 3 * frame);
    }

    /// Messages a channel drops itself leave stale records, which are skipped and compacted: the queue
    /// stays proportional to what is kept, and an old record never evicts a newer incarnation's message.
    #[test]
    fn stale_records_stay_bounded() {
        let mut homes = Slab::new();
        let quiet = home(&mut homes, "quiet", 1, 10);
        let busy = home(&mut homes, "busy", 2, 2);
        let mut b = HistoryBudget::new(1 << 30);
        publish(&mut b, &mut homes, quiet, b"1");
        for _ in 0..100_000 {
            publish(&mut b, &mut homes, busy, b"1");
        }
        assert!(b.records() <= 2 * 3 + 1024, "{} records for 3 messages kept", b.records());
        assert_eq!(b.total(), homes.iter().map(|(_, h)| h.history_bytes).sum::<usize>());
        // A channel forgotten and created again in the same slot gets a new epoch: the old records are stale.
        let frame = homes[quiet].history[0].frame.len();
        homes[quiet].pop_oldest();
        b.freed(Freed { entries: 1, bytes: frame });
        homes.remove(quiet);
        let again = home(&mut homes, "quiet", 3, 10);
        assert_eq!(again, quiet);
        publish(&mut b, &mut homes, again, b"1");
        let mut tight = HistoryBudget::new(0);
        std::mem::swap(&mut tight.fifo, &mut b.fifo);
        tight.total = b.total;
        tight.live = b.live;
        tight.enforce(&mut homes);
        assert!(homes[again].history.is_empty() && homes[busy].history.is_empty());
        assert_eq!(tight.total(), 0);
    }
}
