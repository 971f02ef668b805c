//! Fan-out across instances on PostgreSQL: `NOTIFY` after writes, one `LISTEN`
//! connection per instance.
//!
//! A notification says only which users' tasks changed (and which instance wrote); the
//! receiving pumps read the changes from the feed. Notifications are coalesced: the
//! [`Notifier`] sends one `NOTIFY` for every user written since its previous one, and at
//! most one per [`MIN_NOTIFY_INTERVAL`], because every `NOTIFY` takes a database-wide
//! lock at commit. A lost notification delays a change, never loses it: pumps re-read
//! the counter every heartbeat, and after the listener reconnects every pump catches up.
//!
//! The listener connection carries no TCP keepalive (sqlx sets none), so a connection
//! that died silently — a NAT or proxy dropping it without a reset — would look like a
//! quiet one. The listener therefore notifies itself every `listener_check` through the
//! pool, and when one check interval passes without hearing its own ping it replaces the
//! connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::storage::PgTaskStore;
use crate::telemetry::Throttle;

/// At most one `NOTIFY` per this interval from one instance.
pub const MIN_NOTIFY_INTERVAL: Duration = Duration::from_millis(5);
/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD_BYTES: usize = 7900;
/// Users remembered between two notifications; beyond it, one "everyone" notification.
const MAX_PENDING_USERS: usize = 10_000;
/// Between two failed attempts to connect the listener.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// What a notification carries.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Message {
    /// The sending instance.
    i: String,
    /// Users whose tasks changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    u: Vec<String>,
    /// Every user's tasks may have changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    all: bool,
    /// A listener's check of itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ping: Option<u64>,
}

/// Sends this instance's coalesced notifications, until dropped.
pub struct Notifier {
    instance: String,
    shared: Arc<Pending>,
    _stop: DropGuard,
}

#[derive(Default)]
struct Pending {
    users: Mutex<HashSet<String>>,
    wake: Notify,
}

impl Notifier {
    pub fn start(store: PgTaskStore, channel: String) -> Self {
        let mut id = [0u8; 8];
        // Without randomness the id is still unique enough per process.
        if getrandom::fill(&mut id).is_err() {
            id = u64::from(std::process::id()).to_be_bytes();
        }
        let instance: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let shared = Arc::new(Pending::default());
        let stop = CancellationToken::new();
        tokio::spawn(send_forever(
            shared.clone(),
            store,
            channel,
            instance.clone(),
            stop.clone(),
        ));
        Self {
            instance,
            shared,
            _stop: stop.drop_guard(),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn changed(&self, user: &str) {
        {
            let mut pending = self.shared.users.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() <= MAX_PENDING_USERS && !pending.contains(user) {
                pending.insert(user.to_owned());
            }
        }
        self.shared.wake.notify_one();
    }
}

async fn send_forever(
    pending: Arc<Pending>,
    store: PgTaskStore,
    channel: String,
    instance: String,
    stop: CancellationToken,
) {
    let throttle = Throttle::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = pending.wake.notified() => {}
        }
        let users = std::mem::take(&mut *pending.users.lock().unwrap_or_else(|e| e.into_inner()));
        let started = tokio::time::Instant::now();
        for payload in payloads(&instance, users) {
            if let Err(error) = store.notify(&channel, &payload).await {
                throttle.warn(
                    || tracing::warn!(%error, "event fan-out: cannot notify other instances"),
                );
            }
        }
        tokio::time::sleep_until(started + MIN_NOTIFY_INTERVAL).await;
    }
}

/// The users' names in as few payloads as fit.
fn payloads(instance: &str, users: HashSet<String>) -> Vec<String> {
    let everyone = || {
        vec![to_json(&Message {
            i: instance.to_owned(),
            all: true,
            ..Message::default()
        })]
    };
    if users.len() > MAX_PENDING_USERS {
        return everyone();
    }
    let mut out = Vec::new();
    let mut batch = Message {
        i: instance.to_owned(),
        ..Message::default()
    };
    let mut size = to_json(&batch).len();
    for user in users {
        // A name's share of the payload: its JSON string and a comma.
        let cost = serde_json::to_string(&user).map_or(usize::MAX, |s| s.len() + 1);
        if cost > MAX_PAYLOAD_BYTES / 2 {
            return everyone();
        }
        if size + cost > MAX_PAYLOAD_BYTES {
            out.push(to_json(&batch));
            batch.u.clear();
            size = to_json(&batch).len();
        }
        size += cost;
        batch.u.push(user);
    }
    if !batch.u.is_empty() {
        out.push(to_json(&batch));
    }
    out
}

fn to_json(message: &Message) -> String {
    serde_json::to_string(message).unwrap_or_default()
}

/// What the listener wakes: this instance's per-user pumps (`fanout::Fanout`).
pub trait Wake: Send + Sync {
    /// The user's tasks changed on another instance.
    fn wake(&self, user: &str);
    /// Notifications may have been missed: every pump catches up.
    fn wake_all(&self);
}

/// Hears every instance's notifications and wakes the pumps they concern.
pub struct Listener {
    pub fanout: Weak<dyn Wake>,
    pub store: PgTaskStore,
    pub channel: String,
    /// This instance's id: its own notifications were already handled locally.
    pub instance: String,
    pub check: Duration,
    pub url: Option<secrecy::SecretString>,
    pub closing: CancellationToken,
}

enum Heard {
    Message(String),
    /// The connection is gone.
    Lost,
}

impl Listener {
    pub async fn run(self) {
        let throttle = Throttle::default();
        let mut ping = 0u64;
        loop {
            if self.closing.is_cancelled() || self.fanout.strong_count() == 0 {
                return;
            }
            let (mut heard, receiver) = match self.connect().await {
                Ok(connected) => connected,
                Err(error) => {
                    throttle.warn(|| tracing::warn!(%error, "event fan-out: cannot listen for other instances' changes; retrying"));
                    tokio::select! {
                        () = self.closing.cancelled() => return,
                        () = tokio::time::sleep(RECONNECT_DELAY) => continue,
                    }
                }
            };
            // Notifications sent while nobody listened are gone: every pump catches up.
            if let Some(fanout) = self.fanout.upgrade() {
                fanout.wake_all();
            }
            let mut awaiting: Option<u64> = None;
            let mut tick = tokio::time::interval(self.check);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = self.closing.cancelled() => {
                        receiver.abort();
                        return;
                    }
                    message = heard.recv() => match message {
                        Some(Heard::Message(payload)) => self.deliver(&payload, &mut awaiting),
                        Some(Heard::Lost) | None => {
                            throttle.warn(|| tracing::warn!("event fan-out: the listener connection was lost; reconnecting"));
                            break;
                        }
                    },
                    _ = tick.tick() => {
                        if awaiting.is_some() {
                            throttle.warn(|| tracing::warn!("event fan-out: the listener stopped hearing its own checks; reconnecting"));
                            break;
                        }
                        ping += 1;
                        let payload = to_json(&Message { i: self.instance.clone(), ping: Some(ping), ..Message::default() });
                        // A ping that could not be sent proves nothing either way.
                        if self.store.notify(&self.channel, &payload).await.is_ok() {
                            awaiting = Some(ping);
                        }
                    }
                }
            }
            receiver.abort();
        }
    }

    /// A listening connection, and the task that reads it.
    async fn connect(
        &self,
    ) -> Result<(mpsc::Receiver<Heard>, tokio::task::JoinHandle<()>), sqlx::Error> {
        let options = match &self.url {
            Some(url) => url.expose_secret().parse::<PgConnectOptions>()?,
            None => self
                .store
                .connect_options()
                .clone()
                .application_name("task-api-listener"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.check.max(Duration::from_secs(1)))
            .connect_lazy_with(options);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.listen(&self.channel).await?;
        let (tx, rx) = mpsc::channel(1024);
        // Reading in a task of its own: a `select!` never cancels a read half-way.
        let reader = tokio::spawn(async move {
            loop {
                let heard = match listener.try_recv().await {
                    Ok(Some(notification)) => Heard::Message(notification.payload().to_owned()),
                    Ok(None) | Err(_) => Heard::Lost,
                };
                let lost = matches!(heard, Heard::Lost);
                if tx.send(heard).await.is_err() || lost {
                    return;
                }
            }
        });
        Ok((rx, reader))
    }

    fn deliver(&self, payload: &str, awaiting: &mut Option<u64>) {
        let Ok(message) = serde_json::from_str::<Message>(payload) else {
            return;
        };
        if message.i == self.instance {
            if message.ping.is_some() && message.ping == *awaiting {
                *awaiting = None;
            }
            return;
        }
        let Some(fanout) = self.fanout.upgrade() else {
            return;
        };
        if message.all {
            fanout.wake_all();
        }
        for user in &message.u {
            fanout.wake(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_every_user_and_fit() {
        let users: HashSet<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let sent = payloads("me", users.clone());
        assert!(sent.len() > 1);
        let mut heard = HashSet::new();
        for payload in &sent {
            assert!(payload.len() < 8000, "{}", payload.len());
            let m: Message = serde_json::from_str(payload).unwrap();
            assert_eq!(m.i, "me");
            assert!(!m.all);
            heard.extend(m.u);
        }
        assert_eq!(heard, users);
    }

    #[test]
    fn a_huge_name_or_too_many_users_become_one_notification_for_everyone() {
        let huge: HashSet<String> = ["x".repeat(5000)].into();
        let sent = payloads("me", huge);
        assert_eq!(sent.len(), 1);
        let m: Message = serde_json::from_str(&sent[0]).unwrap();
        assert!(m.all && m.u.is_empty());
        let many: HashSet<String> = (0..=MAX_PENDING_USERS).map(|i| i.to_string()).collect();
        let m: Message = serde_json::from_str(&payloads("me", many)[0]).unwrap();
        assert!(m.all);
        assert!(payloads("me", HashSet::new()).is_empty());
    }

    #[test]
    fn names_with_any_character_survive() {
        let odd: HashSet<String> = ["a\"b\\c\n,d".to_owned(), "ünï".to_owned()].into();
        let m: Message = serde_json::from_str(&payloads("me", odd.clone())[0]).unwrap();
        assert_eq!(m.u.into_iter().collect::<HashSet<_>>(), odd);
    }
}
