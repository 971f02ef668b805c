//! The rate-limit rule: GCRA (the generic cell rate algorithm), and what its answer
//! tells a client.
//!
//! A policy allows `quota` requests per `window`; one request "costs" the emission
//! interval `window / quota`. A key keeps one number, its theoretical arrival time
//! (TAT): when it would be back at zero cost. A request at `now` is allowed when
//! `max(TAT, now) + interval − now ≤ window`, and then moves the TAT there. So a full
//! quota may be spent at once, and it comes back evenly, one request per interval —
//! with no window boundaries at which twice the quota could pass.
//!
//! Both the in-memory store and the Redis script take this one step atomically; how
//! many requests are left and when the quota is whole again are read off its result here,
//! for both.

use std::time::Duration;

/// Microseconds: the unit every stored TAT and clock reading is in.
pub type Micros = u64;

/// A quota of requests per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The contract's `q`: requests per window.
    pub quota: u32,
    /// The contract's `w`, in whole seconds.
    pub window_secs: u32,
}

impl Policy {
    /// `quota` per `window_secs`; `None` when the quota is 0 (the limit is off).
    pub fn new(quota: u32, window_secs: u32) -> Option<Self> {
        (quota > 0 && window_secs > 0).then_some(Self { quota, window_secs })
    }

    pub fn window(&self) -> Micros {
        u64::from(self.window_secs) * 1_000_000
    }

    /// What one request costs: the window over the quota, rounded up to whole
    /// microseconds (so a quota that does not divide the window refills a little slower,
    /// never faster).
    pub fn interval(&self) -> Micros {
        self.window().div_ceil(u64::from(self.quota)).max(1)
    }

    /// How far ahead of now a key's TAT may be: exactly `quota` intervals, so a full
    /// quota passes at once and not one request more, whatever the rounding above.
    pub fn tolerance(&self) -> Micros {
        self.interval() * u64::from(self.quota)
    }

    /// `RateLimit-Policy: "user";q=1200;w=60`
    pub fn header(&self, name: &str) -> String {
        format!("\"{name}\";q={};w={}", self.quota, self.window_secs)
    }

    /// How long a key must stay stored: after this much idle time its state is the same
    /// as a fresh key's, so forgetting it changes nothing.
    pub fn idle_ttl(&self) -> Duration {
        Duration::from_micros(self.tolerance())
    }
}

/// The TAT a request at `now` moves a key to, or `None` when it is over the limit (the
/// TAT stays).
pub fn step(tat: Micros, now: Micros, policy: &Policy) -> Option<Micros> {
    let next = tat.max(now) + policy.interval();
    (next - now <= policy.tolerance()).then_some(next)
}

/// The answer for one request: allowed or not, and what the `RateLimit` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub policy: Policy,
    pub allowed: bool,
    /// The contract's `r`: requests left right now.
    pub remaining: u32,
    /// The contract's `t`: whole seconds until `remaining` is back at the quota.
    pub reset_secs: u64,
    /// For a refused request: whole seconds until one would be allowed (≥ 1).
    pub retry_after_secs: u64,
    /// For a refused request: how long until one would be allowed, exactly.
    pub wait: Duration,
}

impl Decision {
    /// Reads the answer off a key's TAT after the step at `now` (the unchanged TAT when
    /// the request was refused).
    pub fn new(policy: Policy, allowed: bool, now: Micros, tat: Micros) -> Self {
        let owed = tat.saturating_sub(now);
        let remaining = if allowed {
            policy.tolerance().saturating_sub(owed) / policy.interval()
        } else {
            0
        };
        // When the next request fits: `owed + interval ≤ tolerance`.
        let wait = (owed + policy.interval()).saturating_sub(policy.tolerance());
        Self {
            policy,
            allowed,
            remaining: u32::try_from(remaining)
                .unwrap_or(u32::MAX)
                .min(policy.quota),
            reset_secs: owed.div_ceil(1_000_000),
            retry_after_secs: wait.div_ceil(1_000_000).max(1),
            wait: Duration::from_micros(wait),
        }
    }

    /// `RateLimit: "user";r=1199;t=1`
    pub fn header(&self, name: &str) -> String {
        format!("\"{name}\";r={};t={}", self.remaining, self.reset_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;

    fn run(policy: &Policy, tat: &mut Micros, now: Micros) -> Decision {
        match step(*tat, now, policy) {
            Some(next) => {
                *tat = next;
                Decision::new(*policy, true, now, next)
            }
            None => Decision::new(*policy, false, now, *tat),
        }
    }

    #[test]
    fn a_full_quota_is_spent_at_once_then_refused() {
        let policy = Policy::new(3, 60).unwrap();
        let (mut tat, now) = (0, 1_000 * S);
        let answers: Vec<_> = (0..4).map(|_| run(&policy, &mut tat, now)).collect();
        assert_eq!(
            answers.iter().map(|d| d.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            answers.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert_eq!(
            answers.iter().map(|d| d.reset_secs).collect::<Vec<_>>(),
            [20, 40, 60, 60]
        );
        // One request comes back every 20 s.
        assert_eq!(answers[3].retry_after_secs, 20);
        assert!(!run(&policy, &mut tat, now + 19 * S).allowed);
        let later = run(&policy, &mut tat, now + 20 * S);
        assert!(later.allowed);
        assert_eq!((later.remaining, later.reset_secs), (0, 60));
    }

    #[test]
    fn the_quota_refills_evenly_and_never_beyond_itself() {
        let policy = Policy::new(1200, 60).unwrap();
        assert_eq!(policy.interval(), 50_000);
        let (mut tat, now) = (0, 5 * S);
        let first = run(&policy, &mut tat, now);
        assert_eq!((first.remaining, first.reset_secs), (1199, 1));
        for _ in 0..1199 {
            assert!(run(&policy, &mut tat, now).allowed);
        }
        let refused = run(&policy, &mut tat, now);
        assert!(!refused.allowed);
        assert_eq!((refused.remaining, refused.retry_after_secs), (0, 1));
        // 30 s later half the quota is back; after a long idle, the whole (not more).
        let half = run(&policy, &mut tat, now + 30 * S);
        assert_eq!(half.remaining, 599);
        let rested = run(&policy, &mut tat, now + 3600 * S);
        assert_eq!((rested.remaining, rested.reset_secs), (1199, 1));
    }

    #[test]
    fn an_idle_key_equals_a_fresh_one_after_its_ttl() {
        let policy = Policy::new(7, 10).unwrap();
        let (mut tat, now) = (0, 100 * S);
        for _ in 0..7 {
            run(&policy, &mut tat, now);
        }
        let after = now + policy.idle_ttl().as_micros() as u64;
        let mut fresh = 0;
        assert_eq!(
            run(&policy, &mut tat, after),
            run(&policy, &mut fresh, after)
        );
    }

    #[test]
    fn a_burst_is_exactly_the_quota_whatever_the_rounding() {
        for (quota, window) in [
            (9999, 60),
            (700_000, 60),
            (7, 10),
            (1_000_000, 1),
            (1200, 60),
        ] {
            let policy = Policy::new(quota, window).unwrap();
            let (mut tat, now) = (0, 1_000 * S);
            let mut passed = 0;
            while run(&policy, &mut tat, now).allowed {
                passed += 1;
            }
            assert_eq!(passed, quota, "{quota} per {window} s");
            // And it refills at most at the nominal rate.
            assert!(policy.interval() * u64::from(quota) >= policy.window());
        }
    }

    #[test]
    fn headers_use_the_structured_field_syntax() {
        let policy = Policy::new(1200, 60).unwrap();
        let d = Decision::new(policy, true, 0, 50_000);
        assert_eq!(policy.header("user"), "\"user\";q=1200;w=60");
        assert_eq!(d.header("user"), "\"user\";r=1199;t=1");
        assert_eq!(Policy::new(0, 60), None);
    }
}
