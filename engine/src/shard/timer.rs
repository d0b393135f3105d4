//! Hierarchical timer wheel for per-shard connection timers.
//!
//! One [`TimerWheel`] lives on each shard and holds every handshake timeout,
//! heartbeat ping, idle timeout and token expiry of that shard's connections
//! (10k–100k timers). It is pure data: no IO, no clock, no runtime. Time is an
//! abstract tick count (`u64`) passed in by the caller; the engine decides what
//! a tick is worth (e.g. 100 ms).
//!
//! # Layout
//!
//! * **Levels.** [`LEVELS`] = 11 levels of 64 slots each. Level `L` slot `s`
//!   covers `64^L` ticks, so level 0 has 1-tick slots, level 1 has 64-tick
//!   slots, and so on. Eleven levels cover all 64 bits of a `u64` tick
//!   (6 × 11 = 66 ≥ 64), which means there is no "overflow" bucket and no
//!   wrap-around case: *any* `u64` deadline, up to `u64::MAX`, has an exact
//!   place. (Six levels would be plenty in practice; the five extra levels
//!   cost 5 × 64 × 4 bytes of list heads per wheel and nothing per timer.)
//! * **Placement** (as in tokio's wheel). A timer with deadline `d` is stored
//!   at the level of the highest 6-bit digit in which `d` differs from the
//!   wheel's current time `now`, in the slot given by `d`'s digit at that
//!   level. Consequently every timer at level `L` shares all digits above `L`
//!   with `now` and has a strictly larger digit at `L`. So within a level the
//!   lowest occupied slot is always the earliest one (no rotation needed), and
//!   every timer at level `L` is due before every timer at level `L + 1`.
//!   A timer whose deadline is already `<= now` goes on a separate *due* list.
//! * **Entries** live in a [`slab::Slab`] and are threaded into intrusive,
//!   doubly linked lists (one per slot, plus the due list) through `u32`
//!   `prev`/`next` indices. The list an entry is on is *not stored*: it is a
//!   pure function of `(now, deadline)` (see the invariant above), which keeps
//!   the entry at 20 bytes + the payload.
//! * **Occupancy.** One `u64` bitmap per level marks its non-empty slots, so
//!   finding the next slot to process is a `trailing_zeros` per level.
//! * **Keys.** A [`TimerKey`] is the slab index plus a generation number drawn
//!   from a per-wheel counter at insert time. A key whose timer fired or was
//!   cancelled is rejected (`cancel` → `None`, `reset` → `false`) even after its
//!   slab slot has been reused by another timer.
//!
//! # Processing
//!
//! [`TimerWheel::poll`] looks at the lowest non-empty level and its lowest
//! occupied slot; if that slot's start tick is `<= now` the wheel's time jumps
//! to the slot start and the slot is emptied: each entry is re-placed relative
//! to the new time, which moves it to a lower level ("cascading") or onto the
//! due list when its deadline has been reached. Due entries are returned one
//! per call. Only occupied slots are visited, so jumping far ahead costs
//! nothing for the empty stretch.
//!
//! # Complexity
//!
//! | operation | cost |
//! | --- | --- |
//! | [`insert`](TimerWheel::insert), [`cancel`](TimerWheel::cancel), [`reset`](TimerWheel::reset) | O(1) |
//! | [`poll`](TimerWheel::poll) | O(1) amortised per fired timer; a timer is cascaded at most once per level it passes through (≤ 10 times, typically 1–3) |
//! | [`next_deadline`](TimerWheel::next_deadline) | O(levels) bitmap checks, no list walks |
//!
//! No allocation happens per insert once the slab has grown to the peak number
//! of live timers ([`TimerWheel::with_capacity`] pre-sizes it).
//!
//! # Memory
//!
//! Per timer: the private `Entry<T>` is `deadline: u64`, `prev: u32`,
//! `next: u32`, `generation: NonZeroU32` and the payload, i.e. 20 bytes +
//! `size_of::<T>()` rounded up to the alignment: **24 bytes for `T` of up to
//! 4 bytes, 32 bytes for an 8-byte `T`**. The slab's `Vacant(usize)` /
//! `Occupied(Entry)` enum adds nothing because the `NonZeroU32` generation
//! gives rustc a niche for the discriminant (asserted in the tests).
//! Per wheel: 705 `u32` list heads + 11 `u64` bitmaps ≈ 2.9 KiB.
//!
//! # Ordering guarantees
//!
//! Every timer whose deadline is `<= now` is returned exactly once by the
//! `poll(now)` calls, never before its deadline, and at the first `poll`
//! whose `now` reaches it. Timers are returned in deadline order, with one
//! relaxation: a timer whose deadline was already `<= now()` when it was
//! inserted or reset is treated as due at `now()` and comes out (in no
//! particular order among such timers) before anything still in the wheel.
//! Timers with equal deadlines come out in unspecified order.
//!
//! Time never goes backwards: a `now` smaller than [`TimerWheel::now`] is
//! treated as `now()`.

use std::fmt;
use std::num::NonZeroU32;

use slab::Slab;

/// log2 of the number of slots per level.
const SLOT_BITS: u32 = 6;
/// Slots per level; 64 so that one `u64` bitmap tracks a whole level.
const SLOTS: usize = 1 << SLOT_BITS;
/// Mask of the slot digit within a tick value.
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Number of levels: enough 6-bit digits (11 × 6 = 66) to cover every `u64`
/// tick, so no deadline ever needs clamping or an overflow list.
pub const LEVELS: usize = 11;
/// List id of the due list; lists `0..DUE` are `level * SLOTS + slot`.
const DUE: usize = LEVELS * SLOTS;
/// Null link / empty list head. Slab indices are kept below it.
const NIL: u32 = u32::MAX;

/// Handle to a timer in a [`TimerWheel`], returned by
/// [`insert`](TimerWheel::insert).
///
/// It is 8 bytes and `Copy`; `Option<TimerKey>` is also 8 bytes (the
/// generation is non-zero), so a connection can cheaply hold one per timer
/// kind. A key stays valid until its timer fires or is cancelled; after that
/// every operation on it is rejected, even if the wheel has reused the
/// underlying storage for another timer. (Generations come from a 32-bit
/// per-wheel counter, so a stale key could only alias a live timer if it were
/// kept across exactly a multiple of 2^32 inserts and the same slot reused.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    /// Slab index of the entry.
    index: u32,
    /// Must match the entry's generation; detects stale keys after the slab
    /// slot was freed and reused.
    generation: NonZeroU32,
}

/// One timer. Kept small because there is one per connection per timer kind.
struct Entry<T> {
    /// Absolute deadline in ticks. Together with the wheel's `elapsed` it
    /// also determines which list the entry is on, so that is not stored.
    deadline: u64,
    /// Previous entry in the same list, or `NIL` if this is the head; makes
    /// unlinking O(1).
    prev: u32,
    /// Next entry in the same list, or `NIL`.
    next: u32,
    /// Copied into the entry's key; a key with another generation is stale.
    /// Non-zero so the slab's vacant/occupied enum can use it as a niche.
    generation: NonZeroU32,
    /// The caller's payload.
    value: T,
}

/// A hierarchical timer wheel keyed by [`TimerKey`] and carrying a `T` per
/// timer. See the [module docs](self) for the design.
///
/// ```ignore
/// let mut wheel = TimerWheel::new(0);
/// let key = wheel.insert(10, "idle");
/// assert!(wheel.poll(9).is_none());
/// assert_eq!(wheel.poll(10), Some((key, "idle")));
/// ```
pub struct TimerWheel<T> {
    /// Timer storage; slab indices are the `u32` links and key indices.
    entries: Slab<Entry<T>>,
    /// Head of each list: `level * SLOTS + slot` for wheel slots, `DUE` for
    /// the due list. `NIL` when empty.
    heads: [u32; DUE + 1],
    /// Bit `s` of `occupied[L]` is set iff list `L * SLOTS + s` is non-empty,
    /// so the next slot to process is found without scanning heads.
    occupied: [u64; LEVELS],
    /// The wheel's current time: every wheel entry's deadline is greater,
    /// every due-list entry's deadline is `<=`. Only ever increases.
    elapsed: u64,
    /// A lower bound of the deadlines on the due list (exact unless a due
    /// entry was cancelled or reset since); lets `next_deadline` stay O(1)
    /// and never report a time later than a due timer's deadline.
    due_min: u64,
    /// Generation for the next insert; wraps around skipping zero.
    next_generation: NonZeroU32,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now", &self.elapsed)
            .field("len", &self.len())
            .field("next_deadline", &self.next_deadline())
            .finish_non_exhaustive()
    }
}

/// Level at which a timer due at `when` is placed when the time is `elapsed`
/// (`when > elapsed`): the index of the highest 6-bit digit where they differ.
#[inline]
fn level_for(elapsed: u64, when: u64) -> usize {
    let masked = (elapsed ^ when) | SLOT_MASK;
    let significant = 63 - masked.leading_zeros();
    (significant / SLOT_BITS) as usize
}

/// The 6-bit digit of `when` at `level`.
#[inline]
fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (level as u32 * SLOT_BITS)) & SLOT_MASK) as usize
}

/// The list an entry due at `when` belongs on when the time is `elapsed`.
#[inline]
fn list_for(elapsed: u64, when: u64) -> usize {
    if when <= elapsed {
        DUE
    } else {
        let level = level_for(elapsed, when);
        level * SLOTS + slot_for(when, level)
    }
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose current time is `now` ticks.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// Creates an empty wheel whose current time is `now` ticks, with room for
    /// `capacity` timers before the entry storage has to grow.
    pub fn with_capacity(now: u64, capacity: usize) -> Self {
        TimerWheel {
            entries: Slab::with_capacity(capacity),
            heads: [NIL; DUE + 1],
            occupied: [0; LEVELS],
            elapsed: now,
            due_min: now,
            next_generation: NonZeroU32::MIN,
        }
    }

    /// Reserves room for at least `additional` more timers.
    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve(additional);
    }

    /// Number of pending timers (including due ones not yet returned by
    /// [`poll`](Self::poll)).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` if no timers are pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The wheel's current time in ticks: the `now` it was created with or
    /// the furthest point [`poll`](Self::poll) has processed up to. Inserting
    /// a deadline `<=` this makes the timer due immediately.
    pub fn now(&self) -> u64 {
        self.elapsed
    }

    /// Schedules `value` to fire at tick `deadline` and returns its key.
    ///
    /// A `deadline <= now()` makes the timer due: the next `poll` returns it,
    /// whatever `now` it is given. O(1); allocates only if the storage is full.
    ///
    /// # Panics
    ///
    /// If more than `u32::MAX - 1` timers are pending at once.
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let generation = self.next_generation;
        self.next_generation = generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        let vacant = self.entries.vacant_entry();
        let index = match u32::try_from(vacant.key()) {
            Ok(index) if index != NIL => index,
            _ => panic!("TimerWheel: too many timers (limit is u32::MAX - 1)"),
        };
        vacant.insert(Entry { deadline, prev: NIL, next: NIL, generation, value });
        self.link(index, list_for(self.elapsed, deadline));
        TimerKey { index, generation }
    }

    /// Cancels the timer and returns its value, or `None` if the key is stale
    /// (the timer already fired or was cancelled). O(1).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let deadline = self.entry(key)?.deadline;
        self.unlink(key.index, list_for(self.elapsed, deadline));
        Some(self.entries.remove(key.index as usize).value)
    }

    /// Re-arms a pending timer to fire at `deadline` instead (earlier or
    /// later), keeping its key and value. Returns `false`, changing nothing,
    /// if the key is stale. A `deadline <= now()` makes it due immediately.
    /// O(1); cheaper still when the new deadline maps to the same slot.
    pub fn reset(&mut self, key: TimerKey, deadline: u64) -> bool {
        let Some(old) = self.entry(key).map(|e| e.deadline) else {
            return false;
        };
        let old_list = list_for(self.elapsed, old);
        let new_list = list_for(self.elapsed, deadline);
        self.entries[key.index as usize].deadline = deadline;
        if old_list != new_list {
            self.unlink(key.index, old_list);
            self.link(key.index, new_list);
        } else if new_list == DUE {
            self.due_min = self.due_min.min(deadline);
        }
        true
    }

    /// `true` if the key refers to a pending timer.
    pub fn contains(&self, key: TimerKey) -> bool {
        self.entry(key).is_some()
    }

    /// The deadline of a pending timer, or `None` if the key is stale.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.entry(key).map(|e| e.deadline)
    }

    /// The value of a pending timer, or `None` if the key is stale.
    pub fn get(&self, key: TimerKey) -> Option<&T> {
        self.entry(key).map(|e| &e.value)
    }

    /// Mutable access to the value of a pending timer, or `None` if the key
    /// is stale.
    pub fn get_mut(&mut self, key: TimerKey) -> Option<&mut T> {
        self.entries.get_mut(key.index as usize).filter(|e| e.generation == key.generation).map(|e| &mut e.value)
    }

    /// A lower bound on the earliest pending deadline, or `None` if the
    /// wheel is empty.
    ///
    /// Guarantees:
    /// * it is never later than the earliest pending timer's deadline, so
    ///   sleeping until it can never make a timer late;
    /// * it is exact when that timer is due (deadline `<= now()`, then the
    ///   value is `<= now()`) or in the current 64-tick block (level 0);
    /// * otherwise it is the start of the slot holding the earliest timer,
    ///   which is `> now()`. Polling at that tick makes progress (it cascades
    ///   the slot) even if nothing fires, and the next call returns a tighter
    ///   bound, so a "sleep until `next_deadline`, then `poll`" loop reaches
    ///   any timer with at most [`LEVELS`] wake-ups, and typically 1–3.
    ///
    /// O(levels); does not walk any list.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.heads[DUE] != NIL {
            return Some(self.due_min);
        }
        self.next_expiration().map(|(_, _, start)| start)
    }

    /// Returns one timer whose deadline is `<= now`, removing it (its key
    /// becomes stale), or `None` once there is none left.
    ///
    /// Call it in a loop until it returns `None`; the wheel's time then
    /// advances to `now`. Timers come out in deadline order (see the
    /// [module docs](self#ordering-guarantees) for the exact guarantee). The
    /// caller may insert, reset or cancel timers between calls, e.g. re-arm a
    /// heartbeat from its own expiry.
    pub fn poll(&mut self, now: u64) -> Option<(TimerKey, T)> {
        loop {
            let head = self.heads[DUE];
            if head != NIL {
                self.unlink(head, DUE);
                let entry = self.entries.remove(head as usize);
                let key = TimerKey { index: head, generation: entry.generation };
                return Some((key, entry.value));
            }
            match self.next_expiration() {
                Some((level, slot, start)) if start <= now => {
                    self.elapsed = start;
                    self.process_slot(level, slot);
                }
                _ => {
                    // Nothing in the wheel is due by `now`: every occupied
                    // slot starts after `now`, so moving the time forward
                    // keeps every entry on the list `list_for` maps it to.
                    self.elapsed = self.elapsed.max(now);
                    return None;
                }
            }
        }
    }

    /// Fires every timer whose deadline is `<= now` by passing it to `fired`,
    /// in the order [`poll`](Self::poll) would return them, and returns how
    /// many fired. Use `poll` instead when the handler needs to touch the
    /// wheel (e.g. re-arm the timer).
    pub fn advance(&mut self, now: u64, mut fired: impl FnMut(TimerKey, T)) -> usize {
        let mut count = 0;
        while let Some((key, value)) = self.poll(now) {
            fired(key, value);
            count += 1;
        }
        count
    }

    /// The pending entry for `key`, if the key is not stale.
    #[inline]
    fn entry(&self, key: TimerKey) -> Option<&Entry<T>> {
        self.entries.get(key.index as usize).filter(|e| e.generation == key.generation)
    }

    /// The earliest occupied wheel slot as `(level, slot, start tick)`.
    /// By the placement invariant the lowest non-empty level holds the
    /// earliest timers, and within a level the lowest set bit is the earliest
    /// slot (all occupied slots lie after the current one, no wrap-around).
    #[inline]
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        let level = self.occupied.iter().position(|&bits| bits != 0)?;
        let slot = self.occupied[level].trailing_zeros() as usize;
        // Keep the digits of `elapsed` above this level, replace this level's
        // digit by `slot`, zero the digits below it.
        let above = (level as u32 + 1) * SLOT_BITS;
        let base = if above >= u64::BITS { 0 } else { self.elapsed >> above << above };
        let start = base | ((slot as u64) << (level as u32 * SLOT_BITS));
        debug_assert!(start > self.elapsed);
        Some((level, slot, start))
    }

    /// Empties a slot whose start tick the time has just reached, re-placing
    /// each entry relative to the new time (onto a lower level or the due
    /// list). Called only when the due list is empty.
    fn process_slot(&mut self, level: usize, slot: usize) {
        let list = level * SLOTS + slot;
        let mut index = std::mem::replace(&mut self.heads[list], NIL);
        self.occupied[level] &= !(1 << slot);
        if level == 0 {
            // A level-0 slot is a single tick: everything in it is due now.
            // Splice the whole list onto the (empty) due list.
            debug_assert_eq!(self.heads[DUE], NIL);
            self.heads[DUE] = index;
            self.due_min = self.elapsed;
            return;
        }
        while index != NIL {
            let entry = &self.entries[index as usize];
            let (next, deadline) = (entry.next, entry.deadline);
            self.link(index, list_for(self.elapsed, deadline));
            index = next;
        }
    }

    /// Pushes entry `index` onto the front of `list`.
    #[inline]
    fn link(&mut self, index: u32, list: usize) {
        let head = self.heads[list];
        let entry = &mut self.entries[index as usize];
        entry.prev = NIL;
        entry.next = head;
        let deadline = entry.deadline;
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[list] = index;
        if list == DUE {
            self.due_min = if head == NIL { deadline } else { self.due_min.min(deadline) };
        } else {
            self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
        }
    }

    /// Removes entry `index` from `list` (which it must be on).
    #[inline]
    fn unlink(&mut self, index: u32, list: usize) {
        let entry = &self.entries[index as usize];
        let (prev, next) = (entry.prev, entry.next);
        if prev == NIL {
            debug_assert_eq!(self.heads[list], index);
            self.heads[list] = next;
            if next == NIL && list != DUE {
                self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::mem::size_of;

    /// Tiny deterministic PRNG (xorshift64) so tests need no `rand`.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    impl<T> TimerWheel<T> {
        /// Walks every list and checks all structural invariants. O(n).
        fn check_invariants(&self) {
            let mut seen = 0usize;
            for list in 0..=DUE {
                let head = self.heads[list];
                if list != DUE {
                    let bit = self.occupied[list / SLOTS] >> (list % SLOTS) & 1;
                    assert_eq!(bit == 1, head != NIL, "occupancy of list {list}");
                }
                let mut prev = NIL;
                let mut index = head;
                while index != NIL {
                    let e = &self.entries[index as usize];
                    assert_eq!(e.prev, prev, "prev link in list {list}");
                    assert_eq!(list_for(self.elapsed, e.deadline), list, "entry on wrong list");
                    if list == DUE {
                        assert!(self.due_min <= e.deadline, "due_min not a lower bound");
                    }
                    seen += 1;
                    prev = index;
                    index = e.next;
                }
            }
            assert_eq!(seen, self.entries.len(), "entries not on any list");
        }
    }

    /// Drains everything due at `now`.
    fn drain<T>(wheel: &mut TimerWheel<T>, now: u64) -> Vec<(TimerKey, T)> {
        let mut out = Vec::new();
        wheel.advance(now, |k, v| out.push((k, v)));
        out
    }

    #[test]
    fn entry_size() {
        // Mirrors slab's private `enum Entry<T> { Vacant(usize), Occupied(T) }`.
        #[allow(dead_code)]
        enum SlabEntry<T> {
            Vacant(usize),
            Occupied(T),
        }
        assert_eq!(size_of::<Entry<()>>(), 24);
        assert_eq!(size_of::<Entry<u32>>(), 24);
        assert_eq!(size_of::<Entry<u64>>(), 32);
        assert_eq!(size_of::<Entry<(u32, u8)>>(), 32);
        assert_eq!(size_of::<SlabEntry<Entry<u32>>>(), 24);
        assert_eq!(size_of::<SlabEntry<Entry<u64>>>(), 32);
        assert_eq!(size_of::<TimerKey>(), 8);
        assert_eq!(size_of::<Option<TimerKey>>(), 8);
    }

    #[test]
    fn fires_at_exact_tick() {
        let mut w = TimerWheel::new(0);
        assert!(w.is_empty());
        let k = w.insert(10, "a");
        assert_eq!(w.len(), 1);
        assert_eq!(w.next_deadline(), Some(10));
        for t in 0..10 {
            assert_eq!(w.poll(t), None, "early at {t}");
        }
        assert_eq!(w.poll(10), Some((k, "a")));
        assert_eq!(w.poll(10), None);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.now(), 10);
    }

    #[test]
    fn many_timers_in_one_slot() {
        let mut w = TimerWheel::new(3);
        let keys: Vec<_> = (0..1000u32).map(|i| w.insert(70, i)).collect();
        assert_eq!(w.poll(69), None);
        let first = w.poll(70).expect("due");
        assert_eq!(w.next_deadline(), Some(70), "exact while due timers remain");
        let mut fired = drain(&mut w, 70);
        fired.push(first);
        assert_eq!(fired.len(), 1000);
        let mut vals: Vec<u32> = fired.iter().map(|&(_, v)| v).collect();
        vals.sort_unstable();
        assert_eq!(vals, (0..1000).collect::<Vec<_>>());
        for (k, v) in fired {
            assert_eq!(keys[v as usize], k);
        }
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_before_and_after_fire() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(5, 'a');
        let b = w.insert(5, 'b');
        let c = w.insert(5000, 'c');
        assert_eq!(w.cancel(a), Some('a'));
        assert_eq!(w.cancel(a), None, "double cancel");
        assert_eq!(w.cancel(c), Some('c'));
        assert_eq!(w.len(), 1);
        assert_eq!(drain(&mut w, 10_000), vec![(b, 'b')]);
        assert_eq!(w.cancel(b), None, "cancel after fire");
        assert!(!w.reset(b, 20_000), "reset after fire");
        assert!(!w.contains(b));
        // The freed slot is reused; the stale key must not touch the new timer.
        let d = w.insert(20_000, 'd');
        assert_eq!(d.index, b.index);
        assert_eq!(w.cancel(b), None);
        assert!(!w.reset(a, 1));
        assert_eq!(w.get(d), Some(&'d'));
        assert_eq!(w.cancel(d), Some('d'));
        assert!(w.is_empty());
        w.check_invariants();
    }

    #[test]
    fn reset_earlier_and_later() {
        let mut w = TimerWheel::new(100);
        let a = w.insert(100 + 5000, 'a');
        let b = w.insert(100 + 10, 'b');
        assert!(w.reset(a, 150)); // earlier, different level
        assert!(w.reset(b, 100 + 300_000)); // later, higher level
        assert_eq!(w.deadline(a), Some(150));
        assert_eq!(w.deadline(b), Some(300_100));
        assert_eq!(w.poll(149), None);
        assert_eq!(w.poll(150), Some((a, 'a')));
        assert_eq!(w.poll(300_099), None);
        assert!(w.reset(b, 300_200)); // later within the wheel after cascades
        assert_eq!(w.poll(300_199), None);
        assert_eq!(w.poll(300_200), Some((b, 'b')));
        // Reset into the past: due at once.
        let c = w.insert(400_000, 'c');
        assert!(w.reset(c, 7));
        assert_eq!(w.next_deadline(), Some(7));
        assert_eq!(w.poll(0), Some((c, 'c')));
        // Reset within the same slot and on the due list.
        let d = w.insert(300_210, 'd');
        assert!(w.reset(d, 300_211));
        assert!(w.reset(d, 1));
        assert!(w.reset(d, 2));
        assert_eq!(w.next_deadline(), Some(1)); // lower bound
        assert!(w.reset(d, 300_230));
        assert_eq!(w.poll(300_229), None);
        assert_eq!(w.poll(300_230), Some((d, 'd')));
        w.check_invariants();
    }

    #[test]
    fn past_deadlines_fire_immediately() {
        let mut w = TimerWheel::new(1000);
        let a = w.insert(5, 'a');
        let b = w.insert(1000, 'b');
        let c = w.insert(1001, 'c');
        assert_eq!(w.next_deadline(), Some(5));
        let mut fired = drain(&mut w, 1000);
        fired.sort_by_key(|&(_, v)| v);
        assert_eq!(fired, vec![(a, 'a'), (b, 'b')]);
        assert_eq!(w.next_deadline(), Some(1001));
        // Even a poll at an earlier `now` returns due timers.
        let d = w.insert(0, 'd');
        assert_eq!(w.poll(3), Some((d, 'd')));
        assert_eq!(w.poll(3), None);
        assert_eq!(w.now(), 1000, "time does not go backwards");
        assert_eq!(drain(&mut w, 1001), vec![(c, 'c')]);
    }

    /// Deadlines spanning levels 0..=4 relative to a non-aligned start.
    fn cascade_deadlines(start: u64) -> Vec<u64> {
        let mut d = vec![
            start + 1,
            start + 63,
            start + 64,
            start + 65,
            start + 4095,
            start + 4096,
            start + 4097,
            64u64.pow(3) - 1,
            64u64.pow(3),
            64u64.pow(3) + 1,
            2 * 64u64.pow(3) + 5 * 64u64.pow(2) + 7 * 64 + 3,
            start + 64u64.pow(3) + 64u64.pow(2) + 64 + 1,
            999_999,
            1_000_000,
        ];
        d.sort_unstable();
        d
    }

    #[test]
    fn cascades_fire_exactly_one_tick_at_a_time() {
        let start = 12_345;
        let deadlines = cascade_deadlines(start);
        let mut w = TimerWheel::new(start);
        for (i, &d) in deadlines.iter().enumerate() {
            w.insert(d, i);
        }
        let mut fired_at = vec![None; deadlines.len()];
        let mut wakeups = 0u32;
        for now in start..=1_000_000 {
            while let Some((_, i)) = w.poll(now) {
                assert!(fired_at[i].is_none(), "fired twice");
                fired_at[i] = Some(now);
            }
            if w.next_deadline() == Some(now + 1) {
                wakeups += 1;
            }
        }
        for (i, &d) in deadlines.iter().enumerate() {
            assert_eq!(fired_at[i], Some(d), "timer {i}");
        }
        assert!(wakeups > 0);
        assert!(w.is_empty());
        w.check_invariants();
    }

    #[test]
    fn cascades_fire_exactly_when_jumping() {
        let start = 12_345;
        let mut deadlines = cascade_deadlines(start);
        deadlines.extend([
            1 << 40,
            (1 << 40) + 17,
            (1 << 52) + 3,
            (1 << 63) + 5,
            u64::MAX - 64,
            u64::MAX - 1,
            u64::MAX,
        ]);
        // Jump to each deadline - 1 (nothing new fires), then to the deadline.
        let mut w = TimerWheel::new(start);
        for (i, &d) in deadlines.iter().enumerate() {
            w.insert(d, i);
        }
        for (i, &d) in deadlines.iter().enumerate() {
            assert_eq!(w.poll(d - 1), None, "timer {i} early");
            let fired = drain(&mut w, d);
            assert_eq!(fired.len(), 1, "timer {i}");
            assert_eq!(fired[0].1, i);
            w.check_invariants();
        }
        assert!(w.is_empty());

        // One jump from the start to the end of time: all fire, in order.
        let mut w = TimerWheel::new(start);
        for (i, &d) in deadlines.iter().enumerate() {
            w.insert(d, i);
        }
        let order: Vec<usize> = drain(&mut w, u64::MAX).into_iter().map(|(_, i)| i).collect();
        assert_eq!(order, (0..deadlines.len()).collect::<Vec<_>>());
    }

    #[test]
    fn next_deadline_is_a_tight_lower_bound() {
        for &d in &[1u64, 63, 64, 100, 4096, 300_000, 1 << 40, u64::MAX] {
            let mut w = TimerWheel::new(0);
            w.insert(d, ());
            let mut wakeups = 0;
            loop {
                let next = w.next_deadline().expect("timer pending");
                assert!(next <= d && next > w.now());
                wakeups += 1;
                if w.poll(next).is_some() {
                    assert_eq!(next, d);
                    break;
                }
            }
            assert!(wakeups <= LEVELS, "{wakeups} wake-ups for {d}");
        }
    }

    #[test]
    fn random_deadlines_fire_once_in_order() {
        let n: u32 = 1_000_000;
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut w = TimerWheel::with_capacity(0, n as usize);
        let mut reference: Vec<(u64, u32)> = Vec::with_capacity(n as usize);
        for id in 0..n {
            let deadline = 1 + match rng.below(10) {
                0 => rng.below(1 << 34),
                1 => rng.below(64),
                _ => rng.below(1 << 20),
            };
            w.insert(deadline, id);
            reference.push((deadline, id));
        }
        reference.sort_unstable();
        let deadline_of: Vec<u64> = {
            let mut v = vec![0; n as usize];
            for &(d, id) in &reference {
                v[id as usize] = d;
            }
            v
        };
        let mut fired = vec![false; n as usize];
        let mut pos = 0usize; // reference[..pos] has fired
        let mut now = 0u64;
        let mut batch: Vec<(u64, u32)> = Vec::new();
        while pos < reference.len() {
            let prev_now = now;
            now = match rng.below(4) {
                0 => now + 1,
                1 => now + rng.below(100),
                2 => reference[pos].0,
                _ => reference[(pos + rng.below(1000) as usize).min(reference.len() - 1)].0,
            }
            .max(now);
            batch.clear();
            while let Some((_, id)) = w.poll(now) {
                let d = deadline_of[id as usize];
                assert!(!fired[id as usize], "timer {id} fired twice");
                fired[id as usize] = true;
                assert!(d <= now, "timer {id} early");
                assert!(d > prev_now, "timer {id} late");
                if let Some(&(last, _)) = batch.last() {
                    assert!(last <= d, "out of order");
                }
                batch.push((d, id));
            }
            let end = pos + reference[pos..].partition_point(|&(d, _)| d <= now);
            batch.sort_unstable();
            assert_eq!(batch[..], reference[pos..end]);
            pos = end;
        }
        assert!(w.is_empty());
        assert!(fired.iter().all(|&f| f));
    }

    /// Random interleaved insert / cancel / reset / advance checked against a
    /// BTreeMap model.
    #[test]
    fn model_test() {
        const OPS: u32 = 100_000;
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        let start = 1_000;
        let mut w: TimerWheel<u32> = TimerWheel::new(start);
        // Model: id -> deadline, plus (deadline, id) for due queries.
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut by_deadline: BTreeSet<(u64, u32)> = BTreeSet::new();
        let mut keys: Vec<TimerKey> = Vec::new(); // by id, live or stale
        let mut live: Vec<u32> = Vec::new();
        let mut live_pos: HashMap<u32, usize> = HashMap::new();
        let mut now = start;
        let mut counts = [0u32; 4];

        let pick_deadline = |rng: &mut XorShift, now: u64| -> u64 {
            match rng.below(16) {
                0 => now.saturating_sub(rng.below(200)),
                1..=5 => now.saturating_add(rng.below(64)),
                6..=10 => now.saturating_add(rng.below(5_000)),
                11..=13 => now.saturating_add(rng.below(1 << 20)),
                // Far future (cascades through many levels), or "never".
                14 if rng.below(2) == 0 => now.saturating_add(rng.next() >> (20 + rng.below(30))),
                14 => u64::MAX - rng.below(3),
                _ => {
                    // Exactly on a level boundary.
                    let shift = 6 * (1 + rng.below(4)) as u32;
                    ((now >> shift) + 1 + rng.below(3)).checked_shl(shift).unwrap_or(u64::MAX)
                }
            }
        };

        for op in 0..OPS {
            // First half: grow a large population (more inserts, short steps);
            // second half: churn with occasional long jumps.
            let growth = op < OPS / 2;
            let choice = rng.below(100);
            if choice < 45 || (growth && rng.below(4) == 0) {
                counts[0] += 1;
                let id = keys.len() as u32;
                let d = pick_deadline(&mut rng, now);
                keys.push(w.insert(d, id));
                model.insert(id, d);
                by_deadline.insert((d, id));
                live_pos.insert(id, live.len());
                live.push(id);
            } else if choice < 75 {
                // cancel (< 55) or reset, on a live key most of the time.
                let is_cancel = choice < 55;
                counts[if is_cancel { 1 } else { 2 }] += 1;
                let id = if !live.is_empty() && rng.below(4) != 0 {
                    live[rng.below(live.len() as u64) as usize]
                } else if !keys.is_empty() {
                    rng.below(keys.len() as u64) as u32
                } else {
                    continue;
                };
                let key = keys[id as usize];
                let expected = model.get(&id).copied();
                if is_cancel {
                    let got = w.cancel(key);
                    assert_eq!(got, expected.map(|_| id), "op {op}: cancel {id}");
                    if let Some(d) = expected {
                        model.remove(&id);
                        by_deadline.remove(&(d, id));
                        let p = live_pos.remove(&id).unwrap();
                        live.swap_remove(p);
                        if p < live.len() {
                            live_pos.insert(live[p], p);
                        }
                    }
                } else {
                    let d = pick_deadline(&mut rng, now);
                    assert_eq!(w.reset(key, d), expected.is_some(), "op {op}: reset {id}");
                    if let Some(old) = expected {
                        by_deadline.remove(&(old, id));
                        by_deadline.insert((d, id));
                        model.insert(id, d);
                    }
                }
            } else {
                counts[3] += 1;
                let prev_now = w.now();
                let next_ref = by_deadline.iter().next().map(|&(d, _)| d);
                now = match rng.below(8) {
                    0 => now,
                    1..=3 => now + rng.below(4),
                    4 => now + rng.below(300),
                    5 if growth => now + rng.below(500),
                    5 => now + rng.below(20_000),
                    // Exactly onto (or just past) the earliest deadline if near.
                    6 => match next_ref {
                        Some(d) if d >= now && d - now <= 1 << 24 => d + rng.below(2),
                        _ => now + rng.below(64),
                    },
                    // Occasionally a long jump.
                    _ if !growth && rng.below(64) == 0 => now + rng.below(1 << 36),
                    _ if growth => now + rng.below(64),
                    _ => now + rng.below(4096),
                };
                let fired = drain(&mut w, now);
                // Due-on-arrival timers first, then wheel timers in order.
                let split = fired.iter().position(|&(_, id)| model[&id] > prev_now).unwrap_or(fired.len());
                let mut last = prev_now;
                for (i, &(key, id)) in fired.iter().enumerate() {
                    let d = model[&id];
                    assert_eq!(key, keys[id as usize]);
                    assert!(d <= now, "op {op}: {id} fired early");
                    if i < split {
                        assert!(d <= prev_now);
                    } else {
                        assert!(d >= last, "op {op}: out of order");
                        last = d;
                    }
                }
                let mut got: Vec<(u64, u32)> = fired.iter().map(|&(_, id)| (model[&id], id)).collect();
                got.sort_unstable();
                let expected: Vec<(u64, u32)> = by_deadline.range(..=(now, u32::MAX)).copied().collect();
                assert_eq!(got, expected, "op {op}: fired set at {now}");
                for (d, id) in expected {
                    by_deadline.remove(&(d, id));
                    model.remove(&id);
                    let p = live_pos.remove(&id).unwrap();
                    live.swap_remove(p);
                    if p < live.len() {
                        live_pos.insert(live[p], p);
                    }
                }
                assert_eq!(w.now(), now);
            }
            assert_eq!(w.len(), model.len());
            let earliest = by_deadline.iter().next().map(|&(d, _)| d);
            match (w.next_deadline(), earliest) {
                (None, None) => {}
                (Some(n), Some(e)) => assert!(n <= e, "op {op}: next_deadline {n} > {e}"),
                other => panic!("op {op}: next_deadline/model mismatch {other:?}"),
            }
            if op % 4096 == 0 {
                w.check_invariants();
            }
        }
        w.check_invariants();
        assert!(counts.iter().all(|&c| c > 5_000), "{counts:?}");
        // Drain the rest with one jump to the end of time: all in order.
        let rest: Vec<(u64, u32)> = drain(&mut w, u64::MAX).into_iter().map(|(_, id)| (model[&id], id)).collect();
        assert!(rest.windows(2).all(|p| p[0].0 <= p[1].0), "out of order");
        let mut rest = rest;
        rest.sort_unstable();
        assert_eq!(rest, by_deadline.into_iter().collect::<Vec<_>>());
        assert!(w.is_empty());
    }
}
