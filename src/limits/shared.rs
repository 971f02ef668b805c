//! Limits shared by every instance through Redis: the GCRA step as one Lua script, one
//! round trip per request, timed by Redis's own clock so the instances' clocks do not
//! matter.
//!
//! Redis is a help, never a dependency: a call that fails or takes longer than
//! [`BUDGET`] lets the request through (the caller counts and logs it), and redis-rs's
//! connection manager reconnects in the background.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::gcra::{Decision, Policy};

/// The longest a request waits for Redis before it is served unlimited.
pub const BUDGET: Duration = Duration::from_millis(50);

/// The step of [`super::gcra::step`] on the key `KEYS[1]`, with `ARGV[1]` the interval
/// and `ARGV[2]` the window (µs). Returns `{allowed, now, tat}`: the TAT after the step,
/// or the unchanged one when refused. The key expires once its state equals a fresh
/// key's.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local next = tat + interval
if next - now > window then
  return {0, now, tat}
end
redis.call('SET', KEYS[1], next, 'PX', math.ceil((next - now) / 1000))
return {1, now, next}
";

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {BUDGET:?}")]
    Slow,
}

#[derive(Clone)]
pub struct RedisLimiter {
    connection: ConnectionManager,
    script: redis::Script,
    prefix: String,
}

impl RedisLimiter {
    /// A limiter on the Redis at `url`, with every key under `prefix`. Connects lazily:
    /// an instance starts (and serves, unlimited) while Redis is down.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Self {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            script: redis::Script::new(GCRA),
            prefix: prefix.to_owned(),
        })
    }

    /// Counts one request under `kind:key`.
    pub async fn hit(
        &self,
        kind: &str,
        key: &str,
        policy: &Policy,
    ) -> Result<Decision, SharedError> {
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("{}{kind}:{key}", self.prefix));
        invocation.arg(policy.interval()).arg(policy.window());
        let call = invocation.invoke_async::<(u8, u64, u64)>(&mut connection);
        let (allowed, now, tat) = tokio::time::timeout(BUDGET, call)
            .await
            .map_err(|_| SharedError::Slow)??;
        Ok(Decision::new(*policy, allowed == 1, now, tat))
    }
}
