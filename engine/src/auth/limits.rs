//! Limits that need an identity: WebSocket connections per user and per client address, and upgrades per
//! second per client address, over all shards.
//!
//! Shared by the shards, so each table is split into 64 stripes behind their own mutex, picked by a hash of
//! the key: an upgrade or a close takes one or two uncontended locks, and nothing on the per-message path
//! takes any. Counts leave their table when they drop to zero, so the tables hold only live users and
//! addresses. The upgrade buckets are bounded too: each stripe keeps at most [`BUCKETS_PER_STRIPE`] of
//! them, dropping full ones (they hold no information) and then the oldest when an attacker spreads over
//! more addresses than that.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

const STRIPES: usize = 64;
/// Upgrade buckets kept per stripe (16,384 addresses in all, about 1 MiB).
pub const BUCKETS_PER_STRIPE: usize = 256;

fn fnv(bytes: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as usize
}

fn ip_bytes(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[derive(Debug)]
struct Striped<K, V>(Vec<Mutex<HashMap<K, V>>>);

impl<K: Hash + Eq, V> Striped<K, V> {
    fn new() -> Self {
        Self((0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect())
    }

    fn stripe(&self, h: usize) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
        // A panic while holding a stripe leaves only counts behind: keep going with them.
        self.0[h % STRIPES].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    /// `max_connections_per_user`.
    User,
    /// `max_connections_per_ip`.
    Ip,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// See the module docs.
#[derive(Debug)]
pub struct Limiter {
    per_user: u32,
    per_ip: u32,
    rate: u32,
    users: Striped<Box<str>, u32>,
    ips: Striped<IpAddr, u32>,
    buckets: Striped<IpAddr, Bucket>,
}

impl Limiter {
    /// Limits of `per_user` and `per_ip` connections and `rate` upgrades per second per address (0: none).
    pub fn new(per_user: u32, per_ip: u32, rate: u32) -> Self {
        Self { per_user, per_ip, rate, users: Striped::new(), ips: Striped::new(), buckets: Striped::new() }
    }

    /// Takes one upgrade from `ip`'s bucket (capacity and refill: `rate` per second). `Err(seconds)`: over
    /// the rate; retry after that long.
    pub fn upgrade(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        if self.rate == 0 {
            return Ok(());
        }
        let rate = f64::from(self.rate);
        let mut map = self.buckets.stripe(fnv(&ip_bytes(&ip)));
        if map.len() >= BUCKETS_PER_STRIPE && !map.contains_key(&ip) {
            // Full buckets carry nothing; past that, forget the least recently used.
            map.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < rate);
            if map.len() >= BUCKETS_PER_STRIPE {
                if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let b = map.entry(ip).or_insert(Bucket { tokens: rate, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
        }
    }

    /// Counts a WebSocket connection of `user` from `ip` (`None`: not counted per address), or refuses it.
    pub fn acquire(&self, user: &str, ip: Option<IpAddr>) -> Result<(), Over> {
        if self.per_user > 0 {
            let mut map = self.users.stripe(fnv(user.as_bytes()));
            let n = map.entry(user.into()).or_insert(0);
            if *n >= self.per_user {
                if *n == 0 {
                    map.remove(user);
                }
                return Err(Over::User);
            }
            *n += 1;
        }
        if let (Some(ip), true) = (ip, self.per_ip > 0) {
            let mut map = self.ips.stripe(fnv(&ip_bytes(&ip)));
            let n = map.entry(ip).or_insert(0);
            if *n >= self.per_ip {
                drop(map);
                self.release_user(user);
                return Err(Over::Ip);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Gives back what [`Limiter::acquire`] counted.
    pub fn release(&self, user: &str, ip: Option<IpAddr>) {
        self.release_user(user);
        if let (Some(ip), true) = (ip, self.per_ip > 0) {
            let mut map = self.ips.stripe(fnv(&ip_bytes(&ip)));
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }

    fn release_user(&self, user: &str) {
        if self.per_user > 0 {
            let mut map = self.users.stripe(fnv(user.as_bytes()));
            if let Some(n) = map.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    map.remove(user);
                }
            }
        }
    }

    /// Users and addresses currently counted (for `/stats` and tests).
    pub fn counted(&self) -> (usize, usize) {
        fn sum<K, V>(s: &Striped<K, V>) -> usize {
            s.0.iter().map(|m| m.lock().map_or(0, |m| m.len())).sum()
        }
        (sum(&self.users), sum(&self.ips))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_per_user_and_address() {
        let l = Limiter::new(2, 3, 0);
        assert_eq!(l.acquire("a", Some(ip("1.1.1.1"))), Ok(()));
        assert_eq!(l.acquire("a", Some(ip("1.1.1.1"))), Ok(()));
        assert_eq!(l.acquire("a", Some(ip("1.1.1.1"))), Err(Over::User));
        assert_eq!(l.acquire("b", Some(ip("1.1.1.1"))), Ok(()));
        assert_eq!(l.acquire("c", Some(ip("1.1.1.1"))), Err(Over::Ip));
        // The refused attempt left nothing behind for "c".
        assert_eq!(l.acquire("c", Some(ip("2.2.2.2"))), Ok(()));
        for (u, a) in [("a", "1.1.1.1"), ("a", "1.1.1.1"), ("b", "1.1.1.1"), ("c", "2.2.2.2")] {
            l.release(u, Some(ip(a)));
        }
        assert_eq!(l.counted(), (0, 0), "tables keep only live users and addresses");
    }

    #[test]
    fn upgrade_bucket_refills() {
        let l = Limiter::new(0, 0, 10);
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.upgrade(ip("1.1.1.1"), t), Ok(()));
        }
        assert_eq!(l.upgrade(ip("1.1.1.1"), t), Err(1));
        assert_eq!(l.upgrade(ip("9.9.9.9"), t), Ok(()), "buckets are per address");
        assert_eq!(l.upgrade(ip("1.1.1.1"), t + Duration::from_millis(150)), Ok(()));
        assert!(Limiter::new(0, 0, 0).upgrade(ip("1.1.1.1"), t).is_ok(), "0: no limit");
    }

    #[test]
    fn buckets_stay_bounded() {
        let l = Limiter::new(0, 0, 5);
        let t = Instant::now();
        for i in 0..100_000u32 {
            let _ = l.upgrade(IpAddr::from(i.to_be_bytes()), t);
        }
        let held: usize = l.buckets.0.iter().map(|m| m.lock().unwrap().len()).sum();
        assert!(held <= STRIPES * BUCKETS_PER_STRIPE, "{held} buckets");
    }
}
