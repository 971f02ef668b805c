//! One event stream: `ready`, then every change after its starting point — first read
//! from the feed (a resume), then live from the user's hub — until the token expires,
//! the client leaves, it falls too far behind, or the service shuts down.
//!
//! The stream subscribes to the hub *before* it reads the feed, and tracks the counter
//! value it is up to: a live batch wholly below it is skipped, one that overlaps it
//! gives only the changes above it, and one that starts beyond it makes the stream read
//! the gap from the feed first. So there is no gap and no repeat, whatever the order in
//! which reads, commits and notifications happen.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fanout::{Batch, Received, Serialized, Subscription};
use crate::cursors::CursorKey;
use crate::storage::{self, StoreError, TaskStore, within_deadline};
use crate::sync::{ChangePage, Position, Refused, check};

/// Changes read per statement during a replay or catch-up.
const PAGE: i64 = 500;

/// What the stream sends, in the order it sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// First, always: where the stream starts (also its `id`).
    Ready { cursor: String },
    /// One change; `id` is the cursor just after it.
    Change { id: Arc<str>, json: Arc<str> },
    /// The token stopped being valid: the stream ends.
    TokenExpired,
}

/// Why a stream could not open.
#[derive(Debug)]
pub enum OpenError {
    Refused(Refused),
    Store(StoreError),
}

impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

pub struct EventStream {
    user: String,
    store: Arc<dyn TaskStore>,
    key: Arc<CursorKey>,
    subscription: Subscription,
    /// The counter value the client is up to.
    position: i64,
    /// Deletions at or below it cannot concern the client.
    floor: i64,
    pending: VecDeque<StreamEvent>,
    /// The feed holds changes above `position` that the stream must read itself.
    reading: bool,
    valid_until: Instant,
    closing: CancellationToken,
    finished: bool,
}

impl EventStream {
    /// Opens a stream at `from` (a resume point), or at the user's current counter. Reads
    /// the feed once, so an expired resume point is refused before anything is sent.
    pub async fn open(
        store: Arc<dyn TaskStore>,
        key: Arc<CursorKey>,
        user: String,
        from: Option<Position>,
        subscription: Subscription,
        closing: CancellationToken,
    ) -> Result<Self, OpenError> {
        let now = storage::now();
        let (start, first) = match from {
            None => {
                let marker = within_deadline(store.change_marker(&user)).await?;
                let start = Position {
                    counter: marker,
                    floor: marker,
                    issued: now,
                };
                (start, None)
            }
            Some(from) => {
                let page = within_deadline(store.changes(&user, from.counter, true, PAGE)).await?;
                check(from, &page).map_err(OpenError::Refused)?;
                (
                    Position {
                        issued: now,
                        ..from
                    },
                    Some(page),
                )
            }
        };
        let mut stream = Self {
            pending: VecDeque::from([StreamEvent::Ready {
                cursor: start.seal(&key, &user),
            }]),
            user,
            store,
            key,
            subscription,
            position: start.counter,
            floor: start.floor,
            reading: false,
            // Until told otherwise (`valid_until`): a stream must not outlive its token.
            valid_until: Instant::now(),
            closing,
            finished: false,
        };
        match first {
            Some(page) => stream.apply(page),
            None => stream.join_pump(),
        }
        Ok(stream)
    }

    /// The stream ends with `token-expired` at this instant.
    pub fn valid_until(&mut self, until: DateTime<Utc>) {
        let left = (until - Utc::now()).to_std().unwrap_or_default();
        self.valid_until = Instant::now() + left;
    }

    /// The next event; `None` ends the stream.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        loop {
            if self.closing.is_cancelled() {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.finished {
                return None;
            }
            if self.reading {
                if let Err(error) = self.read().await {
                    // The client resumes from its last id, on this instance or another.
                    tracing::warn!(%error, "event stream: cannot read the change feed; closing");
                    return None;
                }
                continue;
            }
            tokio::select! {
                biased;
                () = self.closing.cancelled() => return None,
                () = tokio::time::sleep_until(self.valid_until) => {
                    self.finished = true;
                    return Some(StreamEvent::TokenExpired);
                }
                received = self.subscription.next() => match received {
                    Received::Batch(batch) => self.take(&batch),
                    // Too far behind to be kept up to date in memory.
                    Received::Lagged => return None,
                },
            }
        }
    }

    /// Reads one page of the feed above the stream's position.
    async fn read(&mut self) -> Result<(), StoreError> {
        let page =
            within_deadline(self.store.changes(&self.user, self.position, true, PAGE)).await?;
        self.apply(page);
        Ok(())
    }

    /// Queues a page the stream read itself.
    fn apply(&mut self, page: ChangePage) {
        if page.marker < self.position {
            // The database went back in time (a restore): the client must start over,
            // and will be told so (410) when it reconnects.
            self.finished = true;
            return;
        }
        let end = match page.changes.last() {
            Some(last) if page.has_more => last.seq,
            _ => page.marker,
        };
        let issued = storage::now();
        for change in &page.changes {
            let serialized = Serialized::of(change, &self.key, &self.user, issued);
            let event = self.change_event(&serialized);
            self.pending.push_back(event);
        }
        self.position = end;
        self.reading = page.has_more;
        if !self.reading {
            self.join_pump();
        }
    }

    /// Up to date with the feed: from now on the hub's batches carry the changes, unless
    /// its pump reads from beyond this stream's position (it started, or moved on, after
    /// this stream's read), in which case the stream reads the gap first.
    fn join_pump(&mut self) {
        if self.subscription.pump_from(self.position) > self.position {
            self.reading = true;
        }
    }

    /// Queues what a live batch holds beyond the stream's position.
    fn take(&mut self, batch: &Batch) {
        let Batch::Changes { from, to, changes } = batch else {
            self.finished = true;
            return;
        };
        if *to <= self.position {
            return;
        }
        if *from > self.position {
            // Changes between our position and the batch were never broadcast to us.
            self.reading = true;
            return;
        }
        for change in changes.iter().filter(|c| c.seq > self.position) {
            let event = self.change_event(change);
            self.pending.push_back(event);
        }
        self.position = *to;
    }

    fn change_event(&self, change: &Serialized) -> StreamEvent {
        let id = if self.floor <= change.seq {
            change.id.clone()
        } else {
            // Resumed from the middle of a paged full sync: its floor stays in its ids.
            let after = Position {
                counter: change.seq,
                floor: self.floor,
                issued: storage::now(),
            };
            after.seal(&self.key, &self.user).into()
        };
        StreamEvent::Change {
            id,
            json: change.json.clone(),
        }
    }
}
