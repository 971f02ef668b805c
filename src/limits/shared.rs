//! Limits shared by every instance through Redis: the GCRA step in a Lua script, timed by
//! Redis's own clock so the instances' clocks do not matter.
//!
//! Requests that arrive while calls are on their way share the next one: one script call
//! takes the steps of every request waiting (in order, so two requests of one user in
//! one call still take one step each), in one round trip. A few calls may be in flight
//! at once (the connection is multiplexed), so a call never waits behind another for
//! long; past that many, steps gather for the next. Each request's step is still
//! atomic and still costs one Redis call's round trip; what is shared is Redis's own
//! per-call cost (a read, a write, the script's start), which on a busy host is most of
//! what a rate-limit check costs. redis-rs pipelines but does not batch on its own, so the
//! batching is done here.
//!
//! Redis is a help, never a dependency: a request whose answer does not come within
//! [`BUDGET`] is served unlimited (the caller counts and logs it), and redis-rs's
//! connection manager reconnects in the background.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use super::gcra::{Decision, Policy};

/// The longest a request waits for Redis before it is served unlimited.
pub const BUDGET: Duration = Duration::from_millis(50);
/// Requests waiting at most; past it a request is served unlimited at once.
const QUEUE: usize = 4096;
/// Steps in one script call at most.
const MAX_BATCH: usize = 64;
/// Script calls in flight at once.
const IN_FLIGHT: usize = 2;

/// The step of [`super::gcra::step`] for each of `KEYS`, with `ARGV[2i-1]` its interval
/// and `ARGV[2i]` its tolerance (µs). Returns `{allowed, now, tat}` for each: the TAT after
/// the step, or the unchanged one when refused. A key expires once its state equals a
/// fresh key's.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or 0)
  if tat < now then tat = now end
  local next = tat + interval
  if next - now > tolerance then
    out[i] = {0, now, tat}
  else
    redis.call('SET', key, next, 'PX', math.ceil((next - now) / 1000))
    out[i] = {1, now, next}
  end
end
return out
";

#[derive(Debug, Clone, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {BUDGET:?}")]
    Slow,
}

struct Step {
    queued: tokio::time::Instant,
    key: String,
    policy: Policy,
    answer: oneshot::Sender<Result<Decision, SharedError>>,
}

pub struct RedisLimiter {
    steps: mpsc::Sender<Step>,
    prefix: String,
}

impl RedisLimiter {
    /// A limiter on the Redis at `url`, with every key under `prefix`. Connects lazily:
    /// an instance starts (and serves, unlimited) while Redis is down. Must be called
    /// within a Tokio runtime: it starts the task that talks to Redis, which ends when
    /// the limiter is dropped.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)?;
        let (steps, queue) = mpsc::channel(QUEUE);
        tokio::spawn(run(connection, queue));
        Ok(Self {
            steps,
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
        let (answer, answered) = oneshot::channel();
        let queued = tokio::time::Instant::now();
        let step = Step {
            queued,
            key: format!("{}{kind}:{key}", self.prefix),
            policy: *policy,
            answer,
        };
        // A full queue means Redis is not keeping up: do not wait in line.
        self.steps.try_send(step).map_err(|_| SharedError::Slow)?;
        match tokio::time::timeout_at(queued + BUDGET, answered).await {
            Ok(Ok(answer)) => answer,
            _ => Err(SharedError::Slow),
        }
    }
}

/// Takes every step waiting, sends them as one script call and hands out the answers;
/// at most [`IN_FLIGHT`] calls at a time, so that under load steps gather into calls.
async fn run(connection: ConnectionManager, mut queue: mpsc::Receiver<Step>) {
    let script = std::sync::Arc::new(redis::Script::new(GCRA));
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        // Wait for a free slot first: steps arriving meanwhile join the next call.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let (connection, script) = (connection.clone(), script.clone());
        tokio::spawn(async move {
            call(connection, &script, batch).await;
            drop(slot);
        });
    }
}

async fn call(mut connection: ConnectionManager, script: &redis::Script, mut batch: Vec<Step>) {
    // A request that has stopped waiting was served unlimited: not counted either.
    batch.retain(|step| !step.answer.is_closed());
    let Some(oldest) = batch.iter().map(|step| step.queued).min() else {
        return;
    };
    let mut invocation = script.prepare_invoke();
    for step in &batch {
        invocation
            .key(&step.key)
            .arg(step.policy.interval())
            .arg(step.policy.tolerance());
    }
    let call = invocation.invoke_async::<Vec<(u8, u64, u64)>>(&mut connection);
    // Within what is left of the budget of the step that has waited longest.
    let answers = match tokio::time::timeout_at(oldest + BUDGET, call).await {
        Ok(Ok(answers)) if answers.len() == batch.len() => Ok(answers),
        Ok(Ok(_)) => Err(SharedError::Redis(
            "the script answered the wrong count".into(),
        )),
        Ok(Err(error)) => Err(SharedError::Redis(error.to_string())),
        Err(_) => Err(SharedError::Slow),
    };
    match answers {
        Ok(answers) => {
            for (step, (allowed, now, tat)) in batch.into_iter().zip(answers) {
                let decision = Decision::new(step.policy, allowed == 1, now, tat);
                let _ = step.answer.send(Ok(decision));
            }
        }
        Err(error) => {
            for step in batch {
                let _ = step.answer.send(Err(error.clone()));
            }
        }
    }
}
