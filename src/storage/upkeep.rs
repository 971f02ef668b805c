//! Background upkeep, one loop per instance: forget expired idempotency keys, tombstones
//! and event tickets, and fold the search copies of tasks written by something other than this
//! service. Each run does a bounded amount of work; what is left waits for the next run.
//! Instances may run it at once: every step is one statement that is safe to repeat.

use std::sync::Arc;
use std::time::Duration;

use super::{StoreError, TaskStore, now, within_deadline};
use crate::idempotency::{purge_interval, remembered_since};
use crate::sync::TOMBSTONE_MARGIN;

/// Rows deleted or folded per statement: each statement stays short.
pub const PURGE_BATCH: i64 = 1000;
/// Statements per job per run.
pub const PURGE_BATCHES_PER_RUN: usize = 20;

/// What upkeep keeps for how long.
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    pub idempotency_ttl: Duration,
    pub sync_retention: Duration,
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub keys: u64,
    pub tombstones: u64,
    pub refolded: u64,
    pub tickets: u64,
}

/// Runs upkeep every [`purge_interval`] of the key TTL, until the process ends.
pub async fn run_forever(store: Arc<dyn TaskStore>, upkeep: Upkeep) {
    let mut tick = tokio::time::interval(purge_interval(upkeep.idempotency_ttl));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = run_once(store.as_ref(), upkeep).await {
            tracing::warn!(%error, "upkeep failed; will retry");
        }
    }
}

/// One run of every job.
pub async fn run_once(store: &dyn TaskStore, upkeep: Upkeep) -> Result<Done, StoreError> {
    let keys = purge_idempotency_keys_once(store, upkeep.idempotency_ttl).await?;
    let retention = upkeep.sync_retention.saturating_add(TOMBSTONE_MARGIN);
    let cutoff = remembered_since(now(), retention);
    let tombstones = batches(|| store.purge_tombstones(cutoff, PURGE_BATCH)).await?;
    let refolded = batches(|| store.refold(PURGE_BATCH)).await?;
    // Expired event tickets (used ones are deleted when used).
    let now = now();
    let tickets = batches(|| store.purge_tickets(now, PURGE_BATCH)).await?;
    Ok(Done {
        keys,
        tombstones,
        refolded,
        tickets,
    })
}

/// Deletes up to [`PURGE_BATCHES_PER_RUN`] × [`PURGE_BATCH`] keys older than `ttl`.
/// Returns how many.
pub async fn purge_idempotency_keys_once(
    store: &dyn TaskStore,
    ttl: Duration,
) -> Result<u64, StoreError> {
    let cutoff = remembered_since(now(), ttl);
    batches(|| store.purge_idempotency_keys(cutoff, PURGE_BATCH)).await
}

/// Runs `batch` until it does less than a full batch, at most [`PURGE_BATCHES_PER_RUN`]
/// times.
async fn batches<F>(mut batch: impl FnMut() -> F) -> Result<u64, StoreError>
where
    F: Future<Output = Result<u64, StoreError>>,
{
    let mut done = 0;
    for _ in 0..PURGE_BATCHES_PER_RUN {
        let n = within_deadline(batch()).await?;
        done += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    Ok(done)
}
