//! Limits kept by this instance alone: one atomic TAT per key in a bounded cache.
//!
//! Not `governor`: its keyed limiter does not expose a key's TAT, which the `RateLimit`
//! header's `t` (seconds until the quota is whole) needs, and its store grows until
//! someone calls `retain_recent`. The rule itself is [`super::gcra`], shared with the
//! Redis script; the storage is moka's cache, which bounds the number of keys and forgets
//! a key once it has been idle for a window — when its state is that of a fresh key, so
//! forgetting it loses nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use moka::sync::Cache;

use super::gcra::{self, Decision, Micros, Policy};

/// Keys tracked at most; past it the least recently used are forgotten first (each such
/// key starts again with a whole quota).
pub const MAX_KEYS: u64 = 100_000;

pub struct MemoryLimiter {
    policy: Policy,
    keys: Cache<String, Arc<AtomicU64>>,
    epoch: Instant,
}

impl MemoryLimiter {
    pub fn new(policy: Policy, max_keys: u64) -> Self {
        Self {
            policy,
            keys: Cache::builder()
                .max_capacity(max_keys)
                // Plain LRU, not moka's default TinyLFU admission: that may turn a new key
                // away when the cache is full, and a key not held is a key not limited.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(policy.idle_ttl())
                .build(),
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
        let cell = self.keys.get_with_by_ref(key, Default::default);
        let now = self.now();
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

    /// Keys currently held (for tests of the bound).
    pub fn len(&self) -> u64 {
        self.keys.run_pending_tasks();
        self.keys.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_requests_never_exceed_the_quota() {
        for _ in 0..20 {
            let limiter = Arc::new(MemoryLimiter::new(Policy::new(100, 3600).unwrap(), 10));
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
