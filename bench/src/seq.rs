//! Per-sender sequence tracking on a receiver: tells a new message from a late one (it fills a hole left
//! earlier: reordered) and from a copy (duplicate), and counts the holes still open at the end (gaps).
//!
//! The in-order case costs one compare and one increment in 16 bytes per (receiver, sender) pair; the hole
//! list is allocated only once a message goes missing, and bounded: past [`MAX_HOLES`] open ranges the oldest
//! is given up (it stays counted as missing) and arrivals below it are [`Arrival::Stale`].

/// Open hole ranges kept per (receiver, sender) at most.
pub const MAX_HOLES: usize = 64;

/// What an arriving sequence number is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one, or one past a hole (the hole is remembered).
    New,
    /// It fills a hole: it arrived after a later message of the same sender.
    Reordered,
    /// Already received.
    Duplicate,
    /// Below the holes given up: too old to tell a late message from a copy (counted as neither).
    Stale,
}

#[derive(Clone, Debug, Default)]
struct Holes {
    /// Missing sequence numbers, half-open ranges, ascending, all below `SeqTrack::next`.
    ranges: Vec<(u64, u64)>,
    /// Below this nothing is tracked any more.
    floor: u64,
    /// Sequence numbers in ranges given up.
    given_up: u64,
}

impl Holes {
    fn give_up_oldest(&mut self) {
        if !self.ranges.is_empty() {
            let (lo, hi) = self.ranges.remove(0);
            self.given_up += hi - lo;
            self.floor = hi;
        }
    }
}

/// The sequence state of one sender as seen by one receiver.
#[derive(Clone, Debug, Default)]
pub struct SeqTrack {
    /// One past the highest sequence number received.
    next: u64,
    /// Missing ones below `next`, once there are any.
    holes: Option<Box<Holes>>,
}

impl SeqTrack {
    /// Records the arrival of `seq` and says what it was.
    #[inline]
    pub fn arrive(&mut self, seq: u64) -> Arrival {
        if seq == self.next {
            self.next += 1;
            return Arrival::New;
        }
        self.arrive_slow(seq)
    }

    #[cold]
    fn arrive_slow(&mut self, seq: u64) -> Arrival {
        let next = self.next;
        let h = self.holes.get_or_insert_with(Box::default);
        if seq > next {
            if h.ranges.len() >= MAX_HOLES {
                h.give_up_oldest();
            }
            h.ranges.push((next, seq));
            self.next = seq + 1;
            return Arrival::New;
        }
        if seq < h.floor {
            return Arrival::Stale;
        }
        // The first range that ends above `seq`: the only one that can hold it.
        let i = h.ranges.partition_point(|&(_, hi)| hi <= seq);
        let Some(&(lo, hi)) = h.ranges.get(i) else { return Arrival::Duplicate };
        if lo > seq {
            return Arrival::Duplicate;
        }
        if hi - lo == 1 {
            h.ranges.remove(i);
        } else if lo == seq {
            h.ranges[i].0 += 1;
        } else if hi == seq + 1 {
            h.ranges[i].1 -= 1;
        } else {
            h.ranges[i].1 = seq;
            h.ranges.insert(i + 1, (seq + 1, hi));
            if h.ranges.len() > MAX_HOLES {
                h.give_up_oldest();
            }
        }
        Arrival::Reordered
    }

    /// Sequence numbers below the highest received that never arrived (holes still open, or given up).
    pub fn missing(&self) -> u64 {
        self.holes.as_ref().map_or(0, |h| h.given_up + h.ranges.iter().map(|&(lo, hi)| hi - lo).sum::<u64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_gaps_late_and_copies() {
        let mut t = SeqTrack::default();
        let mut kinds = Vec::new();
        for s in [0, 1, 3, 4, 2, 2, 7, 5, 0, 9] {
            kinds.push(t.arrive(s));
        }
        use Arrival::*;
        assert_eq!(kinds, vec![New, New, New, New, Reordered, Duplicate, New, Reordered, Duplicate, New]);
        // 6 and 8 never came.
        assert_eq!(t.missing(), 2);
        assert_eq!(t.arrive(6), Reordered);
        assert_eq!(t.arrive(8), Reordered);
        assert_eq!((t.missing(), t.arrive(8)), (0, Duplicate));
    }

    #[test]
    fn fills_the_middle_of_a_hole() {
        let mut t = SeqTrack::default();
        assert_eq!(t.arrive(10), Arrival::New);
        assert_eq!(t.missing(), 10);
        assert_eq!(t.arrive(5), Arrival::Reordered);
        assert_eq!(t.arrive(5), Arrival::Duplicate);
        assert_eq!(t.arrive(0), Arrival::Reordered);
        assert_eq!(t.arrive(9), Arrival::Reordered);
        assert_eq!(t.missing(), 7);
        for s in [1, 2, 3, 4, 6, 7, 8] {
            assert_eq!(t.arrive(s), Arrival::Reordered, "{s}");
        }
        assert_eq!(t.missing(), 0);
    }

    #[test]
    fn holes_are_bounded() {
        let mut t = SeqTrack::default();
        // Every other message lost: one hole per message.
        for k in 0..1000u64 {
            assert_eq!(t.arrive(2 * k + 1), Arrival::New);
        }
        assert_eq!(t.missing(), 1000);
        assert!(t.holes.as_ref().unwrap().ranges.len() <= MAX_HOLES);
        assert_eq!(t.arrive(0), Arrival::Stale);
        assert_eq!(t.arrive(1998), Arrival::Reordered);
        assert_eq!(t.missing(), 999);
    }
}
