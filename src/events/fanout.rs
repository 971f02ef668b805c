//! The event fan-out inside one instance: one hub per user with open streams.
//!
//! A hub's *pump* reads the change feed when the user's tasks change (a write on this
//! instance, a notification from another one, or a periodic re-check) and broadcasts what
//! it read as a [`Batch`]: every change numbered in `(from, to]`, each task in its latest
//! state, serialized once for all of the user's streams. So a write costs one feed read
//! per instance with streams for that user, however many streams there are.
//!
//! A stream never trusts the broadcast alone: it knows the position it is up to, skips
//! what it already sent, and when a batch starts beyond its position (it subscribed while
//! the pump was elsewhere, or the pump missed a wake-up) it reads the gap from the feed
//! itself ([`super::stream`]). So no change is lost and none is sent twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::notify::{Listener, Notifier, Wake};
use crate::cursors::CursorKey;
use crate::storage::{StoreError, TaskStore, within_deadline};
use crate::sync::{Numbered, Position};
use crate::telemetry::Throttle;
use chrono::{DateTime, Utc};

/// Changes a pump reads per statement.
const PUMP_PAGE: i64 = 500;
/// Batches a stream may fall behind before it is closed (it resumes from its last id).
const STREAM_BACKLOG: usize = 256;

/// Settings of the event stream.
#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Open streams per user on one instance (`MAX_STREAMS_PER_USER`).
    pub max_streams_per_user: usize,
    /// Open streams on one instance (`MAX_STREAMS`).
    pub max_streams: usize,
    /// A comment line this often keeps idle streams open through proxies; hubs re-read
    /// the counter as often, which bounds how late a change can be that no notification
    /// announced (a write made straight in the database, an instance that died between
    /// its commit and its notification) (`EVENTS_HEARTBEAT`).
    pub heartbeat: Duration,
    /// How often the PostgreSQL listener proves it is alive by notifying itself; silent
    /// for one interval, it is replaced (and every stream catches up from the feed).
    pub listener_check: Duration,
    /// How the listener connects to PostgreSQL (`DATABASE_DIRECT_URL`, needed behind a
    /// transaction pooler); `None`: as the store does.
    pub listener_url: Option<secrecy::SecretString>,
}

pub const DEFAULT_MAX_STREAMS_PER_USER: usize = 20;
pub const DEFAULT_MAX_STREAMS: usize = 10_000;
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
pub const DEFAULT_LISTENER_CHECK: Duration = Duration::from_secs(5);

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            max_streams_per_user: DEFAULT_MAX_STREAMS_PER_USER,
            max_streams: DEFAULT_MAX_STREAMS,
            heartbeat: DEFAULT_HEARTBEAT,
            listener_check: DEFAULT_LISTENER_CHECK,
            listener_url: None,
        }
    }
}

/// One entry of a batch: its number, its feed entry as JSON, and its event id, made once
/// for every stream of the user.
#[derive(Debug, Clone)]
pub struct Serialized {
    pub seq: i64,
    pub json: Arc<str>,
    /// The cursor just after this change, for a client whose floor is at most `seq` (every
    /// stream but one resumed from the middle of a paged full sync).
    pub id: Arc<str>,
}

impl Serialized {
    pub fn of(change: &Numbered, key: &CursorKey, user: &str, issued: DateTime<Utc>) -> Self {
        // A feed entry is plain data: serializing it cannot fail.
        let json = serde_json::to_string(&change.change).unwrap_or_default();
        let after = Position {
            counter: change.seq,
            floor: change.seq,
            issued,
        };
        Self {
            seq: change.seq,
            json: json.into(),
            id: after.seal(key, user).into(),
        }
    }
}

/// What a pump read: every change numbered in `(from, to]`, in order.
#[derive(Debug)]
pub enum Batch {
    Changes {
        from: i64,
        to: i64,
        changes: Vec<Serialized>,
    },
    /// The counter went backwards (the database was restored from a backup): streams
    /// close, and their clients' cursors get 410 when they reconnect.
    Reset,
}

/// What a pump shares with the streams and the registry.
struct Channel {
    user: String,
    key: Arc<CursorKey>,
    batches: broadcast::Sender<Arc<Batch>>,
    wake: Notify,
    /// Where the pump reads from next; `None` until the first stream has read its replay.
    position: Mutex<Option<i64>>,
}

/// A user's hub: alive while the user has open streams here.
struct Hub {
    channel: Arc<Channel>,
    streams: AtomicUsize,
    /// Stops the pump when the last stream goes.
    _pump: DropGuard,
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `MAX_STREAMS_PER_USER` reached: 429.
    User,
    /// `MAX_STREAMS` reached: 503.
    Instance,
}

/// The fan-out of one instance.
pub struct Fanout {
    store: Arc<dyn TaskStore>,
    key: Arc<CursorKey>,
    settings: EventSettings,
    hubs: Mutex<HashMap<String, Weak<Hub>>>,
    slots: Arc<Semaphore>,
    /// Cancelled at shutdown (or when this fan-out is dropped): every stream ends, the
    /// pumps and the listener stop.
    closing: CancellationToken,
    open_streams: Gauge,
    /// Pumps that cannot read the feed (the database is down) log once per interval
    /// between them all, not once per user.
    pump_failures: Arc<Throttle>,
    /// Tells other instances (PostgreSQL only; started on the first write).
    notifier: OnceLock<Option<Notifier>>,
    /// Hears other instances (PostgreSQL only; started with the first stream).
    listener: OnceLock<()>,
    /// The notification channel: derived from the cursor key, so every instance of one
    /// database shares it, and other databases on the same server do not.
    channel_name: String,
    me: Weak<Fanout>,
}

impl Fanout {
    pub fn new(
        store: Arc<dyn TaskStore>,
        key: &CursorKey,
        settings: EventSettings,
        open_streams: Gauge,
        closing: CancellationToken,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            key: Arc::new(key.clone()),
            slots: Arc::new(Semaphore::new(settings.max_streams)),
            settings,
            hubs: Mutex::new(HashMap::new()),
            closing,
            open_streams,
            pump_failures: Arc::default(),
            notifier: OnceLock::new(),
            listener: OnceLock::new(),
            channel_name: format!("task_api_{}", key.fingerprint()),
            me: me.clone(),
        })
    }

    pub fn settings(&self) -> &EventSettings {
        &self.settings
    }

    /// Resolves when the service is shutting down.
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Ends every open stream at once (shutdown), so the graceful drain need not wait
    /// for them and their clients reconnect to another instance.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// The user's tasks changed (a write on this instance committed): wake the user's
    /// pump here, and tell the other instances.
    pub fn changed(&self, user: &str) {
        self.wake(user);
        if let Some(notifier) = self.notifier() {
            notifier.changed(user);
        }
    }

    /// Wakes the user's pump on this instance, if the user has streams here.
    pub fn wake(&self, user: &str) {
        let hub = self.lock_hubs().get(user).and_then(Weak::upgrade);
        if let Some(hub) = hub {
            hub.channel.wake.notify_one();
        }
    }

    /// Wakes every pump: notifications may have been missed (the listener reconnected).
    pub fn wake_all(&self) {
        let hubs: Vec<Arc<Hub>> = self
            .lock_hubs()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for hub in hubs {
            hub.channel.wake.notify_one();
        }
    }

    /// A place among the user's streams, subscribed to their batches from now on.
    pub fn subscribe(&self, user: &str) -> Result<Subscription, Full> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full::Instance)?;
        self.start_listener();
        let hub = {
            let mut hubs = self.lock_hubs();
            let hub = match hubs.get(user).and_then(Weak::upgrade) {
                Some(hub) => hub,
                None => {
                    let hub = self.open_hub(user);
                    hubs.insert(user.to_owned(), Arc::downgrade(&hub));
                    hub
                }
            };
            // Counted under the registry's lock, so two streams cannot both take the
            // last place.
            if hub.streams.load(Ordering::Relaxed) >= self.settings.max_streams_per_user {
                return Err(Full::User);
            }
            hub.streams.fetch_add(1, Ordering::Relaxed);
            hub
        };
        self.open_streams.inc();
        Ok(Subscription {
            batches: hub.channel.batches.subscribe(),
            hub: Some(hub),
            fanout: self.me.clone(),
            _slot: slot,
        })
    }

    fn open_hub(&self, user: &str) -> Arc<Hub> {
        let stop = self.closing.child_token();
        let channel = Arc::new(Channel {
            user: user.to_owned(),
            key: self.key.clone(),
            batches: broadcast::channel(STREAM_BACKLOG).0,
            wake: Notify::new(),
            position: Mutex::new(None),
        });
        tokio::spawn(pump(
            channel.clone(),
            self.store.clone(),
            self.settings.heartbeat,
            stop.clone(),
            self.pump_failures.clone(),
        ));
        Arc::new(Hub {
            channel,
            streams: AtomicUsize::new(0),
            _pump: stop.drop_guard(),
        })
    }

    fn notifier(&self) -> Option<&Notifier> {
        self.notifier
            .get_or_init(|| {
                let store = self.store.postgres()?;
                Some(Notifier::start(store, self.channel_name.clone()))
            })
            .as_ref()
    }

    fn start_listener(&self) {
        self.listener.get_or_init(|| {
            let (Some(store), Some(fanout)) = (self.store.postgres(), self.me.upgrade()) else {
                return;
            };
            let instance = self
                .notifier()
                .map(|n| n.instance().to_owned())
                .unwrap_or_default();
            let wakes: Arc<dyn Wake> = fanout;
            let listener = Listener {
                fanout: Arc::downgrade(&wakes),
                store,
                channel: self.channel_name.clone(),
                instance,
                check: self.settings.listener_check,
                url: self.settings.listener_url.clone(),
                closing: self.closing.clone(),
            };
            tokio::spawn(listener.run());
        });
    }

    fn lock_hubs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Hub>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // change is one insert or remove).
        self.hubs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Wake for Fanout {
    fn wake(&self, user: &str) {
        Fanout::wake(self, user);
    }

    fn wake_all(&self) {
        Fanout::wake_all(self);
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        // Stops the pumps and the listener, which hold the store.
        self.closing.cancel();
    }
}

/// An open stream's place: its receiver of batches, and its share of the limits. Dropped
/// with the stream.
pub struct Subscription {
    batches: broadcast::Receiver<Arc<Batch>>,
    hub: Option<Arc<Hub>>,
    fanout: Weak<Fanout>,
    _slot: OwnedSemaphorePermit,
}

/// What waiting for the next batch gave.
pub enum Received {
    Batch(Arc<Batch>),
    /// The stream fell more than the backlog behind: close it.
    Lagged,
}

impl Subscription {
    pub async fn next(&mut self) -> Received {
        match self.batches.recv().await {
            Ok(batch) => Received::Batch(batch),
            // The sender lives as long as the hub, which this subscription holds.
            Err(broadcast::error::RecvError::Closed | broadcast::error::RecvError::Lagged(_)) => {
                Received::Lagged
            }
        }
    }

    /// After the stream read the feed up to `position`: start the pump there if it has
    /// not started yet. Returns where the pump reads from, so that a stream below it
    /// reads the gap itself.
    pub fn pump_from(&self, position: i64) -> i64 {
        let Some(hub) = &self.hub else {
            return position;
        };
        let mut at = hub
            .channel
            .position
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *at {
            Some(pumped) => pumped,
            None => {
                *at = Some(position);
                hub.channel.wake.notify_one();
                position
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(hub) = self.hub.take() else { return };
        hub.streams.fetch_sub(1, Ordering::Relaxed);
        let user = hub.channel.user.clone();
        drop(hub);
        if let Some(fanout) = self.fanout.upgrade() {
            fanout.open_streams.dec();
            let mut hubs = fanout.lock_hubs();
            if hubs.get(&user).is_some_and(|w| w.strong_count() == 0) {
                hubs.remove(&user);
            }
        }
    }
}

/// Reads the user's new changes whenever woken (and every `recheck`), and broadcasts
/// them, until the hub closes.
async fn pump(
    channel: Arc<Channel>,
    store: Arc<dyn TaskStore>,
    recheck: Duration,
    stop: CancellationToken,
    failures: Arc<Throttle>,
) {
    let mut tick = tokio::time::interval(recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = channel.wake.notified() => {}
            _ = tick.tick() => {}
        }
        if let Err(error) = read_new(&channel, store.as_ref()).await {
            // Kept for the next wake-up: the position did not move, so nothing is lost.
            failures.warn(|| tracing::warn!(%error, "event fan-out: cannot read the change feed"));
        }
    }
}

/// Reads every change above the pump's position and broadcasts it.
async fn read_new(channel: &Channel, store: &dyn TaskStore) -> Result<(), StoreError> {
    let position = *channel.position.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut from) = position else {
        return Ok(());
    };
    loop {
        let page = within_deadline(store.changes(&channel.user, from, true, PUMP_PAGE)).await?;
        if page.marker < from {
            *channel.position.lock().unwrap_or_else(|e| e.into_inner()) = Some(page.marker);
            let _ = channel.batches.send(Arc::new(Batch::Reset));
            return Ok(());
        }
        let to = match page.changes.last() {
            Some(last) if page.has_more => last.seq,
            _ => page.marker,
        };
        if to > from {
            let issued = crate::storage::now();
            let changes = page
                .changes
                .iter()
                .map(|c| Serialized::of(c, &channel.key, &channel.user, issued))
                .collect();
            *channel.position.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
            // No receiver: every stream left meanwhile.
            let _ = channel
                .batches
                .send(Arc::new(Batch::Changes { from, to, changes }));
        }
        from = to;
        if !page.has_more {
            return Ok(());
        }
    }
}
