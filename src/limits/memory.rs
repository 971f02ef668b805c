//! Limits kept by this instance alone: one atomic TAT per key in a bounded map.
//!
//! Not `governor`: its keyed limiter does not expose a key's TAT, which the `RateLimit`
//! header's `t` (seconds until the quota is whole) needs, and its store grows until
//! someone calls `retain_recent`. Not moka: its bookkeeping of every read (recency, idle
//! time) is shared by all threads, and cost a contended 0.6 µs per request where this
//! costs one sharded read lock. The rule itself is [`super::gcra`], shared with the Redis
//! script; the storage is a `DashMap`, bounded here: when it is full, keys whose state is
//! a fresh key's (their TAT has passed) are forgotten, which loses nothing; if every key
//! is still active, the eighth that owes least is forgotten (each starts again with a
//! whole quota).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;

use super::gcra::{self, Decision, Micros, Policy};

/// Keys tracked at most.
pub const MAX_KEYS: u64 = 100_000;

pub struct MemoryLimiter {
    policy: Policy,
    keys: DashMap<Box<str>, AtomicU64>,
    /// Keys held (kept beside the map: counting its shards takes every lock).
    count: AtomicU64,
    max_keys: u64,
    /// Held while making room, so that one thread sweeps at a time.
    sweeping: Mutex<()>,
    epoch: Instant,
}

impl MemoryLimiter {
    pub fn new(policy: Policy, max_keys: u64) -> Self {
        Self {
            policy,
            keys: DashMap::new(),
            count: AtomicU64::new(0),
            max_keys: max_keys.max(8),
            sweeping: Mutex::new(()),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> Micros {
        // Starts one tolerance in so that a fresh key's TAT of 0 is always in the past.
        self.policy.tolerance() + self.epoch.elapsed().as_micros() as Micros
    }

    /// Counts one request for `key`: the GCRA step as one compare-and-swap, so requests
    /// racing on one key can never both take its last place.
    pub fn hit(&self, key: &str) -> Decision {
        let now = self.now();
        if let Some(cell) = self.keys.get(key) {
            return self.step(&cell, now);
        }
        self.make_room(now);
        let cell = self.keys.entry(key.into()).or_insert_with(|| {
            self.count.fetch_add(1, Ordering::Relaxed);
            AtomicU64::new(0)
        });
        self.step(&cell, now)
    }

    fn step(&self, cell: &AtomicU64, now: Micros) -> Decision {
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let Some(next) = gcra::step(tat, now, &self.policy) else {
                return Decision::new(self.policy, false, now, tat);
            };
            match cell.compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Decision::new(self.policy, true, now, next),
                Err(current) => tat = current,
            }
        }
    }

    /// Below the bound, nothing; at it, forget the keys that equal fresh ones, then (if
    /// that was not enough) the eighth that owes least.
    fn make_room(&self, now: Micros) {
        if self.count.load(Ordering::Relaxed) < self.max_keys {
            return;
        }
        let Ok(_sweeping) = self.sweeping.try_lock() else {
            return;
        };
        self.keys.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
        if self.keys.len() as u64 >= self.max_keys {
            let mut owed: Vec<Micros> = self
                .keys
                .iter()
                .map(|entry| entry.value().load(Ordering::Relaxed))
                .collect();
            let cut = owed.len() / 8;
            let (_, threshold, _) = owed.select_nth_unstable(cut);
            let threshold = *threshold;
            self.keys
                .retain(|_, tat| tat.load(Ordering::Relaxed) > threshold);
        }
        self.count.store(self.keys.len() as u64, Ordering::Relaxed);
    }

    /// Keys currently held (for tests of the bound).
    pub fn len(&self) -> u64 {
        self.keys.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_requests_never_exceed_the_quota() {
        for _ in 0..20 {
            let limiter =
                std::sync::Arc::new(MemoryLimiter::new(Policy::new(100, 3600).unwrap(), 10));
            let allowed: usize = std::thread::scope(|s| {
                let workers: Vec<_> = (0..8)
                    .map(|_| {
                        let limiter = limiter.clone();
                        s.spawn(move || (0..50).filter(|_| limiter.hit("k").allowed).count())
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).sum()
            });
            assert_eq!(allowed, 100);
        }
    }

    #[test]
    fn keys_are_bounded_and_independent() {
        let limiter = MemoryLimiter::new(Policy::new(1, 60).unwrap(), 1000);
        for i in 0..5000 {
            assert!(limiter.hit(&format!("user-{i}")).allowed);
        }
        assert!(limiter.len() <= 1000, "{}", limiter.len());
        assert!(!limiter.hit("user-4999").allowed);
        assert!(!limiter.is_empty());
    }
}
